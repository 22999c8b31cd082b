"""Secure aggregation with two non-colluding aggregators (additive sharing over Z_2^64).

Each client flattens its (example-weighted) update, encodes it in fixed point with
:data:`FRAC_BITS` fractional bits and splits it with :func:`service.mpc.sharing.share` into two
additive shares, one per aggregator. Share 0 is a fresh uniform mask from a cryptographic PRG,
so each aggregator alone sees uniform noise. An :class:`Aggregator` only adds shares (ring
addition wraps mod 2^64); :func:`reconstruct_sum` adds the two aggregate shares and decodes the
SUM of the updates: nobody ever sees an individual update unless both aggregators collude.

Range: aggregation needs no products, so the only constraint is that the final sum fits in a
signed 64-bit value at scale 2^24: ``|sum| < 2^38``. Each client's encoded value is checked
against ``2^38 / MAX_CLIENTS`` so any cohort of up to :data:`MAX_CLIENTS` clients cannot wrap.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from service.mpc.ring import DTYPE, EncodingError, FixedPoint
from service.mpc.sharing import reconstruct, share

FRAC_BITS = 24
MAX_CLIENTS = 1 << 12
MAX_CLIENT_ABS = float(2 ** (62 - FRAC_BITS - 12))
"""Largest per-coordinate magnitude a client may submit (2^26 = 67,108,864)."""

FP = FixedPoint(FRAC_BITS)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one float64 vector."""
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector back into tensors shaped like ``like`` (keeping the vector's dtype)."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset : offset + n].reshape(t.shape))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} elements, shapes need {offset}")
    return out


def encode(update: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fixed-point encode a client's update (flattened) with a magnitude check."""
    flat = flatten(update)
    if not torch.isfinite(flat).all():
        raise EncodingError("cannot encode NaN or infinite values")
    worst = float(flat.abs().max()) if flat.numel() else 0.0
    if worst >= MAX_CLIENT_ABS:
        raise EncodingError(
            f"update magnitude {worst:.6g} exceeds {MAX_CLIENT_ABS:.6g}, the per-client limit "
            f"for summing up to {MAX_CLIENTS} clients at {FRAC_BITS} fractional bits"
        )
    # FixedPoint.max_abs reserves headroom for products; a sum needs none, so encode against
    # the plain 2^(62-f) limit (the tighter per-client check above already passed).
    return torch.round(flat * float(FP.scale)).to(DTYPE)


def client_shares(
    update: Sequence[torch.Tensor], weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's two shares of ``weight * update`` (one for each aggregator)."""
    return share(encode([t.detach().to(torch.float64) * float(weight) for t in update]))


class Aggregator:
    """Sums the shares it receives; never holds more than one share of any client's update."""

    def __init__(self, index: int, size: int) -> None:
        if index not in (0, 1):
            raise ValueError(f"aggregator index must be 0 or 1, got {index}")
        self.index = index
        self.total = torch.zeros(size, dtype=DTYPE)
        self.count = 0

    def receive(self, share_vector: torch.Tensor) -> None:
        """Add one client's share (ring addition, wraps mod 2^64)."""
        if share_vector.dtype != DTYPE or share_vector.shape != self.total.shape:
            raise ValueError(
                f"expected an int64 share of shape {tuple(self.total.shape)}, got "
                f"{share_vector.dtype} {tuple(share_vector.shape)}"
            )
        if self.count >= MAX_CLIENTS:
            raise EncodingError(f"more than {MAX_CLIENTS} clients could overflow the ring")
        self.total += share_vector
        self.count += 1


def reconstruct_sum(agg0: Aggregator, agg1: Aggregator) -> torch.Tensor:
    """Open the aggregate: the float64 flat SUM of all clients' (weighted) updates."""
    if agg0.count != agg1.count:
        raise ValueError(f"aggregators saw different cohorts ({agg0.count} vs {agg1.count})")
    return FP.decode(reconstruct(agg0.total, agg1.total))


def secure_sum(
    updates: Sequence[Sequence[torch.Tensor]], weights: Sequence[float] | None = None
) -> list[torch.Tensor]:
    """In-process secure aggregation of ``sum_k weights[k] * updates[k]``, shaped like update 0."""
    if not updates:
        raise ValueError("secure_sum needs at least one update")
    ws = [1.0] * len(updates) if weights is None else [float(w) for w in weights]
    if len(ws) != len(updates):
        raise ValueError("one weight per update")
    size = sum(t.numel() for t in updates[0])
    agg0, agg1 = Aggregator(0, size), Aggregator(1, size)
    for update, w in zip(updates, ws, strict=True):
        s0, s1 = client_shares(update, w)
        agg0.receive(s0)
        agg1.receive(s1)
    return unflatten(reconstruct_sum(agg0, agg1), updates[0])
