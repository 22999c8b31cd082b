"""The ring Z_2^64 on torch int64 and fixed-point encoding, defined once.

Ring arithmetic is torch int64 arithmetic: addition and multiplication wrap modulo 2^64 natively.
A real value v is encoded as round(v * 2^f) with f fractional bits; the precision travels as a
`FixedPoint` value, never as a global.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

RING_BITS = 64
DTYPE = torch.int64
PRIME = 65521  # Z_p of the label's zero test (`comparison.argmax`); any prime above 10 classes


class EncodingError(ValueError):
    """A value cannot be represented in the ring at the requested precision."""


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding with `frac_bits` fractional bits.

    `max_abs` is the largest magnitude `encode` accepts: values whose products (scale 2^2f, times
    a few hundred terms of a dot product) must still fit in a signed 63-bit value.
    """

    frac_bits: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 30:
            raise ValueError(f"frac_bits must be in [0, 30], got {self.frac_bits}")

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    @property
    def max_abs(self) -> float:
        # Leave room for one product (2f bits) and 2^10 accumulated terms below bit 62.
        return float(2 ** (62 - 2 * self.frac_bits - 10))

    def encode(self, x: torch.Tensor, *, frac_bits: int | None = None) -> torch.Tensor:
        """Encode real values as ring elements (scale 2^frac_bits, default this precision)."""
        bits = self.frac_bits if frac_bits is None else frac_bits
        xf = torch.as_tensor(x, dtype=torch.float64)
        if not torch.isfinite(xf).all():
            raise EncodingError("cannot encode NaN or infinite values")
        limit = self.max_abs if bits == self.frac_bits else float(2 ** (62 - bits))
        worst = float(xf.abs().max()) if xf.numel() else 0.0
        if worst >= limit:
            raise EncodingError(
                f"value {worst:.6g} exceeds the representable magnitude {limit:.6g} "
                f"at {bits} fractional bits; rescale the input or lower frac_bits"
            )
        return torch.round(xf * float(1 << bits)).to(DTYPE)

    def decode(self, x: torch.Tensor, *, frac_bits: int | None = None) -> torch.Tensor:
        """Decode ring elements (read as signed) to float64 reals."""
        bits = self.frac_bits if frac_bits is None else frac_bits
        return x.to(torch.float64) / float(1 << bits)


def msb(x: torch.Tensor) -> torch.Tensor:
    """The top bit of each ring element as 0/1 int64 (the sign bit of its signed reading)."""
    return (x >> (RING_BITS - 1)) & 1


def logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x >> bits reading x as an unsigned 64-bit integer."""
    if bits == 0:
        return x.clone()
    return (x >> bits) & ((1 << (RING_BITS - bits)) - 1)


# 64x64 bit-matrix transpose (Hacker's Delight 7-3): swap the off-diagonal j x j blocks for
# j = 32, 16, ..., 1; masks pick the low half of each 2j-bit group.
_TRANSPOSE_MASKS = tuple(
    (j, torch.tensor(m - (1 << 64) if m >= 1 << 63 else m, dtype=DTYPE))
    for j, m in (
        (32, 0x00000000FFFFFFFF),
        (16, 0x0000FFFF0000FFFF),
        (8, 0x00FF00FF00FF00FF),
        (4, 0x0F0F0F0F0F0F0F0F),
        (2, 0x3333333333333333),
        (1, 0x5555555555555555),
    )
)


def to_planes(x: torch.Tensor) -> torch.Tensor:
    """The bit planes of ring elements: int64 [64, ceil(n / 64)] for n elements in C order.

    Bit k of word j of plane i is bit i of element 64 j + k (elements past n are 0). One word
    then carries one bit of 64 elements, so a bitwise protocol on a few planes touches 64 times
    fewer words than on whole elements. Each block of 64 elements is a 64x64 bit matrix,
    transposed in place with six masked swaps over all blocks at once.
    """
    flat = x.reshape(-1)
    words = -(-flat.shape[0] // 64)
    a = torch.zeros(words * 64, dtype=DTYPE)
    a[: flat.shape[0]] = flat
    for j, mask in _TRANSPOSE_MASKS:
        v = a.view(words, 64 // (2 * j), 2, j)  # rows with bit j clear, and their partners
        lo, hi = v[:, :, 0, :], v[:, :, 1, :]
        t = ((lo >> j) ^ hi) & mask
        hi ^= t
        lo ^= t << j
    return a.view(words, 64).t().contiguous()


def from_plane(plane: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """One bit plane back to 0/1 int64 per element, in `shape` (inverse of `to_planes`)."""
    n = math.prod(shape)  # Python ints: exact, and far cheaper than np.prod per call
    bits = np.unpackbits(plane.contiguous().numpy().view(np.uint8), bitorder="little")[:n]
    return torch.from_numpy(bits.astype(np.int64)).reshape(tuple(shape))


def from_planes_packed(planes: torch.Tensor, count: int) -> torch.Tensor:
    """Each of `count` elements' bits from a few planes [k, words], packed into one int64 per
    element (bit i from plane i): k small, e.g. a gate's opened inputs."""
    words = planes.contiguous().numpy().view(np.uint8)
    bits = np.unpackbits(words, axis=1, bitorder="little")[:, :count]  # all planes at once
    weights = 1 << np.arange(len(bits), dtype=np.int64)
    return torch.from_numpy(weights @ bits.astype(np.int64))


def to_plane(bits: torch.Tensor) -> torch.Tensor:
    """0/1 int64 per element (C order) packed into one bit plane (inverse of `from_plane`)."""
    return to_plane_rows(bits.reshape(1, -1))[0]


def to_plane_rows(bits: torch.Tensor) -> torch.Tensor:
    """Each row of 0/1 int64 [k, n] packed into a bit plane: [k, ceil(n / 64)]."""
    k, n = bits.shape
    flat = (bits & 1).numpy().astype(np.uint8)
    words = np.zeros((k, -(-n // 64) * 8), dtype=np.uint8)
    words[:, : -(-n // 8)] = np.packbits(flat, axis=1, bitorder="little")
    return torch.from_numpy(words.view(np.int64))


DEFAULT_FP = FixedPoint(16)
"""The default precision: 16 fractional bits (resolution 1.5e-5)."""
