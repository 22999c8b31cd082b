"""Fixed point, the image's two additive shares over Z_2^64, and the result's reconstruction.

`share_image` draws share 0 from the operating system's CSPRNG (`os.urandom`), so each replica
sees a uniform value; `reconstruct_label` opens only the label (from the replicas' "zero" or
"xor" sharing), `reconstruct_scores` the logits when the operator enabled them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from clients.privdigit.errors import BadResponse

CLASSES = 10
LABEL_PRIME = 65521  # the "zero" sharing's modulus (the service's `ring.PRIME`)
LABEL_SHARINGS = ("zero", "xor")


def encode_fixed(x: np.ndarray, frac_bits: int) -> np.ndarray:
    """round(x * 2^frac_bits) as int64: real values as ring elements (half to even, like torch)."""
    xf = np.asarray(x, dtype=np.float64)
    if not np.isfinite(xf).all():
        raise ValueError("cannot encode NaN or infinite values")
    scaled = np.round(xf * float(2**frac_bits))
    if scaled.size and float(np.abs(scaled).max()) >= 2.0**62:
        raise ValueError(f"values too large for fixed point with {frac_bits} fractional bits")
    return scaled.astype(np.int64)


def _random_u64(n: int) -> np.ndarray:
    """n uniform 64-bit words from the operating system's CSPRNG."""
    return np.frombuffer(os.urandom(8 * n), dtype="<u8").astype(np.uint64)


def share_image(x_encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two int64 arrays, s0 uniform and s1 = x - s0 (mod 2^64), that add up to `x_encoded`."""
    x = np.asarray(x_encoded)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"share_image takes ring elements (int64), got dtype {x.dtype}")
    flat = np.ascontiguousarray(x, dtype=np.int64).reshape(-1).view(np.uint64)
    s0 = _random_u64(flat.size)
    s1 = flat - s0  # uint64 arithmetic on arrays wraps modulo 2^64 silently
    return s0.view(np.int64).reshape(x.shape), s1.view(np.int64).reshape(x.shape)


def _share_pair(s0: Any, s1: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both shares as 2-D int64 arrays of the same shape, or `BadResponse`."""
    a, b = np.asarray(s0), np.asarray(s1)
    if not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
        raise BadResponse("shares must be integer arrays")
    if a.shape != b.shape or a.ndim != 2:
        raise BadResponse(f"shares must be 2-D of the same shape, got {a.shape} and {b.shape}")
    return a.astype(np.int64), b.astype(np.int64)


def reconstruct_label(s0: np.ndarray, s1: np.ndarray, sharing: str = "zero") -> np.ndarray:
    """The label of each row, from the replicas' two shares.

    sharing "zero": (s0 + s1) mod LABEL_PRIME is 0 at exactly one place per row, the label (the
    other places are uniform on 1..p-1 and mean nothing); "xor": s0 XOR s1 is one-hot.
    """
    if sharing not in LABEL_SHARINGS:
        raise BadResponse(f"unknown label sharing {sharing!r}; known: {LABEL_SHARINGS}")
    a, b = _share_pair(s0, s1)
    if sharing == "zero":
        if ((a < 0) | (a >= LABEL_PRIME) | (b < 0) | (b >= LABEL_PRIME)).any():
            raise BadResponse(f"label shares must lie in [0, {LABEL_PRIME})")
        hot = (a + b) % LABEL_PRIME == 0
        binary = np.ones(len(a), dtype=bool)
    else:
        onehot = a ^ b
        hot = onehot == 1
        binary = ((onehot == 0) | (onehot == 1)).all(axis=1)
    bad = np.flatnonzero(~(binary & (hot.sum(axis=1) == 1)))
    if bad.size:
        raise BadResponse(
            f"row {int(bad[0])} of the reconstructed output names no single label: the "
            "replicas' shares do not belong together"
        )
    return hot.argmax(axis=1).astype(np.int64)


def reconstruct_scores(s0: np.ndarray, s1: np.ndarray, frac_bits: int) -> np.ndarray:
    """The logits: (s0 + s1) mod 2^64 read as signed fixed point with `frac_bits` bits, float64."""
    a, b = _share_pair(s0, s1)
    total = (a.view(np.uint64) + b.view(np.uint64)).view(np.int64)
    return total.astype(np.float64) / float(2**frac_bits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed stably."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
