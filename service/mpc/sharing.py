"""Additive secret sharing over Z_2^64: [x] = (x0, x1) with x = x0 + x1 mod 2^64.

Each share alone is uniform and independent of x. XOR sharing of bit-words (x = x0 ^ x1) is the
binary counterpart used by comparison.
"""

from __future__ import annotations

import torch

from service.mpc.prg import random_ring
from service.mpc.ring import PRIME, FixedPoint


def share(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ring elements into two additive shares (a fresh uniform mask for share 0)."""
    x0 = random_ring(x.shape)
    return x0, x - x0


def reconstruct(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Add two additive shares back together."""
    return x0 + x1


def share_tensors(
    values: dict[str, torch.Tensor], fp: FixedPoint
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Encode named real tensors (e.g. model weights) and split each into two shares."""
    pairs = {name: share(fp.encode(v)) for name, v in values.items()}
    return {n: p[0] for n, p in pairs.items()}, {n: p[1] for n, p in pairs.items()}


def share_xor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split 64-bit words into two XOR shares."""
    x0 = random_ring(x.shape)
    return x0, x ^ x0


def reconstruct_xor(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """XOR two binary shares back together."""
    return x0 ^ x1


def open_label(x0: torch.Tensor, x1: torch.Tensor, sharing: str) -> torch.Tensor:
    """The labels from a forward pass's two label shares (`PrivateNetwork.label_sharing`):
    "zero": the one place per row where they add to 0 mod PRIME; "xor": the one-hot's 1.
    A row that names no single class (a broken run) gets -1, never a class."""
    if sharing == "zero":
        hits = (x0 + x1) % PRIME == 0
    elif sharing == "xor":
        hits = (x0 ^ x1) == 1
    else:
        raise ValueError(f"unknown label sharing {sharing!r}")
    labels = hits.long().argmax(-1)
    return labels.masked_fill_(hits.sum(-1) != 1, -1)
