"""Beaver mul, matmul and conv2d against plaintext torch, exact on the ring."""

import secrets

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from service.mpc import beaver
from service.mpc.dealer import POOLED_KERNEL_MAX_CHANNELS, Dealer, bilinear
from service.mpc.prg import random_ring
from service.mpc.ring import to_plane
from service.mpc.sharing import share, share_xor
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


def _run_with_masks(dealer, masks, fn):
    """`fn(party, masks)` for both parties with their own WeightMasks objects (kept across
    calls), after a dry run that records the plan."""
    from service.mpc.channel import NullChannel
    from service.mpc.dealer import PlanRecorder, deal_pair
    from service.mpc.inprocess import run_two_party
    from service.mpc.party import Party

    rec = PlanRecorder()
    fn(Party(0, NullChannel(), rec, FP), beaver.WeightMasks(masks[0].mask_id))
    r0, r1 = deal_pair(dealer, secrets.token_hex(8), tuple(rec.plan))
    return run_two_party(lambda p: fn(p, masks[p.index]), r0, r1, FP)


def _run_linear(dealer, masks, x, w, op="matmul", params=()):
    """Both parties' `beaver.linear` with their own WeightMasks objects (kept across calls)."""
    xs, ws = share(x), share(w)
    return _run_with_masks(
        dealer, masks, lambda p, m: beaver.linear(p, xs[p.index], ws[p.index], "w", m, op, params)
    )


def test_linear_with_a_fixed_weight_mask_opens_the_weight_once():
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


@given(
    st.sampled_from([1, 3, 64]),
    st.sampled_from([(1, 1), (7, 3), (100, 10)]),
    st.lists(ring_values, min_size=1, max_size=8),
)
def test_select_fused_with_a_linear_layer_is_exact_on_the_whole_ring(batch, dims, edges):
    """(x * b) @ W for XOR-shared bits b in the select's one round: the same as the select and
    then the product, on random and extreme ring values, the weight opened once."""
    n, m = dims
    dealer, w = Dealer(), random_ring((n, m))
    w.view(-1)[: len(edges)] = torch.tensor(edges)[: w.numel()]
    masks = (beaver.WeightMasks("fused"), beaver.WeightMasks("fused"))
    for i in range(2):
        x, bits = random_ring((batch, n)), torch.randint(0, 2, (batch, n))
        x.view(-1)[: len(edges)] = torch.tensor(edges)[: x.numel()]
        xs, ws, bs = share(x), share(w), share_xor(bits)

        def fused(p, mk, xs=xs, ws=ws, bs=bs):
            return beaver.select_linear(p, xs[p.index], to_plane(bs[p.index]), ws[p.index], "w", mk)

        result = _run_with_masks(dealer, masks, fused)
        assert torch.equal(opened(result), (x * bits) @ w)
        assert result.stats0.rounds == result.stats1.rounds == 1
        plane_bytes = 8 * -(-x.numel() // 64)
        first = w.numel() if i == 0 else 0
        assert result.stats0.bytes_sent == 8 * (x.numel() + first) + plane_bytes
    assert torch.equal(masks[0].opened["w"], masks[1].opened["w"])


def test_select_fused_with_a_linear_layer_takes_its_dealer_products_from_the_weight_mask():
    """The dealer's products use the same fixed mask as `linear` for that weight: a weight opened
    by one is reused by the other, and the results stay exact."""
    dealer, w = Dealer(), random_ring((6, 4))
    masks = (beaver.WeightMasks("shared"), beaver.WeightMasks("shared"))
    x = random_ring((2, 6))
    assert torch.equal(opened(_run_linear(dealer, masks, x, w)), x @ w)
    bits = torch.randint(0, 2, (2, 6))
    xs, ws, bs = share(x), share(w), share_xor(bits)
    result = _run_with_masks(
        dealer,
        masks,
        lambda p, mk: beaver.select_linear(
            p, xs[p.index], to_plane(bs[p.index]), ws[p.index], "w", mk
        ),
    )
    assert torch.equal(opened(result), (x * bits) @ w)
    assert result.stats0.bytes_sent == 8 * x.numel() + 8  # the weight was already open


@pytest.mark.parametrize("channels", [1, POOLED_KERNEL_MAX_CHANNELS, 8])
def test_conv_pool_by_pooled_kernel_or_by_pooling_is_the_same_on_the_ring(channels):
    """The two ways `conv2d_pool` is computed (one stride-k convolution with the pooled kernel
    for few input channels, convolution then sum pooling otherwise) agree exactly, wrap-around
    included."""
    x, w = random_ring((3, channels, 12, 12)), random_ring((4, channels, 5, 5))
    for padding in (0, 2):
        y = F.conv2d(x, w, padding=padding)
        n, c, h, wd = y.shape
        want = y.reshape(n, c, h // 2, 2, wd // 2, 2).sum(dim=(3, 5))
        assert torch.equal(bilinear("conv2d_pool", (1, padding, 2))(x, w), want)
