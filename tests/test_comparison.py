"""Comparison, ReLU, select, max and argmax against plaintext torch, exact on the ring."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from service.mpc import comparison
from service.mpc.prg import random_ring
from service.mpc.sharing import share_xor
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


@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=64),
    st.sampled_from([0, 16, 18]),
)
def test_relu_with_and_without_truncation(xs, extra_bits):
    real = torch.tensor(xs, dtype=torch.float64)
    x = FP.encode(real, frac_bits=FP.frac_bits + extra_bits)
    result = run_shared(lambda p, a: comparison.relu(p, a, extra_bits), x)
    got = FP.decode(opened(result))
    assert (got - real.clamp(min=0)).abs().max() <= 2 / FP.scale
    assert result.stats0.rounds == 4


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


@given(st.sampled_from([1, 3, 64]), st.sampled_from([2, 10]), st.booleans())
def test_argmax_one_hot_matches_torch_including_ties(batch, n, ties):
    logits = torch.randint(-3, 3, (batch, n)) if ties else torch.randn(batch, n) * 100
    x = FP.encode(logits.double())
    result = run_shared(comparison.argmax, x)
    one_hot = opened_xor(result)
    assert torch.equal(one_hot, F.one_hot(logits.argmax(-1), n))
    assert result.stats0.rounds == 3 + (n > 2)  # the wins of one class are ANDed in 1 round


def test_argmax_at_the_largest_magnitudes():
    big = 2**61
    x = torch.tensor([[-big, big - 1, big, -1, 0]], dtype=torch.int64)
    assert opened_xor(run_shared(comparison.argmax, x)).argmax(-1).item() == 2


@given(st.sampled_from([1, 4]), st.sampled_from([2, 3]))
def test_max_pool_matches_torch(batch, k):
    real = torch.randn(batch, 3, 6, 6, dtype=torch.float64) * 50
    result = run_shared(lambda p, a: comparison.max_pool2d(p, a, k), FP.encode(real))
    assert torch.equal(FP.decode(opened(result)), FP.decode(FP.encode(F.max_pool2d(real, k))))
