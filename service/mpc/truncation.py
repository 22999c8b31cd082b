"""Fixed-point rescaling: [x] -> [floor(x / 2^bits)] (+1 at most), the one place it happens.

Dealer-assisted truncation, exact on the whole input range |x| < 2^62 (no failure probability,
unlike SecureML's local truncation, which fails with probability about |x| / 2^63 per element).
With y = x + 2^62 in [0, 2^63) and a dealer pair ([r], [r >>> bits], [msb(r)]) for uniform r:
  1. open c = y + r mod 2^64                       (1 round; c is uniform: it reveals nothing)
  2. the wrap w of y + r is msb(r) * (1 - msb(c))   (linear in [msb(r)], since c is public)
  3. [y >>> bits] = (c >>> bits) - [r >>> bits] + [w] * 2^(64 - bits)   (+1 when the low bits
     of c are below those of r: a carry we do not compute, so the result is floor or floor + 1)
  4. subtract 2^(62 - bits)
Rounds: 1 (it can share its round with other openings; see `begin` / `finish`).
Bytes sent per party: 8 per element. What a party sees: c, uniform on Z_2^64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.mpc.dealer import Request
from service.mpc.party import Party
from service.mpc.ring import RING_BITS, TRUNCATION_OFFSET, logical_shift_right, msb


@dataclass
class PendingTruncation:
    """A truncation between its masked opening and its local finish."""

    masked: torch.Tensor
    randomness: dict[str, torch.Tensor]
    bits: int


def begin(party: Party, x: torch.Tensor, bits: int) -> PendingTruncation:
    """Step 1 without the exchange: the masked share of c this party will send."""
    if not 0 < bits < RING_BITS - 2:
        raise ValueError(f"truncation bits must be in (0, 62), got {bits}")
    return begin_with(party, x, party.rand.take(Request.trunc(x.shape, bits)), bits)


def begin_with(party: Party, x: torch.Tensor, t: dict, bits: int) -> PendingTruncation:
    """`begin` on dealer material `t` taken by the caller, with the fields of `Request.trunc`
    (r, r_hi, r_msb; `lut` takes them with its own)."""
    y = x + TRUNCATION_OFFSET if party.index == 0 else x
    return PendingTruncation(y + t["r"], t, bits)


def finish(party: Party, pending: PendingTruncation, c: torch.Tensor) -> torch.Tensor:
    """Steps 2-4, local, given the opened c."""
    t, bits = pending.randomness, pending.bits
    wrap = t["r_msb"] * (1 - msb(c))
    z = (wrap << (RING_BITS - bits)) - t["r_hi"]
    if party.index == 0:
        z = z + logical_shift_right(c, bits) - (TRUNCATION_OFFSET >> bits)
    return z


def truncate(party: Party, x: torch.Tensor, bits: int) -> torch.Tensor:
    """Shares of floor(x / 2^bits) or one more, for |x| < 2^62. One round."""
    pending = begin(party, x, bits)
    (c,) = party.open(pending.masked)
    return finish(party, pending, c)
