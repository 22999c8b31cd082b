"""Exact secure comparison: arithmetic-to-binary conversion and a carry-lookahead tree.

After CrypTen (Knott et al. 2021) and ABY (Demmler et al. 2015): [x] = x0 + x1 is re-read as two
private 64-bit words, x0 held by party 0 and x1 by party 1, and the sign of their sum is the
sum's bit 63 = x0[63] ^ x1[63] ^ (carry into bit 63), computed on XOR shares with ANDs from
dealer binary triples. CrypTen runs a Kogge-Stone adder on whole words (all 64 carries, 12 word
ANDs per element). Only the one carry into bit 63 is needed, so here the carry is a binary tree
over bits 0..62 (the Brent-Kung up-sweep), on bit planes (`ring.to_planes`: one word holds one
bit of 64 elements), so each AND touches only the planes that are still needed:
  1. P_i = x0_i ^ x1_i (local); G_i = x0_i & x1_i on all 64 planes        (1 AND round)
  2. six times: pair the groups (2k+1, 2k) of the previous level,
       G' = G_hi ^ (P_hi & G_lo), P' = P_hi & P_lo (P' not for the lowest group)
     on 63 -> 32 -> 16 -> 8 -> 4 -> 2 -> 1 groups: 61 + 31 + 15 + 7 + 3 + 1 planes (6 rounds)
  3. msb(x) = P_63 ^ G_[0..62]                                                 (local)
Rounds: 7. Bytes sent per party: 2 * 8 * (64 + 118) * ceil(n / 64) for n elements, about 45.5
per element (CrypTen's whole-word adder: 192).
What a party sees: only openings of words XOR-masked by fresh uniform triples: uniform.
Nothing is ever opened unmasked; the result stays XOR-shared.

Also here: `and_` (XOR-shared AND), `select` ([x * b] for a shared bit b, 1 round), `relu`,
`maximum` and `argmax` (label only: XOR shares of a one-hot vector, nothing else).
"""

from __future__ import annotations

import torch

from service.mpc import truncation
from service.mpc.dealer import Request
from service.mpc.party import Party
from service.mpc.ring import from_plane, to_planes


def _and_begin(party: Party, x: torch.Tensor, y: torch.Tensor):
    t = party.rand.take(Request.and_(x.shape))
    return t, x ^ t["a"], y ^ t["b"]


def _and_finish(party: Party, t, e: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    z = t["c"] ^ (e & t["b"]) ^ (f & t["a"])
    return z ^ (e & f) if party.index == 0 else z


def and_(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """XOR shares of x & y, bitwise on 64-bit words. 1 round, 16 bytes per word per party."""
    t, e, f = _and_begin(party, x, y)
    e, f = party.open_xor(e, f)
    return _and_finish(party, t, e, f)


def _carry_tree(party: Party, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Step 2: the group generate of bits 0..62 from their planes (G, P) [63, w]. 6 rounds."""
    while g.shape[0] > 1:
        m = g.shape[0] // 2
        p_lo, p_hi, g_lo, g_hi = (
            p[0 : 2 * m : 2],
            p[1 : 2 * m : 2],
            g[0 : 2 * m : 2],
            g[1 : 2 * m : 2],
        )
        both = and_(party, torch.cat([p_hi, p_hi[1:]]), torch.cat([g_lo, p_lo[1:]]))
        g = torch.cat([g_hi ^ both[:m], g[2 * m :]])
        p = torch.cat([torch.zeros_like(p_hi[:1]), both[m:], p[2 * m :]])  # lowest P: unused
    return g[0]


def _operands(party: Party, planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This party's XOR shares of the planes of x0 and x1, whose sum is x (local A2B start)."""
    zero = torch.zeros_like(planes)
    return (planes, zero) if party.index == 0 else (zero, planes)


def msb(party: Party, x: torch.Tensor) -> torch.Tensor:
    """XOR shares (bit 0 of int64) of the sign bit of [x]: 1 where x < 0. 7 rounds."""
    planes = to_planes(x)
    t, e, f = _and_begin(party, *_operands(party, planes))
    e, f = party.open_xor(e, f)
    return _msb_from_g0(party, x, planes, _and_finish(party, t, e, f))


def _msb_from_g0(
    party: Party, x: torch.Tensor, planes: torch.Tensor, g0: torch.Tensor
) -> torch.Tensor:
    # P = x0 ^ x1: each party's share of P is its own planes
    carry = _carry_tree(party, planes[:63], g0[:63])
    return from_plane(planes[63] ^ carry, x.shape)


def select(party: Party, x: torch.Tensor, bit: torch.Tensor) -> torch.Tensor:
    """[x * b] from arithmetic [x] and XOR-shared bit b (bit injection fused with the product).

    Dealer: a random bit rb (XOR shares and [rb]), uniform [a], and [a * rb].
      1. open d = x - a (arithmetic) and e = b ^ rb (binary)      (1 round)
      2. b = e + (1 - 2e) rb, so x * b = d e + d (1 - 2e)[rb] + e [a] + (1 - 2e)[a rb]
    Rounds: 1. Bytes per element per party: 8 + 8. Seen: d, e, masked by uniform a and rb.
    """
    t = party.rand.take(Request.mux(x.shape))
    (d,), (e,) = party.open_mixed([x - t["a"]], [bit ^ t["rb"]])
    s = 1 - 2 * e
    z = d * s * t["r"] + e * t["a"] + s * t["ar"]
    return z + d * e if party.index == 0 else z


def not_(party: Party, bit: torch.Tensor) -> torch.Tensor:
    """XOR shares of 1 - b (party 0 flips its share). Local."""
    return bit ^ 1 if party.index == 0 else bit


def relu(party: Party, x: torch.Tensor, trunc_bits: int = 0) -> torch.Tensor:
    """[max(x, 0) / 2^trunc_bits]: the sign of x and the truncation computed side by side.

    The sign is taken on the untruncated x (same sign), so the truncation's opening shares the
    comparison's first round. Rounds: 7 (comparison, truncation inside) + 1 (select) = 8.
    Bytes per element per party: about 45.5 (comparison, see the module) + 16 (+ 8 with
    truncation).
    """
    planes = to_planes(x)
    t, e, f = _and_begin(party, *_operands(party, planes))
    if trunc_bits:
        pending = truncation.begin(party, x, trunc_bits)
        (c,), (e, f) = party.open_mixed([pending.masked], [e, f])
        y = truncation.finish(party, pending, c)
    else:
        e, f = party.open_xor(e, f)
        y = x
    sign = _msb_from_g0(party, x, planes, _and_finish(party, t, e, f))
    return select(party, y, not_(party, sign))


def maximum(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[max(x, y)] = y + (x - y) * [x >= y]. Rounds: 8."""
    ge = not_(party, msb(party, x - y))
    return y + select(party, x - y, ge)


def max_pool2d(party: Party, x: torch.Tensor, kernel: int, maximum=maximum) -> torch.Tensor:
    """2D max pooling, stride = kernel, as a tree of `maximum` (this module's by default; `fss`
    passes its own). Rounds: ceil(log2(k*k)) times those of one `maximum` (8 here)."""
    n, c, h, w = x.shape
    if h % kernel or w % kernel:
        raise ValueError(f"max pooling {kernel}x{kernel} needs sides divisible by it, got {h}x{w}")
    v = x.reshape(n, c, h // kernel, kernel, w // kernel, kernel).permute(0, 1, 2, 4, 3, 5)
    v = v.reshape(n, c, h // kernel, w // kernel, kernel * kernel)
    while v.shape[-1] > 1:
        k = v.shape[-1]
        m = maximum(party, v[..., 0 : k - k % 2 : 2], v[..., 1 : k - k % 2 : 2])
        v = torch.cat([m, v[..., k - k % 2 :]], dim=-1)
    return v[..., 0]


def _and_reduce(party: Party, bits: torch.Tensor) -> torch.Tensor:
    """AND over the last axis of XOR-shared bits, as a tree: ceil(log2 n) rounds."""
    while bits.shape[-1] > 1:
        k = bits.shape[-1]
        pairs = and_(party, bits[..., 0 : k - k % 2 : 2], bits[..., 1 : k - k % 2 : 2])
        bits = torch.cat([pairs, bits[..., k - k % 2 :]], dim=-1)
    return bits[..., 0] & 1


def argmax(party: Party, x: torch.Tensor) -> torch.Tensor:
    """XOR shares of the one-hot argmax over the last axis (first maximum on ties, like torch).

    All n(n-1)/2 differences are compared at once: winner i beats every j < i strictly and ties
    or beats every j > i; the n-1 conditions are ANDed as a tree.
    Rounds: 7 + ceil(log2(n - 1)) (11 for 10 classes). Bytes per party: those of `msb` on
    n(n-1)/2 elements per row, plus 16 n (n - 2) per row for the AND tree. What a party sees:
    masked openings only; the output stays shared.
    """
    n = x.shape[-1]
    if n < 2:
        return party.public(torch.ones_like(x))
    iu, ju = torch.triu_indices(n, n, offset=1)
    lt = msb(party, x[..., iu] - x[..., ju])  # lt[k] = [x_i < x_j] for the pair (i, j) = k
    pair = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(iu, ju, strict=True))}
    conditions = []
    for i in range(n):
        row = []
        for j in range(n):
            if j < i:
                row.append(lt[..., pair[(j, i)]])  # x_j < x_i
            elif j > i:
                row.append(not_(party, lt[..., pair[(i, j)]]))  # not x_i < x_j
        conditions.append(torch.stack(row, dim=-1))
    return _and_reduce(party, torch.stack(conditions, dim=-2))
