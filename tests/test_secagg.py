"""Secure aggregation: shares look uniform, the opened sum is exact to 2^-20."""

from __future__ import annotations

import pytest
import torch

from service.mpc.ring import EncodingError
from training.secagg import (
    MAX_CLIENT_ABS,
    Aggregator,
    client_shares,
    reconstruct_sum,
    secure_sum,
    unflatten,
)


def updates(k: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(16, 5, 5, generator=g) * 0.1, torch.randn(10, generator=g)] for _ in range(k)
    ]


def test_each_share_alone_looks_uniform() -> None:
    ups = updates(5)
    weights = [600, 300, 12, 1, 999]
    agg0, agg1 = Aggregator(0, 410), Aggregator(1, 410)
    for u, w in zip(ups, weights, strict=True):
        s0, s1 = client_shares(u, w)
        for s in (s0, s1):
            top = ((s >> 63) & 1).double().mean().item()
            assert 0.4 < top < 0.6
        agg0.receive(s0)
        agg1.receive(s1)
    for agg in (agg0, agg1):
        top = ((agg.total >> 63) & 1).double().mean().item()
        assert 0.4 < top < 0.6
        low = (agg.total & 1).double().mean().item()
        assert 0.4 < low < 0.6
    total = unflatten(reconstruct_sum(agg0, agg1), ups[0])
    for i in range(2):
        expect = sum(u[i].double() * w for u, w in zip(ups, weights, strict=True))
        assert torch.allclose(total[i], expect, atol=len(ups) * 2.0**-24, rtol=0)


def test_secure_sum_matches_plaintext_weighted_sum() -> None:
    ups = updates(10, seed=3)
    weights = [float(600 + 7 * k) for k in range(10)]
    got = secure_sum(ups, weights)
    for i in range(2):
        expect = sum(u[i].double() * w for u, w in zip(ups, weights, strict=True))
        err = (got[i] - expect).abs().max().item()
        assert err <= 2.0**-20 * max(1.0, expect.abs().max().item())
        assert got[i].dtype == torch.float64


def test_magnitude_check_and_mismatch() -> None:
    with pytest.raises(EncodingError):
        client_shares([torch.tensor([MAX_CLIENT_ABS])])
    with pytest.raises(EncodingError):
        client_shares([torch.tensor([float("nan")])])
    agg = Aggregator(0, 3)
    with pytest.raises(ValueError):
        agg.receive(torch.zeros(4, dtype=torch.int64))
    other = Aggregator(1, 3)
    agg.receive(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        reconstruct_sum(agg, other)
