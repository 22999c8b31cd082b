"""What one party sees is independent of the secret, and fresh in every run.

A party's view is every tensor it receives in a run. Every element of a batch carries fresh
randomness, so one batch of ROWS rows is ROWS independent runs. The view is cut into bits two
ways, and the runs give each bit a sample:
- per row (ROWS runs): 64 bits per received ring element, one per element of a bit plane;
- per lane (ROWS / 64 runs, blocks of 64 rows): the bit planes only, each bit kept at its
  position in its word, since a bias confined to one lane (1/64 of the elements) is diluted 64
  times per row. This is what the earlier test's per-position statistic over 200 runs saw.
Two statistics test the bits:
- max: the largest |z| of any one bit (its fraction of ones against 1/2, or between two views),
  against Z_LIMIT = 6.94 (Bonferroni over up to MAX_BITS = 2^18 bits, ALPHA = 1e-6);
- joint: the sum of all bits' z^2, chi-square with one degree of freedom per bit without a leak,
  against its upper ALPHA quantile: many small biases that no single bit shows.
Per row, max catches one bit biased by 0.05 from 1/2 (expected z 12.8 against 6.94; half the
time from 0.027); per lane, from 0.22 (half the time); joint, for instance 512 bits biased by
0.01 each. Negative controls below show each of these.

Two kinds of test use them:
- two secrets: party 0's view (plus its own input share) while it computes ReLU, argmax or a
  linear layer with a fixed weight mask on two different secrets: every bit fair under each
  secret, and the same under both;
- fixed shares: the same input shares in every run (one row repeated over the batch), both
  parties' views (one run records both): every bit fair, and again fair when XORed with a second
  batch's (so no word repeats from one run to the next). This is the simulation argument itself:
  what a party receives is the peer's value masked by fresh randomness. It also catches what the
  two-secret test cannot: a share sent unmasked is uniform by itself, but with fixed shares it is
  the same word in every run.
Argmax runs on CLASSES = 3 classes: every step of the 10-class protocol, with 3 comparisons per
row instead of 45 (the dealer's zero-test material for 16,384 rows of 10 would take seconds).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import math
from collections.abc import Callable
from functools import partial
from statistics import NormalDist

import httpx
import numpy as np
import pytest
import torch

from service.mpc import beaver, comparison, lut, protocols
from service.mpc.beaver import WeightMasks
from service.mpc.channel import InMemoryChannel, NullChannel
from service.mpc.dealer import Dealer, PlanRecorder, Request, deal_pair
from service.mpc.inprocess import run_two_party
from service.mpc.party import Party
from service.mpc.sharing import share
from tests.conftest import FP

ROWS = 16_384  # runs per batch (a multiple of 64, so bit planes split into whole rows)
AGAIN_ROWS = 1_024  # the second batch of the fixed-share test: is anything repeated?
CLASSES = 3  # argmax: every step of the 10-class protocol, 3 comparisons per row instead of 45
MAX_BITS = 1 << 18  # bits per view at most (asserted)
ALPHA = 1e-6  # false alarm per statistic and view
Z_LIMIT = -NormalDist().inv_cdf(ALPHA / (2 * MAX_BITS))  # 6.94


def _chi2_limit(bits: int) -> float:
    """The upper ALPHA quantile of chi-square with `bits` degrees of freedom (Wilson-Hilferty)."""
    z, k = -NormalDist().inv_cdf(ALPHA), 2 / (9 * bits)
    return bits * (1 - k + z * math.sqrt(k)) ** 3


# -- recording a view ----------------------------------------------------------------------------


class RecordingChannel(InMemoryChannel):
    def __init__(self, inner: InMemoryChannel) -> None:
        self.__dict__.update(inner.__dict__)
        self.view: list[torch.Tensor] = []

    def exchange(self, tensors):
        received = super().exchange(tensors)
        self.view.extend(t.clone() for t in received)
        return received


_REQUEST_IDS = itertools.count()
Fn = Callable[[Party, torch.Tensor], torch.Tensor]


def _plan(fn: Fn, x0: torch.Tensor) -> tuple[Request, ...]:
    """What `fn` asks the dealer for on inputs of x0's shape (a dry run on zeros)."""
    recorder = PlanRecorder()
    fn(Party(0, NullChannel(), recorder, FP), x0)  # type: ignore[arg-type]
    return tuple(recorder.plan)


def _views(
    fn: Fn,
    x0: torch.Tensor,
    x1: torch.Tensor,
    dealer: Dealer | None = None,
    plan: tuple[Request, ...] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Everything party 0 and party 1 receive in one run of `fn` on the shares x0, x1."""
    rid = f"view-{next(_REQUEST_IDS)}"
    r0, r1 = deal_pair(dealer or Dealer(), rid, plan or _plan(fn, x0))
    a, b = InMemoryChannel.pair()
    rec = (RecordingChannel(a), RecordingChannel(b))
    run_two_party(lambda p: fn(p, x0 if p.index == 0 else x1), r0, r1, FP, channels=rec)
    return rec[0].view, rec[1].view


def _is_rows(t: torch.Tensor, rows: int) -> bool:
    """A ring tensor with one row per run, rather than bit planes [..., words] over all rows."""
    return t.dim() > 1 and t.shape[0] == rows


def _plane_bits(t: torch.Tensor, rows: int) -> np.ndarray:
    """[planes, rows, bits per row]: bit planes unpacked (bit k of word j is element 64 j + k of
    the rows' elements in C order)."""
    planes = t.contiguous().reshape(-1, t.shape[-1])
    per_row, rest = divmod(planes.shape[1] * 64, rows)
    assert per_row and not rest, f"{tuple(t.shape)}: neither rows nor whole-row planes"
    bits = np.unpackbits(planes.numpy().view(np.uint8), axis=1, bitorder="little")
    return bits.reshape(-1, rows, per_row)


def _row_bits(view: list[torch.Tensor], rows: int) -> torch.Tensor:
    """[rows, bits] uint8: the view cut into one row of bits per run (row of the batch): 64 bits
    per element of a ring tensor [rows, ...], one per element of a tensor of bit planes."""
    out = []
    for t in view:
        if _is_rows(t, rows):
            words = t.contiguous().reshape(rows, -1).numpy().view(np.uint8)
            out.append(np.unpackbits(words, axis=1, bitorder="little"))
        else:
            out.append(_plane_bits(t, rows).transpose(1, 0, 2).reshape(rows, -1))
    bits = torch.from_numpy(np.concatenate(out, axis=1))
    assert bits.shape[1] <= MAX_BITS, bits.shape
    return bits


LANES = 64  # rows per block: 64 rows' elements fill whole words of a bit plane


def _lane_bits(view: list[torch.Tensor], rows: int) -> torch.Tensor | None:
    """[rows / 64, bits] uint8: the view's bit planes with blocks of 64 rows as the runs, so that
    every bit keeps its lane (its bit position in a word); None without planes. Per row, a bias
    confined to one lane is spread over 64 rows; here it stays in its own bits."""
    out = [
        _plane_bits(t, rows).reshape(-1, rows // LANES, LANES * (t.shape[-1] * 64 // rows))
        for t in view
        if not _is_rows(t, rows)
    ]
    if not out:
        return None
    bits = torch.from_numpy(
        np.concatenate([b.transpose(1, 0, 2).reshape(rows // LANES, -1) for b in out], 1)
    )
    assert bits.shape[1] <= MAX_BITS, bits.shape
    return bits


# -- the statistics ------------------------------------------------------------------------------


def _ones(bits: torch.Tensor) -> torch.Tensor:
    """Per bit: how many runs have it set (numpy's sum over uint8 is far faster than torch's)."""
    return torch.from_numpy(bits.numpy().sum(0, dtype=np.int64)).double()


def _z_fair(bits: torch.Tensor) -> torch.Tensor:
    """Per bit: z-score of its fraction of ones over the runs against 1/2."""
    n = bits.shape[0]
    return (_ones(bits) - n / 2) / math.sqrt(n / 4)


def _z_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per bit: two-proportion z-score of its fractions of ones in two views (pooled variance)."""
    pa, pb = _ones(a) / a.shape[0], _ones(b) / b.shape[0]
    pooled = (pa + pb) / 2
    se = torch.sqrt(pooled * (1 - pooled) * (1 / a.shape[0] + 1 / b.shape[0]))
    return torch.where(se > 0, (pa - pb) / se.clamp(min=1e-300), (pa - pb) * math.inf).nan_to_num()


def _leaks(z: torch.Tensor) -> dict[str, str]:
    """Which statistics fire on these per-bit z-scores (none without a leak, but with ALPHA)."""
    assert 0 < len(z) <= MAX_BITS
    found = {}
    worst = int(z.abs().argmax())
    if abs(z[worst]) >= Z_LIMIT:
        found["max"] = f"bit {worst} of {len(z)}: |z| = {abs(z[worst]):.1f} >= {Z_LIMIT:.2f}"
    joint, limit = float((z**2).sum()), _chi2_limit(len(z))
    if joint >= limit:
        found["joint"] = f"sum z^2 = {joint:.0f} >= {limit:.0f} over {len(z)} bits"
    return found


def _assert_fair(bits: torch.Tensor, what: object) -> None:
    assert not (found := _leaks(_z_fair(bits))), (what, found)


def _assert_alike(a: torch.Tensor, b: torch.Tensor, what: object) -> None:
    assert a.shape[1] == b.shape[1], (what, a.shape, b.shape)
    assert not (found := _leaks(_z_apart(a, b))), (what, found)


# -- two secrets ---------------------------------------------------------------------------------


def _assert_independent(fn: Fn, a: torch.Tensor, b: torch.Tensor, dealer=None) -> int:
    """Party 0's view (plus its own input share) on secrets a and b (ROWS rows each): fair
    bits under each, and the same under both, per row and per lane. Returns the number of
    tensors in the view."""
    plan, views = _plan(fn, a), []
    for secret in (a, b):
        x0, x1 = share(secret)
        views.append([*_views(fn, x0, x1, dealer, plan)[0], x0])
    assert [t.shape for t in views[0]] == [t.shape for t in views[1]]
    for cut in (_row_bits, _lane_bits):
        bits = [cut(view, ROWS) for view in views]
        if bits[0] is not None:
            _assert_fair(bits[0], ("secret a", cut.__name__))
            _assert_fair(bits[1], ("secret b", cut.__name__))
            _assert_alike(*bits, ("one secret against the other", cut.__name__))
    return len(views[0])


def _secret(value: float, width: int, rows: int = ROWS) -> torch.Tensor:
    return FP.encode(torch.full((rows, width), value, dtype=torch.float64))


PROTOCOLS = protocols.GATES  # every simple comparison protocol, from the registry
FRESH_BITS_AT_LEAST = {"a2b": 100, "lut": 100, "fss": 64}  # fss opens one word and 2 planes


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_relu_view_does_not_depend_on_the_sign_or_value(protocol):
    relu = lambda p, x: PROTOCOLS[protocol].relu(p, x, 16)  # noqa: E731
    tensors = _assert_independent(relu, _secret(3.25, 1) << 16, _secret(-1000.5, 1) << 16)
    assert tensors >= 3  # at least one message per round


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_argmax_view_does_not_depend_on_the_label(protocol):
    logits_a = torch.zeros(ROWS, CLASSES, dtype=torch.int64)
    logits_b = torch.zeros(ROWS, CLASSES, dtype=torch.int64)
    logits_a[:, 0] = 1 << 20
    logits_b[:, 2] = 1 << 30
    _assert_independent(PROTOCOLS[protocol].argmax, logits_a, logits_b)


# -- linear layers with a fixed weight mask (`beaver.linear`, as the service runs them) ----------

LAYERS = {  # op: (params, input shape per row, weight)
    "matmul": ((), (12,), torch.linspace(-2, 2, 36).reshape(12, 3)),
    "conv2d": ((1, 1), (1, 4, 4), torch.linspace(-2, 2, 18).reshape(2, 1, 3, 3)),
    "conv2d_pool": ((1, 0, 2), (1, 5, 5), torch.linspace(-2, 2, 8).reshape(2, 1, 2, 2)),
}


def _weight_layer(op: str, dealer: Dealer, w: torch.Tensor) -> Fn:
    """`beaver.linear` with op's weight w (fixed shares, one fixed mask from `dealer`), after the
    model's one opening of E = W - b (here, on one row), as every later query runs it."""
    params, shape, _ = LAYERS[op]
    w_shares = share(FP.encode(w))
    masks = (WeightMasks("model"), WeightMasks("model"))

    def layer(p: Party, x: torch.Tensor) -> torch.Tensor:
        dry = isinstance(p.channel, NullChannel)  # a plan's dry run must not "open" zeros
        m = WeightMasks("model") if dry else masks[p.index]
        return beaver.linear(p, x, w_shares[p.index], "w", m, op, params)

    _views(layer, *share(FP.encode(torch.ones(1, *shape, dtype=torch.float64))), dealer)
    assert torch.equal(masks[0].opened["w"], masks[1].opened["w"])
    return layer


@pytest.mark.parametrize("op", LAYERS)
def test_linear_layer_with_a_fixed_weight_mask_view_does_not_depend_on_the_input(op):
    """Step 3 as the service runs it: d = x - a, with a fresh, against E opened once per model."""
    dealer, (_, shape, w) = Dealer(), LAYERS[op]
    layer = _weight_layer(op, dealer, w)
    a = FP.encode(torch.full((ROWS, *shape), 1.5, dtype=torch.float64))
    b = FP.encode(torch.linspace(-1000, 1000, math.prod(shape)).repeat(ROWS, 1).reshape(a.shape))
    assert _assert_independent(layer, a, b, dealer) == 2  # d, and party 0's own share


@pytest.mark.parametrize("op", LAYERS)
def test_with_fixed_shares_a_linear_layer_with_a_fixed_weight_mask_receives_only_fresh_words(op):
    dealer, (_, shape, w) = Dealer(), LAYERS[op]
    layer = _weight_layer(op, dealer, w)
    row = share(FP.encode(torch.randn(1, *shape, dtype=torch.float64)))
    assert _assert_fresh(layer, *row, dealer) >= 64 * math.prod(shape)


def _first_opening(dealer: Dealer, w: torch.Tensor) -> torch.Tensor:
    """[2, W's elements]: E = W - b opened by a model's first query, and the share of it that
    party 0 receives (w1 - b1), for W's fixed shares and the fixed mask b from `dealer`."""
    w0, w1 = share(FP.encode(w))
    masks = (WeightMasks("model"), WeightMasks("model"))
    x = share(FP.encode(torch.ones(1, w.shape[0], dtype=torch.float64)))

    def layer(p: Party, xs: torch.Tensor) -> torch.Tensor:
        dry = isinstance(p.channel, NullChannel)  # a plan's dry run must not "open" zeros
        m = WeightMasks("model") if dry else masks[p.index]
        return beaver.linear(p, xs, (w0, w1)[p.index], "w", m)

    view0, _ = _views(layer, *x, dealer)
    assert [t.shape for t in view0] == [x[0].shape, w.shape]  # d and e, in one round
    assert torch.equal(masks[0].opened["w"], masks[1].opened["w"])
    return torch.stack([masks[0].opened["w"].reshape(-1), view0[1].reshape(-1)])


DEALERS = 4  # fresh dealers (fresh masks b) per weight; 4,096 elements each


def _first_openings(w: torch.Tensor) -> torch.Tensor:
    """[DEALERS, 2, W's elements]: `_first_opening` for fresh dealers."""
    return torch.stack([_first_opening(Dealer(), w) for _ in range(DEALERS)])


def _bits_per_element(e: torch.Tensor) -> torch.Tensor:
    """[elements and dealers, 64 bits per opened word]: a constant W's elements are runs too."""
    e = e.transpose(0, 1).reshape(2, -1).t().contiguous()
    return torch.from_numpy(np.unpackbits(e.numpy().view(np.uint8), axis=1, bitorder="little"))


W_A, W_B = torch.zeros(64, 64), torch.full((64, 64), -1000.25)


def test_the_opened_masked_weight_is_uniform_whatever_the_weight_and_fresh_per_dealer():
    """b is fixed per model, so a model opens E = W - b once: one sample. Across fresh dealers
    (and over a constant W's elements, each with its own mask) E and the share of it party 0
    receives are uniform, the same for two different W, and independent from dealer to dealer
    (so b comes from the dealer's secret key, not from the public mask id and weight name)."""
    e_a, e_b = _first_openings(W_A), _first_openings(W_B)
    bits_a, bits_b = _bits_per_element(e_a), _bits_per_element(e_b)
    _assert_fair(bits_a, "W_A")
    _assert_fair(bits_b, "W_B")
    _assert_alike(bits_a, bits_b, "W_A against W_B")
    _assert_fair(_bits_per_element(e_a[:1] ^ e_a[1:2]), "two dealers, one W")


def test_the_weight_statistic_catches_a_mask_that_every_dealer_shares(monkeypatch):
    # Negative control: a fixed mask made without the dealer's key (anyone who knows the mask
    # id and the weight's name could compute it, and W = E + b).
    def keyless(self: Dealer, req: Request, party: int) -> bytes:
        msg = b"%s\x00%s\x00%d" % (
            str(req.params[-2]).encode(),
            str(req.params[-1]).encode(),
            party,
        )
        return hmac.new(b"no key", msg, hashlib.sha256).digest()

    monkeypatch.setattr(Dealer, "_mask_seed", keyless)
    e = _first_openings(W_A)
    _assert_fair(_bits_per_element(e[:1]), "one dealer's E alone still looks uniform")
    assert "max" in _leaks(_z_fair(_bits_per_element(e[:1] ^ e[1:2])))


# -- the controls of the two-secret statistics ---------------------------------------------------


def _noise(rows: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, (rows, 1), generator=gen, dtype=torch.int64)


def test_the_statistic_catches_a_one_bit_leak():
    # Negative control: a view that carries the sign bit in the clear must fail the test.
    gen = torch.Generator().manual_seed(1)
    pos, neg = _secret(3.25, 1), _secret(-3.25, 1)
    noise = _noise(ROWS, gen)
    leak_a, leak_b = [noise, (pos >> 63) & 1], [noise, (neg >> 63) & 1]
    assert "max" in _leaks(_z_apart(_row_bits(leak_a, ROWS), _row_bits(leak_b, ROWS)))


def test_the_statistics_catch_one_bit_biased_by_five_hundredths():
    # Negative control: bit 0 of a received word is the secret's sign one time in ten and a
    # fair coin otherwise: P(bit = sign) = 0.55, a bias of 0.05 (expected z 12.8 against each
    # fair coin, 18.1 between the two secrets). The other 63 bits and a word beside it are fair.
    gen = torch.Generator().manual_seed(2)
    told = torch.rand(ROWS, 1, generator=gen) < 0.1

    def view(value: float) -> list[torch.Tensor]:
        sign = (_secret(value, 1) >> 63) & 1
        word = _noise(ROWS, gen)
        return [_noise(ROWS, gen), torch.where(told, (word & ~1) | sign, word)]

    bits_a, bits_b = _row_bits(view(3.25), ROWS), _row_bits(view(-3.25), ROWS)
    for bits in (bits_a, bits_b):
        assert "max" in _leaks(_z_fair(bits))
        assert _leaks(_z_fair(torch.cat([bits[:, :64], bits[:, 65:]], 1))) == {}  # only bit 0
    assert "max" in _leaks(_z_apart(bits_a, bits_b))


def test_the_joint_statistic_catches_biases_too_small_for_any_one_bit():
    # Negative control: 512 bits (8 words) each biased by 0.01 (expected z 2.6 each, far below
    # the limit) among 3,520 fair bits: the sum of z^2 is about 3,400 over its mean, where the
    # limit is about 440 over it.
    gen = torch.Generator().manual_seed(3)
    fair = [_noise(ROWS, gen) for _ in range(55)]
    bits = (torch.rand(ROWS, 8 * 64, generator=gen) < 0.51).numpy().astype(np.uint8)
    biased = [torch.from_numpy(np.packbits(bits, axis=1, bitorder="little").view(np.int64))]
    assert _leaks(_z_fair(_row_bits(fair, ROWS))) == {}
    assert set(_leaks(_z_fair(_row_bits([*fair, *biased], ROWS)))) == {"joint"}


def test_the_lane_statistic_catches_a_bias_in_one_lane():
    # Negative control: a bit plane whose lane 0 is 1 with probability 0.8 (a bias of 0.3 on
    # 1/64 of the elements): per row that is 0.005 (expected z 1.2), per lane z 9.6 (limit 6.94).
    gen = torch.Generator().manual_seed(4)
    ones = torch.rand(ROWS // LANES, LANES, generator=gen) < torch.tensor([0.8] + [0.5] * 63)
    packed = np.packbits(ones.numpy().astype(np.uint8), axis=1, bitorder="little")
    plane = torch.from_numpy(packed.view(np.int64)).reshape(1, -1)
    view = [_noise(ROWS, gen), plane]
    assert _leaks(_z_fair(_row_bits(view, ROWS))) == {}
    assert "max" in _leaks(_z_fair(_lane_bits(view, ROWS)))


# -- fixed shares --------------------------------------------------------------------------------


def _assert_fresh(fn: Fn, row0: torch.Tensor, row1: torch.Tensor, dealer=None) -> int:
    """Both parties' views with the input shares row0, row1 (one row) in every run: a batch of
    ROWS such rows has fair bits, and XORed with a second batch (the same dealer, a fresh
    request id) too. Returns the fewer bits per run of the two parties' views."""
    dealer = dealer or Dealer()

    def batch(rows: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x0, x1 = (r.expand(rows, *r.shape[1:]).clone() for r in (row0, row1))
        return _views(fn, x0, x1, dealer)

    first, again = batch(ROWS), batch(AGAIN_ROWS)
    sizes = []
    for party in (0, 1):
        bits, lanes = _row_bits(first[party], ROWS), _lane_bits(first[party], ROWS)
        _assert_fair(bits, (fn, party))
        if lanes is not None:
            _assert_fair(lanes, (fn, party, "lanes"))
        _assert_fair(bits[:AGAIN_ROWS] ^ _row_bits(again[party], AGAIN_ROWS), (fn, party, "again"))
        sizes.append(bits.shape[1])
    return min(sizes)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_with_fixed_shares_every_received_word_is_fresh(protocol):
    cmp = PROTOCOLS[protocol]
    relu = lambda p, x: cmp.relu(p, x, 16)  # noqa: E731
    logits = torch.zeros(1, CLASSES, dtype=torch.int64)
    logits[:, 2] = 1 << 20
    for fn, secret in ((relu, _secret(-3.25, 1, 1) << 16), (cmp.argmax, logits)):
        assert _assert_fresh(fn, *share(secret)) > FRESH_BITS_AT_LEAST[protocol]


def test_with_fixed_shares_the_relu_fused_with_a_linear_layer_receives_only_fresh_words():
    """The last ReLU and the layer after it in one round (`beaver.select_linear`): after the
    weight's one opening (W - b, the same every time by design, see `beaver`), every word a
    party receives is fresh."""
    dealer, w = Dealer(), share(FP.encode(torch.linspace(-2, 2, 30).reshape(10, 3)))
    masks = (WeightMasks("sec"), WeightMasks("sec"))

    def fused(p: Party, x: torch.Tensor) -> torch.Tensor:
        sel = partial(beaver.select_linear, w=w[p.index], name="w", masks=masks[p.index])
        return comparison.relu(p, x, 16, select=sel)

    x0, x1 = share((_secret(-3.25, 1, 10) << 16).reshape(1, 10))
    recorder = PlanRecorder()
    fused(Party(0, NullChannel(), recorder, FP), x0)  # type: ignore[arg-type]
    masks[0].opened.clear()  # the dry run "opened" zeros; the first real run opens W - b
    r0, r1 = deal_pair(dealer, "warm-up", tuple(recorder.plan))
    run_two_party(lambda p: fused(p, x0 if p.index == 0 else x1), r0, r1, FP)
    assert torch.equal(masks[0].opened["w"], masks[1].opened["w"])
    assert _assert_fresh(fused, x0, x1, dealer) > 100


def _leaky(p: Party, x: torch.Tensor, told: float = 0.0) -> torch.Tensor:
    """A round that sends x ^ (fresh word), except that bit 0 is x's own with probability
    `told`: the fraction of ones of that bit moves by told / 2 towards the fixed share's bit."""
    t = p.rand.take(Request.and_(x.shape))  # fresh randomness, as a protocol has
    tell = ((t["a"] >> 1) & 1023) < round(told * 1024)
    (theirs,) = p.channel.exchange([x ^ torch.where(tell, t["a"] & ~1, t["a"])])
    return theirs


def test_the_fixed_share_statistic_catches_an_unmasked_share():
    # Negative control: a round that sends party 1's share as it is must fail the test,
    # although that share is uniform on its own.
    def unmasked(p: Party, x: torch.Tensor) -> torch.Tensor:
        t = p.rand.take(Request.and_(x.shape))  # fresh randomness alongside, as a protocol has
        (theirs,) = p.channel.exchange([x])
        return theirs ^ t["a"]

    with pytest.raises(AssertionError, match="max"):
        _assert_fresh(unmasked, *share(_secret(-3.25, 1, 1)))
    _assert_fresh(_leaky, *share(_secret(-3.25, 1, 1)))  # the same round, masked: passes


def test_the_fixed_share_statistic_catches_one_bit_biased_by_five_hundredths():
    # Negative control: bit 0 of the word sent is the fixed share's own one time in ten (103 in
    # 1,024): a bias of 0.05 (expected z 12.9 against the limit of 6.94).
    x0, x1 = share(_secret(-3.25, 1, 1))
    told = partial(_leaky, told=0.1)
    with pytest.raises(AssertionError, match=r"'max': 'bit 0 of 64:"):
        _assert_fresh(told, x0, x1)


def test_the_fixed_share_statistic_catches_a_dealer_that_repeats_its_randomness(monkeypatch):
    # Negative control: a dealer whose seeds ignore the request id gives every run the same
    # masks. Each batch alone looks fair (its rows still get different masks); XORed with the
    # second batch, the first opening is all zeros.
    seed = Dealer._seed
    monkeypatch.setattr(Dealer, "_seed", lambda self, rid, party: seed(self, "same", party))
    relu = lambda p, x: lut.relu(p, x, 16)  # noqa: E731
    with pytest.raises(AssertionError, match="again"):
        _assert_fresh(relu, *share(_secret(-3.25, 1, 1) << 16))


# -- identity: the dealer serves party p's material to party p only -----------------------------


def _served_or_refused(url: str, key: bytes, party: int, plan) -> httpx.Response:
    from service.api import auth
    from service.api.transport import wire
    from service.mpc.dealer import new_run_id

    body = json.dumps(
        {"request_id": new_run_id(), "party": party, "plan": wire.plan_to_json(plan)}
    ).encode()
    headers = {auth.AUTH_HEADER: auth.dealer_tag(key, party, body)}
    return httpx.post(f"{url}/v1/randomness", content=body, headers=headers, timeout=60)


def _weight_plan():
    from service.cluster import DEFAULT_MODEL
    from service.store import load_share

    model = load_share(DEFAULT_MODEL, 0, "lut")
    plan = model.network.plan(1, "label", model.weight_shapes, model.mask_id)
    return model, plan


def test_the_peers_weight_mask_seeds_would_give_away_the_weights():
    """Why the dealer must refuse: the positive control of the attack below, in process.

    A weight's fixed mask b does not depend on the run id, so party 1's mask seeds from any
    fresh run id, added to party 0's own, give b; the replicas open E = W - b once per model,
    and W = E + b."""
    from service.cluster import DEFAULT_MODEL
    from service.mpc.dealer import WEIGHT_MASK_KINDS
    from service.mpc.prg import PRG
    from service.store import load_share

    model0, plan = _weight_plan()
    model1 = load_share(DEFAULT_MODEL, 1, "lut")
    dealer = Dealer()
    own = dealer.deal("an-honest-run-id-00", 0, plan)
    stolen = dealer.deal("a-fresh-run-id-0001", 1, plan)  # what the dealer must never serve
    masked = [r for r in plan if r.kind in WEIGHT_MASK_KINDS]
    assert masked and len(own.mask_seeds) == len(masked)
    for req, s0, s1 in zip(masked, own.mask_seeds, stolen.mask_seeds, strict=True):
        name, shape = str(req.params[-1]), req.shapes[1]
        b0, b1 = PRG(s0).ring(shape), PRG(s1).ring(shape)
        w0, w1 = model0.weights[name].reshape(shape), model1.weights[name].reshape(shape)
        opened = (w0 - b0) + (w1 - b1)  # E, public to both replicas
        assert torch.equal(opened + b0 + b1, w0 + w1)  # the whole weight, in replica 0's hands


def test_replica_cannot_obtain_peer_material(tmp_path):
    """Replica 0, with every credential it holds, asks a real dealer process for party 1's
    material (weight masks included) under fresh run ids: refused, 403 and counted."""
    from service.cluster import Cluster, free_ports
    from service.mpc.dealer import WEIGHT_MASK_KINDS

    _, plan = _weight_plan()
    masks_only = tuple(r for r in plan if r.kind in WEIGHT_MASK_KINDS)
    c = Cluster(ports=free_ports(3), log_dir=tmp_path).prepare()
    c.start_process("dealer")
    try:
        _wait_healthy(c)
        own = c.key("replica-0", "dealer.key")
        assert _served_or_refused(c.dealer_url, own, 0, plan).status_code == 200  # its own: yes
        for wanted in (plan, masks_only):
            r = _served_or_refused(c.dealer_url, own, 1, wanted)
            assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_party", r.text
            for name in ("peer.key", "admin.key"):  # its other keys are no key to the dealer
                r = _served_or_refused(c.dealer_url, c.key("replica-0", name), 1, wanted)
                assert r.status_code == 401, r.text
        metrics = httpx.get(f"{c.dealer_url}/metrics", timeout=10).text
        assert 'privdigit_dealer_refused_total{code="wrong_party"} 2.0' in metrics
        assert 'privdigit_dealer_served_total{party="1"}' not in metrics
    finally:
        c.stop()


def _wait_healthy(c) -> None:
    import time

    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{c.dealer_url}/v1/health", timeout=2, verify=c.verify).is_success:
                return
        except httpx.HTTPError:
            pass
        assert c.procs["dealer"].poll() is None, c.tail("dealer")
        assert time.monotonic() < deadline, c.tail("dealer")
        time.sleep(0.1)
