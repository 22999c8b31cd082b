"""Comparison, ReLU, select, max and argmax against plaintext torch, exact on the ring: a2b
(`comparison`), and for ReLU, max and argmax also lut (`lut`, more in tests/test_lut.py)."""

import functools
import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from service.mpc import comparison, protocols
from service.mpc.dealer import carry_spec
from service.mpc.prg import random_ring
from service.mpc.ring import PRIME
from service.mpc.sharing import open_label, share_xor
from tests.conftest import FP, opened, opened_xor, run_shared

edge = st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), -(2**63) + 1, 2**62, -(2**62), 2**16])
ring_values = st.one_of(edge, st.integers(-(2**63), 2**63 - 1))


@given(st.lists(ring_values, min_size=1, max_size=64))
def test_msb_is_exact_on_the_whole_ring(xs):
    x = torch.tensor(xs, dtype=torch.int64)
    result = run_shared(comparison.msb, x)
    assert torch.equal(opened_xor(result), (x < 0).long())
    assert result.stats0.rounds == 3
    # 8 slice pairs x 30 masked words (cross), 4 x 8 openings (gp4), 7 openings (g4)
    assert result.stats0.bytes_sent == 8 * (8 * 30 + 4 * 8 + 7) * -(-len(xs) // 64)


def test_msb_on_a_large_random_batch():
    x = random_ring((100_000,))
    assert torch.equal(opened_xor(run_shared(comparison.msb, x)), (x < 0).long())


PROTOCOLS = {n: protocols.GATES[n] for n in ("a2b", "lut")}  # the zero-test argmax ones
RELU_ROUNDS, ARGMAX_ROUNDS = {"a2b": 4, "lut": 3}, {"a2b": 3, "lut": 2}


def _relu_bytes(protocol: str, n: int, bits: int) -> int:
    """Bytes party 0 sends for a ReLU of n elements (planes: 64 elements per word)."""
    planes = -(-n // 64)
    select = 8 * n + 8 * planes  # d, and e as a bit plane
    if protocol == "a2b":  # the carry tree, and with a shift its low carry (no opening of x)
        return 8 * (8 * 30 + 4 * 8 + 7) * planes + _tree_shift_bytes(n, bits) + select
    # with a shift: the low borrow's gate, 2L - 1 masked inputs (`truncation`)
    low = 8 * (2 * len(carry_spec(bits).slices) - 1) * planes if bits else 0
    return 8 * n + 8 * 17 * planes + low + select  # c (the truncation's too), the 9-slice top


def _tree_shift_bytes(n: int, bits: int) -> int:
    """What a2b's ReLU sends for its shift (`comparison._sign_and_shift`): the G and P of the
    j positions above the q lowest slices (one more slice pair of the tree's cross gate), the
    gate over those q + 1 slices' inputs, and the two injected bits' openings."""
    if not bits:
        return 0
    planes = -(-n // 64)
    q, j = divmod(bits + 1, 4)
    slices = q + (j > 0)
    part = 8 * 30 * planes if j else 0
    gate = 8 * (2 * slices - 1) * planes if slices > 1 else 0
    return part + gate + 8 * 2 * planes


def _argmax_bytes(protocol: str, comparisons: int) -> int:
    planes = -(-comparisons // 64)
    if protocol == "a2b":  # the carry tree's slices, gp8, the top's 4 inputs
        return 8 * (8 * 30 + 2 * 16 + 4) * planes
    return 8 * comparisons + 8 * 11 * planes  # c, the top's 11 inputs


@pytest.mark.parametrize("protocol", PROTOCOLS)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=64),
    st.sampled_from([0, 16, 18]),
)
def test_relu_with_and_without_truncation(protocol, xs, extra_bits):
    real = torch.tensor(xs, dtype=torch.float64)
    x = FP.encode(real, frac_bits=FP.frac_bits + extra_bits)
    result = run_shared(lambda p, a: PROTOCOLS[protocol].relu(p, a, extra_bits), x)
    got = FP.decode(opened(result))
    assert (got - real.clamp(min=0)).abs().max() <= 2 / FP.scale
    assert result.stats0.rounds == result.stats1.rounds == RELU_ROUNDS[protocol]
    assert result.stats0.bytes_sent == _relu_bytes(protocol, len(xs), extra_bits)


def test_relu_edges_in_the_last_bit():
    x = torch.tensor([0, 1, -1, 2, -2, 2**40, -(2**40)], dtype=torch.int64)
    assert opened(run_shared(comparison.relu, x)).tolist() == [0, 1, 0, 2, 0, 2**40, 0]


@given(st.lists(st.tuples(ring_values, st.integers(0, 1)), min_size=1, max_size=32))
def test_select_multiplies_by_a_shared_bit(pairs):
    x = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    b0, b1 = share_xor(b)  # the bit enters as XOR shares
    result = run_shared(lambda p, xs: comparison.select(p, xs, b0 if p.index == 0 else b1), x)
    assert torch.equal(opened(result), x * b)
    assert result.stats0.rounds == 1
    # d per element, e as one bit per element in a bit plane
    assert result.stats0.bytes_sent == 8 * len(pairs) + 8 * -(-len(pairs) // 64)


def _zero_test(result) -> torch.Tensor:
    """What the client reconstructs from argmax's shares: the sum mod p, one zero per row."""
    for share in (result.out0, result.out1):
        assert share.dtype == torch.int64 and ((share >= 0) & (share < PRIME)).all()
    return (result.out0 + result.out1) % PRIME


@pytest.mark.parametrize("protocol", PROTOCOLS)
@given(st.sampled_from([1, 3, 64]), st.sampled_from([2, 3, 10]), st.booleans())
def test_argmax_zero_test_matches_torch_including_ties(protocol, batch, n, ties):
    logits = torch.randint(-3, 3, (batch, n)) if ties else torch.randn(batch, n) * 100
    x = FP.encode(logits.double())
    result = run_shared(PROTOCOLS[protocol].argmax, x)
    y = _zero_test(result)
    assert torch.equal((y == 0).long(), F.one_hot(logits.argmax(-1), n))
    assert torch.equal(open_label(result.out0, result.out1, "zero"), logits.argmax(-1))
    assert result.stats0.rounds == result.stats1.rounds == ARGMAX_ROUNDS[protocol]
    assert result.stats0.bytes_sent == _argmax_bytes(protocol, batch * n * (n - 1) // 2)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_argmax_at_the_largest_magnitudes_and_one_or_more_classes(protocol):
    argmax = PROTOCOLS[protocol].argmax
    big = 2**61
    x = torch.tensor([[-big, big - 1, big, -1, 0]], dtype=torch.int64)
    assert open_label(*_outs(run_shared(argmax, x)), "zero").item() == 2
    # the widest gap whose difference does not wrap (argmax compares differences)
    x = torch.tensor([[2**62 - 1, -(2**62)], [0, 0], [-1, 0], [1, 0]], dtype=torch.int64)
    assert open_label(*_outs(run_shared(argmax, x)), "zero").tolist() == [0, 0, 1, 0]
    one = run_shared(argmax, torch.tensor([[5], [-3]], dtype=torch.int64))
    assert torch.equal(_zero_test(one), torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError):
        run_shared(argmax, torch.zeros(1, 11, dtype=torch.int64))


def _outs(result) -> tuple[torch.Tensor, torch.Tensor]:
    return result.out0, result.out1


LOSER_ROWS = 2000


def _losers(protocol: str) -> torch.Tensor:
    """The client's zero-test values for LOSER_ROWS runs of one row in which class k wins
    9 - k times: class 0 is the label (0), the others rho_k (wins_k - 9) = -k rho_k mod p."""
    x = FP.encode(torch.arange(10, dtype=torch.float64).flip(0).unsqueeze(0).repeat(LOSER_ROWS, 1))
    y = _zero_test(run_shared(PROTOCOLS[protocol].argmax, x))
    assert (y[:, 0] == 0).all() and (y[:, 1:] != 0).all()
    return y


def _assert_each_loser_looks_uniform(y: torch.Tensor) -> None:
    second, last = y[:, 1].double(), y[:, 9].double()  # 8 wins against 0
    for v in (second, last):
        assert abs(v.mean() / (PRIME / 2) - 1) < 0.05  # uniform mean p / 2
        assert len(v.unique()) > 1900  # nearly all distinct: no small set of values
    # Kolmogorov-Smirnov distance between the two empirical distributions
    grid = torch.linspace(0, PRIME, 200).double()
    cdf = lambda v: (v.unsqueeze(0) <= grid.unsqueeze(1)).double().mean(1)  # noqa: E731
    assert (cdf(second) - cdf(last)).abs().max() < 0.06


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_argmax_losers_see_uniform_nonzero_values_whatever_their_wins(protocol):
    """The client's view: 0 at the label, and elsewhere rho_k (wins_k - 9) for a fresh uniform
    rho_k, so a class that won 8 times looks like one that won none (uniform on 1..p-1)."""
    _assert_each_loser_looks_uniform(_losers(protocol))  # class k wins 9 - k times


@functools.cache
def _inverses() -> torch.Tensor:
    """v^-1 mod p for every v in 0..p-1 (0 for 0)."""
    return torch.tensor([0, *(pow(v, PRIME - 2, PRIME) for v in range(1, PRIME))])


RATIO_BINS = 16  # p - 1 = 65,520 = 16 x 4,095: equal bins of the ratios 1..p-1


def _ratio_chi2(y: torch.Tensor) -> dict[tuple[int, int], float]:
    """For every two losing classes j < k: the chi-square statistic (RATIO_BINS - 1 degrees of
    freedom) of y_j / y_k mod p over the rows, against the uniform distribution on 1..p-1."""
    inverse = _inverses()
    expected = len(y) / RATIO_BINS
    out = {}
    for j in range(1, 10):
        for k in range(j + 1, 10):
            ratio = y[:, j] * inverse[y[:, k]] % PRIME
            bins = (ratio - 1) // ((PRIME - 1) // RATIO_BINS)
            counts = torch.bincount(bins, minlength=RATIO_BINS)
            out[j, k] = float(((counts - expected) ** 2 / expected).sum())
    return out


def _chi2_upper(dof: int, alpha: float) -> float:
    """The upper alpha quantile of chi-square (Wilson-Hilferty; within 1% here)."""
    z, c = -NormalDist().inv_cdf(alpha), 2 / (9 * dof)
    return dof * (1 - c + z * math.sqrt(c)) ** 3


RATIO_LIMIT = _chi2_upper(RATIO_BINS - 1, 1e-6 / 36)  # 36 pairs: about 60


def _assert_ratios_uniform(y: torch.Tensor) -> None:
    worst = max((chi2, pair) for pair, chi2 in _ratio_chi2(y).items())
    assert worst[0] < RATIO_LIMIT, f"y_j / y_k for (j, k) = {worst[1]}: chi2 {worst[0]:.0f}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_argmax_losers_ratios_are_uniform_whatever_their_wins(protocol):
    """Two losers together show no more than each alone: y_j / y_k = (j / k) (rho_j / rho_k) mod
    p is uniform on 1..p-1 for every two losing classes (each pair with its own wins), because
    each class has its own fresh rho. With one rho per row it would be j / k: the wins."""
    _assert_ratios_uniform(_losers(protocol))


class _OneRhoPerRow:
    """The dealer's private stream, but drawing one rho per row for all classes (a regression)."""

    def __init__(self, prg) -> None:
        self._prg = prg

    def mod(self, shape: tuple[int, int], p: int) -> torch.Tensor:
        return self._prg.mod((shape[0], 1), p).expand(*shape).contiguous()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_ratio_test_catches_one_rho_per_row(protocol, monkeypatch):
    # Negative control: a dealer that draws one rho per row instead of one per class. Each loser
    # alone still looks uniform (the test above passes), but every ratio is j / k.
    from service.mpc import dealer

    truth = dealer._zero_test_truth
    monkeypatch.setattr(
        dealer,
        "_zero_test_truth",
        lambda req, full, private: truth(req, full, _OneRhoPerRow(private)),
    )
    y = _losers(protocol)
    _assert_each_loser_looks_uniform(y)
    # y_1 / y_9 = (-1 rho) / (-9 rho) = 1 / 9 in every row: the client reads the wins
    assert (y[:, 1] * _inverses()[y[:, 9]] % PRIME == pow(9, PRIME - 2, PRIME)).all()
    with pytest.raises(AssertionError, match="chi2"):
        _assert_ratios_uniform(y)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@given(st.sampled_from([1, 4]), st.sampled_from([2, 3]))
def test_max_pool_matches_torch(protocol, batch, k):
    real = torch.randn(batch, 3, 6, 6, dtype=torch.float64) * 50
    result = run_shared(lambda p, a: PROTOCOLS[protocol].max_pool2d(p, a, k), FP.encode(real))
    assert torch.equal(FP.decode(opened(result)), FP.decode(FP.encode(F.max_pool2d(real, k))))
