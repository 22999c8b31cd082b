"""Beaver mul, matmul and conv2d against plaintext torch, exact on the ring."""

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
