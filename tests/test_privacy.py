"""Central DP: clipping bounds the norm, noise scale, accountant monotonicity."""

from __future__ import annotations

import math

import pytest
import torch

from training.privacy import add_noise, clip_update, epsilon, global_norm, secure_generator


def test_clip_bounds_norm_and_keeps_small_updates() -> None:
    g = torch.Generator().manual_seed(0)
    update = [torch.randn(3, 4, generator=g) * 10, torch.randn(7, generator=g) * 10]
    clipped, scale = clip_update(update, 1.5)
    assert global_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    assert 0 < scale < 1
    small = [t * 1e-3 for t in update]
    same, s = clip_update(small, 1.5)
    assert s == 1.0
    assert all(torch.equal(a, b) for a, b in zip(same, small, strict=True))
    zero, s0 = clip_update([torch.zeros(3)], 1.0)
    assert s0 == 1.0 and torch.equal(zero[0], torch.zeros(3))
    with pytest.raises(ValueError):
        clip_update(update, 0.0)


def test_noise_std_and_reproducibility() -> None:
    total = [torch.zeros(200_000)]
    noised = add_noise(total, 1.2, 0.5, secure_generator(1))
    assert float(noised[0].std()) == pytest.approx(0.6, rel=0.02)
    again = add_noise(total, 1.2, 0.5, secure_generator(1))
    assert torch.equal(noised[0], again[0])
    fresh_a, fresh_b = add_noise(total, 1.0, 1.0), add_noise(total, 1.0, 1.0)
    assert not torch.equal(fresh_a[0], fresh_b[0])
    assert torch.equal(add_noise(total, 0.0, 1.0)[0], total[0])


def test_epsilon_monotone() -> None:
    e10 = epsilon(1.0, 0.1, 10, 1e-5)
    e20 = epsilon(1.0, 0.1, 20, 1e-5)
    assert 0 < e10 < e20 < math.inf
    assert epsilon(2.0, 0.1, 20, 1e-5) < e20
    assert epsilon(1.0, 0.05, 20, 1e-5) < e20
    assert epsilon(1.0, 0.1, 20, 1e-3) < e20
    assert epsilon(0.0, 0.1, 5, 1e-5) == math.inf
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0


def test_epsilon_known_value() -> None:
    # Full-batch Gaussian, sigma=1, one release: RDP gives roughly eps ~ 4-5 at delta=1e-5
    # (the optimal analytic value is ~3.7; RDP conversion is a bit looser).
    e = epsilon(1.0, 1.0, 1, 1e-5)
    assert 3.5 < e < 5.5


def test_epsilon_bad_args() -> None:
    with pytest.raises(ValueError):
        epsilon(1.0, 0.0, 1, 1e-5)
    with pytest.raises(ValueError):
        epsilon(1.0, 0.1, 1, 0.0)
