"""Beaver mul, matmul and conv2d against plaintext torch, exact on the ring."""

import secrets

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from service.mpc import beaver
from service.mpc.prg import random_ring
from tests.conftest import FP, opened, run_shared

ring_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 2**16, -(2**16) - 1]),
)


@given(st.lists(st.tuples(ring_values, ring_values), min_size=1, max_size=64))
def test_mul_is_exact_on_the_whole_ring(pairs):
    x = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    y = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    result = run_shared(beaver.mul, x, y)
    assert torch.equal(opened(result), x * y)
    assert result.stats0.rounds == 1
    assert result.stats0.bytes_sent == 16 * len(pairs)


@given(st.integers(1, 64), st.integers(1, 40), st.integers(1, 12))
def test_matmul_matches_torch(batch, inner, out):
    x, w = random_ring((batch, inner)), random_ring((inner, out))
    result = run_shared(beaver.matmul, x, w)
    assert torch.equal(opened(result), x @ w)
    assert result.stats1.rounds == 1
    assert result.stats1.bytes_sent == 8 * (x.numel() + w.numel())


@given(st.sampled_from([1, 3, 64]), st.sampled_from([(1, 0), (2, 1)]))
def test_conv2d_matches_torch_on_fixed_point_reals(batch, stride_padding):
    stride, padding = stride_padding
    x = torch.randn(batch, 2, 9, 9, dtype=torch.float64)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    result = run_shared(
        lambda p, a, b: beaver.conv2d(p, a, b, stride=stride, padding=padding),
        FP.encode(x),
        FP.encode(w),
    )
    got = FP.decode(opened(result), frac_bits=2 * FP.frac_bits)
    want = F.conv2d(x, w, stride=stride, padding=padding)
    assert (got - want).abs().max() < 1e-3


def _run_linear(dealer, masks, x, w, op="matmul", params=()):
    """Both parties' `beaver.linear` with their own WeightMasks objects (kept across calls)."""
    from service.mpc.channel import NullChannel
    from service.mpc.dealer import PlanRecorder, deal_pair
    from service.mpc.inprocess import run_two_party
    from service.mpc.party import Party
    from service.mpc.sharing import share

    xs, ws = share(x), share(w)
    rec = PlanRecorder()
    dry = beaver.WeightMasks(masks[0].mask_id)
    beaver.linear(Party(0, NullChannel(), rec, FP), xs[0], ws[0], "w", dry, op, params)
    r0, r1 = deal_pair(dealer, secrets.token_hex(8), tuple(rec.plan))
    return run_two_party(
        lambda p: beaver.linear(p, xs[p.index], ws[p.index], "w", masks[p.index], op, params),
        r0,
        r1,
        FP,
    )


def test_linear_with_a_fixed_weight_mask_opens_the_weight_once():
    from service.mpc.dealer import Dealer

    dealer, w = Dealer(), random_ring((5, 3))
    masks = (beaver.WeightMasks("model-a"), beaver.WeightMasks("model-a"))
    for i in range(3):
        x = random_ring((4, 5))
        result = _run_linear(dealer, masks, x, w)
        assert torch.equal(opened(result), x @ w)
        assert result.stats0.rounds == 1
        assert result.stats0.bytes_sent == 8 * (x.numel() + (w.numel() if i == 0 else 0))
    opened_once = masks[0].opened["w"]
    assert torch.equal(opened_once, masks[1].opened["w"])
    # The same weight under another model's mask id is masked by an independent b.
    other = (beaver.WeightMasks("model-b"), beaver.WeightMasks("model-b"))
    _run_linear(dealer, other, random_ring((4, 5)), w)
    assert not torch.equal(other[0].opened["w"], opened_once)


def test_linear_with_a_fixed_mask_for_convolutions():
    from service.mpc.dealer import Dealer

    dealer, w = Dealer(), FP.encode(torch.randn(4, 2, 3, 3))
    masks = (beaver.WeightMasks("conv"), beaver.WeightMasks("conv"))
    for _ in range(2):
        x = FP.encode(torch.randn(2, 2, 6, 6))
        result = _run_linear(dealer, masks, x, w, "conv2d", (1, 1))
        want = F.conv2d(x.double(), w.double(), padding=1)
        assert torch.equal(opened(result), want.long())


@given(st.sampled_from([1, 5]), st.sampled_from([(1, 0, 2), (1, 1, 2), (2, 1, 3)]))
def test_conv_then_sum_pool_as_one_bilinear_op_is_exact(batch, params):
    """conv2d_pool: the Beaver product of a convolution followed by k x k sum pooling, with the
    dealer's c already pooled (k^2 times smaller), fixed weight masks, exact on the ring."""
    from service.mpc.dealer import Dealer

    stride, padding, k = params
    side = {2: 10, 3: 11}[k]  # (side + 2 padding - 3) // stride + 1 divisible by k
    dealer, w = Dealer(), random_ring((4, 2, 3, 3))
    masks = (beaver.WeightMasks("pool"), beaver.WeightMasks("pool"))
    for _ in range(2):  # opens W - b, then reuses it
        x = random_ring((batch, 2, side, side))
        result = _run_linear(dealer, masks, x, w, "conv2d_pool", params)
        y = F.conv2d(x, w, stride=stride, padding=padding)
        n, c, h, wd = y.shape
        assert h % k == 0 and wd % k == 0
        want = y.reshape(n, c, h // k, k, wd // k, k).sum(dim=(3, 5))
        assert torch.equal(opened(result), want)
