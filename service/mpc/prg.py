"""A cryptographic PRG: AES-256-CTR keystream (from `cryptography`) expanded into ring tensors.

Every secret in the engine comes from here or from `os.urandom`, never from torch, numpy or
`random`.
A `PRG` is a stream: successive draws consume successive keystream bytes, so two holders of one
seed that make the same draws in the same order get the same tensors.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK))  # the plaintext of the keystream, shared read-only


def fresh_seed() -> bytes:
    """A new uniformly random 256-bit seed from the operating system."""
    return os.urandom(SEED_BYTES)


class PRG:
    """AES-256-CTR keyed by a 32-byte seed, read as a stream of uniform ring elements."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a PRG seed is {SEED_BYTES} bytes, got {len(seed)}")
        self._enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        self.bytes_drawn = 0

    def _bytes(self, n: int) -> bytearray:
        """The next n keystream bytes (plus 15 spare bytes at the end, see `update_into`)."""
        self.bytes_drawn += n
        out = bytearray(n + 15)  # `update_into` wants room for one block less one byte
        view = memoryview(out)
        for start in range(0, n, _CHUNK):  # encrypt zeros: the keystream, with no copies
            size = min(_CHUNK, n - start)
            self._enc.update_into(_ZEROS[:size], view[start : start + size + 15])
        return out

    def ring(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform elements of Z_2^64 (int64) of the given shape."""
        n = math.prod(shape)
        data = np.frombuffer(self._bytes(8 * n), dtype="<i8", count=n)  # writable, no copy
        return torch.from_numpy(data).reshape(tuple(shape))

    def mod(self, shape: tuple[int, ...] | torch.Size, p: int) -> torch.Tensor:
        """Uniform elements of Z_p (int64 in [0, p), 1 < p < 2^28), exactly: b-bit draws
        (b = 16 for p <= 2^16, else 32) below the largest multiple of p under 2^b are kept and
        reduced mod p, the others skipped (for p = 65521, 15 in 2^16). Deterministic in the
        stream, so two holders of one seed draw the same elements."""
        if not 1 < p < 1 << 28:
            raise ValueError(f"p must be in (1, 2^28), got {p}")
        n = math.prod(shape)
        bits, dtype = (16, "<u2") if p <= 1 << 16 else (32, "<u4")
        limit = (1 << bits) // p * p
        out = np.empty(n, dtype=np.int64)
        have = 0
        while have < n:
            want = n - have
            draw = want + want // 64 + 16  # enough, nearly always, for one pass
            v = np.frombuffer(self._bytes(draw * bits // 8), dtype=dtype, count=draw)
            skipped = np.flatnonzero(v >= limit)
            if skipped.size:
                v = np.delete(v, skipped)
            take = min(want, v.size)
            out[have : have + take] = v[:take]
            have += take
        if limit != p:
            out %= p
        return torch.from_numpy(out).reshape(tuple(shape))


def random_ring(shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Uniform ring elements from a fresh seed: for one-off masks such as input shares."""
    return PRG(fresh_seed()).ring(shape)
