"""Distributed comparison functions (DCF): two keys whose evaluations add up to beta * [x < alpha].

Boyle, Chandran, Gilboa, Gupta, Ishai, Kumar, Rathee, "Function Secret Sharing for Mixed-Mode
and Fixed-Point Secure Computation" (Eurocrypt 2021), Figure 1, batched: one key per element,
every tree level of every element in one vectorised step, so a batch of N comparisons costs
n AES calls over N-element arrays (n = domain bits), not N * n Python steps.

For x, alpha in [0, 2^n) and a payload beta in (Z_2^64)^d:
    eval(key_0, x) + eval(key_1, x) = beta * [x < alpha]   (mod 2^64, per payload coordinate)
Each key alone is pseudorandom: it reveals nothing of alpha or beta (the keys' shared correction
words are masked by the other party's seeds). Evaluation is local: no rounds, no bytes.

PRG: fixed-key AES-128 (from `cryptography`) in Matyas-Meyer-Oseas mode,
G_j(s) = AES_K(s ^ T_j) ^ s ^ T_j, with public distinct tweaks T_j per (direction, block) and a
public key K. Seeds are 127 bits; the lowest bit of each expanded seed block is its control bit.

Key size per element, per party: 16 n (seed corrections) + 8 d n (payload corrections)
+ 8 d (final correction) + 16 (control-bit corrections, packed as two n-bit masks) bytes,
plus the 16-byte root seed, which the parties draw from their own dealer seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

U64 = np.dtype("<u8")
_KEY = hashlib.sha256(b"privdigit/dcf/fixed-key-aes/v1").digest()[:16]  # public by design
_LOW_CLEAR = np.uint64(0xFFFF_FFFF_FFFF_FFFE)


def _blocks(d: int) -> int:
    """AES blocks one expansion yields per direction: the seed block plus the payload blocks."""
    return 1 + (d + 1) // 2


def _tweaks(d: int) -> np.ndarray:
    """(3, blocks, 2) distinct public tweaks: direction 0 (left), 1 (right), 2 (final convert)."""
    nb = _blocks(d)
    t = np.zeros((3, nb, 2), dtype=U64)
    t[..., 1] = (np.arange(3)[:, None] * nb + np.arange(nb)[None, :] + 1).astype(U64) << np.uint64(
        32
    )
    return t


class _Prg:
    """Fixed-key AES expansion of many seeds at once."""

    def __init__(self, d: int) -> None:
        self.d = d
        self.tweaks = _tweaks(d)
        self.aes = Cipher(algorithms.AES(_KEY), modes.ECB()).encryptor()

    def expand(self, seeds: np.ndarray, direction: int):
        """(next seed with control bit cleared, control bit, d payload words) per seed."""
        inp = seeds[:, None, :] ^ self.tweaks[direction]  # (N, blocks, 2)
        out = np.frombuffer(self.aes.update(inp.tobytes()), dtype=U64).reshape(inp.shape) ^ inp
        seed = out[:, 0, :].copy()
        t = seed[:, 0] & np.uint64(1)
        seed[:, 0] &= _LOW_CLEAR
        v = out[:, 1:, :].reshape(len(seeds), -1)[:, : self.d]
        return seed, t, v

    def convert(self, seeds: np.ndarray) -> np.ndarray:
        """d pseudorandom ring words from a leaf seed."""
        return self.expand(seeds, 2)[2]


@dataclass
class DcfKeys:
    """The correction words both parties hold for N comparisons (the roots are per party).

    s_cw: (n, N, 2) seed corrections; v_cw: (n, N, d) payload corrections; t_l, t_r: (N,)
    control-bit corrections packed as n-bit masks (bit i for level i); final: (N, d).
    """

    s_cw: np.ndarray
    v_cw: np.ndarray
    t_l: np.ndarray
    t_r: np.ndarray
    final: np.ndarray

    @property
    def bits(self) -> int:
        return self.s_cw.shape[0]

    @property
    def count(self) -> int:
        return self.s_cw.shape[1]

    @property
    def payload(self) -> int:
        return self.v_cw.shape[2]

    def words(self) -> int:
        """How many 64-bit words these corrections occupy (their wire size / 8)."""
        return self.s_cw.size + self.v_cw.size + self.t_l.size + self.t_r.size + self.final.size

    def to_words(self) -> np.ndarray:
        return np.concatenate(
            [
                a.reshape(-1).view(U64)
                for a in (self.s_cw, self.v_cw, self.t_l, self.t_r, self.final)
            ]
        )

    @classmethod
    def from_words(cls, words: np.ndarray, bits: int, count: int, payload: int) -> DcfKeys:
        sizes = [bits * count * 2, bits * count * payload, count, count, count * payload]
        if len(words) != sum(sizes):
            raise ValueError(f"{len(words)} words cannot hold {count} DCF keys of {bits} bits")
        parts, pos = [], 0
        for n in sizes:
            parts.append(words[pos : pos + n].view(U64))
            pos += n
        return cls(
            parts[0].reshape(bits, count, 2),
            parts[1].reshape(bits, count, payload),
            parts[2],
            parts[3],
            parts[4].reshape(count, payload),
        )


def key_words(bits: int, count: int, payload: int) -> int:
    """The wire size in 64-bit words of `count` keys (public: a function of the plan)."""
    return count * (2 * bits + bits * payload + 2 + payload)


def _neg_where(flag: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(-1)^flag * x, per row (flag: (N,) of 0/1)."""
    return np.where(flag[:, None].astype(bool), (~x) + np.uint64(1), x)


def gen(
    alpha: np.ndarray, beta: np.ndarray, bits: int, root0: np.ndarray, root1: np.ndarray
) -> DcfKeys:
    """Correction words for f(x) = beta * [x < alpha], alpha in [0, 2^bits), beta (N, d) words.

    root0 / root1: (N, 2) uniform seeds of party 0 / 1 (their lowest bit is ignored).
    Cost: one AES call per level over 4 N (1 + ceil(d / 2)) blocks (both seeds, both children).
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"a DCF domain has 1 to 64 bits, got {bits}")
    alpha = np.asarray(alpha, dtype=U64)
    beta = np.ascontiguousarray(beta).view(U64)
    n_el, d = beta.shape
    prg = _Prg(d)
    one, zero = np.uint64(1), np.uint64(0)
    s = np.stack([root0, root1], axis=1).astype(U64)  # (N, party, 2)
    s[:, :, 0] &= _LOW_CLEAR
    t = np.zeros((n_el, 2), dtype=U64)
    t[:, 1] = one
    v_alpha = np.zeros((n_el, d), dtype=U64)
    s_cw = np.empty((bits, n_el, 2), dtype=U64)
    v_cw = np.empty((bits, n_el, d), dtype=U64)
    t_l = np.zeros(n_el, dtype=U64)
    t_r = np.zeros(n_el, dtype=U64)
    hi = prg.tweaks[:2, :, 1].reshape(-1)  # tweak high words per (child x block)
    nb = _blocks(d)
    inp = np.empty((n_el, 2, 2 * nb, 2), dtype=U64)  # (N, party, child x block, 2)
    blocks = inp.view("V16")[..., 0]  # the same memory as whole 16-byte blocks: fast copies
    buf = bytearray(inp.nbytes + 15)
    out = np.frombuffer(buf, dtype=U64, count=inp.size).reshape(n_el, 2, 2, nb, 2)
    for level in range(bits):
        a = (alpha >> np.uint64(bits - 1 - level)) & one  # keep = alpha's bit (1: right)
        blocks[...] = s.view("V16")  # every (child, block) starts from the seed ...
        inp[..., 1] ^= hi  # ... and gets its tweak
        prg.aes.update_into(inp.data.cast("B"), buf)
        out ^= inp.reshape(out.shape)
        seeds = out[:, :, :, 0, :].copy()  # (N, party, child, 2)
        ctl = seeds[..., 0] & one  # (N, party, child)
        seeds[..., 0] &= _LOW_CLEAR
        vals = out[:, :, :, 1:, :].reshape(n_el, 2, 2, -1)[..., :d]  # (N, party, child, d)
        right = (zero - a)[:, None, None]  # all ones where the kept child is the right one
        s_diff, v_diff = seeds[:, :, 0] ^ seeds[:, :, 1], vals[:, :, 0] ^ vals[:, :, 1]
        s_keep = seeds[:, :, 0] ^ (s_diff & right)  # (N, party, 2)
        s_lose = s_keep ^ s_diff
        v_keep = vals[:, :, 0] ^ (v_diff & right)  # (N, party, d)
        v_lose = v_keep ^ v_diff
        neg = t[:, 1]  # (-1)^{t_1} below
        scw = s_lose[:, 0] ^ s_lose[:, 1]
        vcw = _neg_where(neg, v_lose[:, 1] - v_lose[:, 0] - v_alpha)
        vcw += _neg_where(neg, beta) & (zero - a)[:, None]  # lose = left: x < alpha here
        v_alpha = v_alpha - v_keep[:, 1] + v_keep[:, 0] + _neg_where(neg, vcw)
        tcw_l = ctl[:, 0, 0] ^ ctl[:, 1, 0] ^ a ^ one
        tcw_r = ctl[:, 0, 1] ^ ctl[:, 1, 1] ^ a
        tcw_keep = np.where(a.astype(bool), tcw_r, tcw_l)
        s_cw[level], v_cw[level] = scw, vcw
        t_l |= tcw_l << np.uint64(level)
        t_r |= tcw_r << np.uint64(level)
        s = s_keep ^ (scw[:, None, :] & (zero - t)[:, :, None])
        t_keep = ctl[:, :, 0] ^ ((ctl[:, :, 0] ^ ctl[:, :, 1]) & right[:, :, 0])
        t = t_keep ^ (t & tcw_keep[:, None])
    conv = prg.convert(s.reshape(-1, 2)).reshape(n_el, 2, d)
    final = _neg_where(t[:, 1], conv[:, 1] - conv[:, 0] - v_alpha)
    return DcfKeys(s_cw, v_cw, t_l, t_r, final)


def eval_(party: int, root: np.ndarray, keys: DcfKeys, x: np.ndarray) -> np.ndarray:
    """Party `party`'s additive shares (N, d) of beta * [x < alpha] at public points x (N,)."""
    if party not in (0, 1):
        raise ValueError(f"party must be 0 or 1, got {party}")
    x = np.asarray(x, dtype=U64)
    bits, n_el, d = keys.bits, keys.count, keys.payload
    if x.shape != (n_el,) or root.shape != (n_el, 2):
        raise ValueError(f"{n_el} keys, got {x.shape} points and {root.shape} roots")
    prg = _Prg(d)
    nb = _blocks(d)
    base = prg.tweaks[0, :, 1]  # tweak high words for the left child; right = base ^ delta
    delta = prg.tweaks[1, :, 1] ^ base
    inp = np.empty((n_el, nb, 2), dtype=U64)
    blocks = inp.view("V16")[..., 0]
    out = bytearray(inp.nbytes + 15)
    enc = np.frombuffer(out, dtype=U64, count=inp.size).reshape(inp.shape)
    s = root.astype(U64, copy=True)
    s[:, 0] &= _LOW_CLEAR
    t = np.full(n_el, party, dtype=U64)
    acc = np.zeros((n_el, d), dtype=U64)
    zero, one = np.uint64(0), np.uint64(1)
    # Everything that depends only on x and the level, for all levels at once (few numpy calls
    # per level matter: small layers are bound by call overhead, not arithmetic).
    levels = np.arange(bits, dtype=U64)
    path = (x[:, None] >> (np.uint64(bits - 1) - levels)) & one  # (N, level): x's bits, MSB first
    tweak_hi = base ^ (path[:, :, None] * delta)  # (N, level, block)
    chosen = np.where(path.astype(bool), keys.t_r[:, None], keys.t_l[:, None])
    tcw = (chosen >> levels) & one  # (N, level): the control-bit correction on x's path
    for level in range(bits):
        blocks[...] = s.view("V16")
        inp[:, :, 1] ^= tweak_hi[:, level]
        prg.aes.update_into(inp.data.cast("B"), out)
        enc ^= inp
        on = (zero - t)[:, None]  # all ones where the control bit is set
        seed = enc[:, 0, :] ^ (keys.s_cw[level] & on)
        t_next = seed[:, 0] & one
        seed[:, 0] &= _LOW_CLEAR
        t_next ^= t & tcw[:, level]
        acc += enc[:, 1:, :].reshape(n_el, -1)[:, :d]
        acc += keys.v_cw[level] & on
        s, t = seed, t_next
    acc += prg.convert(s) + (keys.final & (zero - t)[:, None])
    return (~acc) + np.uint64(1) if party == 1 else acc
