"""Central differential privacy for FedAvg: per-client clipping, Gaussian noise, RDP accounting.

DP-FedAvg (McMahan et al. 2018): each sampled client's update is clipped to L2 norm ``clip``,
the server sums the clipped updates, adds ``N(0, (noise_multiplier * clip)^2)`` to every
coordinate of the SUM, and divides by the expected cohort size. The accountant treats one round
as a Poisson-subsampled Gaussian mechanism with rate ``sample_rate`` (fixed-size sampling
without replacement is the usual approximation of it).

Noise comes from a ``torch.Generator`` seeded from ``os.urandom`` unless a caller passes a
generator (tests do, for reproducibility).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import dp_accounting
import torch
from dp_accounting.rdp import RdpAccountant


def global_norm(update: Sequence[torch.Tensor]) -> float:
    """L2 norm of all tensors in ``update`` taken together (float64 accumulation)."""
    total = sum(float(t.detach().double().pow(2).sum()) for t in update)
    return math.sqrt(total)


def clip_update(update: Sequence[torch.Tensor], clip: float) -> tuple[list[torch.Tensor], float]:
    """Scale ``update`` so its global L2 norm is at most ``clip``; returns (clipped, scale)."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    norm = global_norm(update)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return [t * scale for t in update], scale


def secure_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator seeded from 64 bits of ``os.urandom`` (or ``seed``, for tests only)."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
    return g


def add_noise(
    sum_update: Sequence[torch.Tensor],
    noise_multiplier: float,
    clip: float,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Add Gaussian noise with std ``noise_multiplier * clip`` to each coordinate of the sum."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    std = float(noise_multiplier) * float(clip)
    if std == 0:
        return [t.clone() for t in sum_update]
    gen = generator if generator is not None else secure_generator()
    return [t + torch.randn(t.shape, generator=gen, dtype=t.dtype) * std for t in sum_update]


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP after ``rounds`` Poisson-sampled Gaussian rounds (RDP accountant).

    Returns ``inf`` when ``noise_multiplier`` is 0 and ``0.0`` when ``rounds`` is 0.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds < 0 or noise_multiplier < 0:
        raise ValueError("rounds and noise_multiplier must be >= 0")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        rounds,
    )
    # dp_accounting logs (via absl) a warning per fractional order whose series fails to
    # converge and then drops that order; the bound stays valid, so keep the logs quiet.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        accountant = RdpAccountant()
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)
