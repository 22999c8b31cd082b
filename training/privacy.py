"""Central differential privacy for FedAvg: per-client clipping, Gaussian noise, RDP accounting.

DP-FedAvg (McMahan et al. 2018): each sampled client's update is clipped to L2 norm ``clip``,
the server sums the clipped updates, adds ``N(0, (noise_multiplier * clip)^2)`` to every
coordinate of the SUM, and divides by the expected cohort size. The accountant treats one round
as a Poisson-subsampled Gaussian mechanism with rate ``sample_rate`` (fixed-size sampling
without replacement is the usual approximation of it).

Noise comes from a cryptographic source: AES-256-CTR (``service.mpc.prg.PRG``) keyed by 32
fresh bytes of ``os.urandom``, turned into Gaussians by Box-Muller on 53-bit uniforms. Tests may
key it with a fixed seed, for reproducibility. (A seeded ``torch.Generator`` has a 64-bit state
an observer of enough noise could recover; AES keyed by 256 random bits has no such shortcut.)
Floating-point attacks on the Gaussian's low-order bits (Mironov 2012) are not addressed.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence

import dp_accounting
import numpy as np
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


class NoiseSource:
    """Gaussian noise from AES-256-CTR keyed by a fresh 32-byte ``os.urandom`` seed."""

    def __init__(self, seed: bytes | None = None) -> None:
        from service.mpc.prg import PRG, fresh_seed

        self._prg = PRG(fresh_seed() if seed is None else seed)

    def uniform(self, n: int) -> np.ndarray:
        """n uniforms in [0, 1) with 53 random bits each (float64)."""
        words = self._prg.ring((n,)).numpy().view(np.uint64) >> np.uint64(11)
        return words.astype(np.float64) * 2.0**-53

    def normal(self, shape: Sequence[int] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Standard normal samples (Box-Muller: two uniforms make two normals)."""
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self.uniform(2 * half)
        radius = np.sqrt(-2.0 * np.log1p(-u[:half]))  # 1 - u in (0, 1]: never log(0)
        angle = 2.0 * math.pi * u[half:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return torch.from_numpy(z).to(dtype).reshape(tuple(shape))


def secure_generator(seed: int | None = None) -> NoiseSource:
    """The noise source: keyed by ``os.urandom``, or by ``seed`` (tests only, reproducible)."""
    if seed is None:
        return NoiseSource()
    return NoiseSource(hashlib.sha256(b"privdigit/dp-test-seed/" + str(seed).encode()).digest())


def add_noise(
    sum_update: Sequence[torch.Tensor],
    noise_multiplier: float,
    clip: float,
    generator: NoiseSource | None = None,
) -> list[torch.Tensor]:
    """Add Gaussian noise with std ``noise_multiplier * clip`` to each coordinate of the sum."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    std = float(noise_multiplier) * float(clip)
    if std == 0:
        return [t.clone() for t in sum_update]
    gen = generator if generator is not None else secure_generator()
    return [t + gen.normal(t.shape, t.dtype) * std for t in sum_update]


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
