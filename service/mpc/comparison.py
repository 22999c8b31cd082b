"""Exact secure comparison: arithmetic-to-binary conversion and a 3-round carry tree.

After CrypTen (Knott et al. 2021) and ABY (Demmler et al. 2015): [x] = x0 + x1 is re-read as two
private 64-bit words, x0 held by party 0 and x1 by party 1, and the sign of their sum is the
sum's bit 63 = x0[63] ^ x1[63] ^ (carry into bit 63). CrypTen computes all 64 carries with a
Kogge-Stone adder of 2-input ANDs (7 rounds). Only the carry into bit 63 is needed, and gates
with many inputs cost one round each (`fanin`), so here it is a 4-ary carry tree on **bit
planes** (`ring.to_planes`: one word holds one bit of 64 elements), with bits 0..62 and a zero
bit below them as 16 slices of 4 bits:
  1. per slice, its generate G and propagate P straight from the two parties' clear bits: a
     `cross` gate (`anf.carry4`): 30 words per 64 elements and slice pair      (1 round)
  2. 16 slices -> 4: G, P of four slices at once (`anf.gp4`, 8 inputs)          (1 round)
  3. 4 -> 1: the carry into bit 63 (`anf.g4`, 7 inputs)                          (1 round)
  4. msb(x) = x0[63] ^ x1[63] ^ carry                                            (local)
Rounds: 3 (CrypTen's adder and the Brent-Kung tree of 2-input ANDs this replaced: 7). Bytes
sent per party: 8 * (30 * 8 + 4 * 8 + 7) * ceil(n / 64) for n elements, about 35 per element.
What a party sees: only words masked by fresh uniform dealer words: uniform. Nothing is ever
opened unmasked; the result stays XOR-shared.

Also here: `select` ([x * b] for a shared bit b, 1 round), `relu`, `maximum` and `argmax`
(label only: a zero test in Z_p that shows the client the label and nothing else).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from service.mpc import beaver, fanin, truncation
from service.mpc.anf import ARITH, Arith
from service.mpc.dealer import Request, pairs
from service.mpc.party import Party
from service.mpc.ring import (
    PRIME,
    RING_BITS,
    from_plane,
    from_planes_packed,
    to_plane,
    to_planes,
)

LABEL_SHARING = "zero"  # how `argmax` hands out the label (see there)
TREE_SHIFT_MAX = 22  # ReLU shifts up to this take their low carry from the tree (`relu`)
_LOW63 = (1 << 63) - 1


def _positions(planes: torch.Tensor) -> torch.Tensor:
    """The tree's 64 bit positions of this party's planes: a zero, then bits 0..62."""
    return torch.cat([torch.zeros_like(planes[:1]), planes[:63]])


def _slices(
    party: Party, x: torch.Tensor, ride: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Step 1: XOR shares of G and P of the 16 slices [16, words] each, this party's bit 63 of
    [x] as a plane, and the additive `ride` values opened in the round. 1 round."""
    planes = to_planes(x)
    slices = _positions(planes).view(16, 4, -1).transpose(0, 1)  # [bit in slice, slice, words]
    (g, p), opened = fanin.cross(party, slices, "carry4", ride)
    return g, p, planes[63], opened


def _groups(g: torch.Tensor, p: torch.Tensor, size: int) -> torch.Tensor:
    """The slices' G and P as inputs [G0..G(size-1), P0..P(size-1), groups, words] of a gate
    that joins `size` consecutive slices."""
    n = g.shape[0] // size
    return torch.cat([g.view(n, size, -1).transpose(0, 1), p.view(n, size, -1).transpose(0, 1)])


def _msb(
    party: Party, x: torch.Tensor, ride: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """XOR shares of the sign bits of [x] as one bit plane, and the additive `ride` values
    opened in the first round. 3 rounds."""
    g, p, bit63, opened = _slices(party, x, ride)
    g, p = fanin.masked(party, _groups(g, p, 4), "gp4")[0]
    (carry,) = fanin.masked(party, torch.cat([g, p[1:]]).unsqueeze(1), "g4")[0]
    return bit63 ^ carry[0], opened


def msb(party: Party, x: torch.Tensor) -> torch.Tensor:
    """XOR shares (bit 0 of int64) of the sign bit of [x]: 1 where x < 0. 3 rounds."""
    return from_plane(_msb(party, x)[0], x.shape)


def select(party: Party, x: torch.Tensor, bit: torch.Tensor) -> torch.Tensor:
    """[x * b] from arithmetic [x] and XOR-shared bits b, one per element (int64 0/1)."""
    return select_plane(party, x, to_plane(bit))


def select_plane(party: Party, x: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
    """[x * b] from arithmetic [x] and XOR-shared bits b as a bit plane (bit injection fused
    with the product).

    Dealer: random bits rb (XOR shares of their plane, and [rb] per element), uniform [a], and
    [a * rb].
      1. open d = x - a (arithmetic) and e = b ^ rb (binary, as a plane)      (1 round)
      2. b = e + (1 - 2e) rb, so x * b = d e + d (1 - 2e)[rb] + e [a] + (1 - 2e)[a rb]
    Rounds: 1. Bytes per element per party: 8 + 1/8. Seen: d, e, masked by uniform a and rb.
    """
    t = party.rand.take(Request.mux(x.shape))
    (d,), (e,) = party.open_mixed([x - t["a"]], [plane ^ t["rb"]])
    return beaver.select_shares(party, t, d, from_plane(e, x.shape))


def not_(party: Party, bit: torch.Tensor) -> torch.Tensor:
    """XOR shares of 1 - b (party 0 flips its share). Local."""
    return bit ^ 1 if party.index == 0 else bit


def not_plane(party: Party, plane: torch.Tensor) -> torch.Tensor:
    """XOR shares of the complement of a bit plane (party 0 flips its share). Local."""
    return ~plane if party.index == 0 else plane


def relu(
    party: Party, x: torch.Tensor, trunc_bits: int = 0, select: Callable = select_plane
) -> torch.Tensor:
    """[max(x, 0) / 2^trunc_bits]: the sign of x and the truncation computed side by side.

    The sign is taken on the untruncated x (same sign). A shift up to TREE_SHIFT_MAX comes from
    the carry tree itself (`_sign_and_shift`: no opening of x, about 5 more bytes per element);
    a larger one opens x masked in the comparison's first round and its low borrow's gate in
    the second (`truncation`). Both are exact where x >= 0, which is all the select keeps.
    Rounds: 3 (comparison, truncation inside) + 1 (select) = 4. Bytes per element per party:
    about 35 (comparison, see the module) + 8 (select) + the shift's.
    `select(party, y, plane)` makes the last step: `select_plane` by default, or one that
    also applies the next layer in its round (`beaver.select_linear`).
    """
    if not trunc_bits:
        return select(party, x, not_plane(party, _msb(party, x)[0]))
    if trunc_bits <= TREE_SHIFT_MAX:
        return select(party, *_sign_and_shift(party, x, trunc_bits))
    pending = truncation.begin(party, x, trunc_bits)
    g, p, bit63, (c,) = _slices(party, x, [pending.masked])
    gate, mine = fanin.masked_begin(party, _groups(g, p, 4), "gp4")
    low, low_mine = truncation.carry_begin(party, c, pending.randomness, pending.spec)
    theirs, low_theirs = party.channel.exchange([*mine, low_mine])  # the low borrow rides here
    g, p = fanin.masked_finish(gate, mine[0], theirs)
    y = truncation.finish(party, pending, c, truncation.carry_finish(low, low_theirs)[0])
    (carry,) = fanin.masked(party, torch.cat([g, p[1:]]).unsqueeze(1), "g4")[0]
    return select(party, y, not_plane(party, bit63 ^ carry[0]))


def _partial_slice(party: Party, positions: torch.Tensor, q: int, j: int) -> torch.Tensor:
    """A slice [4, words] of tree positions 4q .. 4q + j - 1 (j < 4) topped up with neutral
    positions (party 0's bit 1, party 1's 0: they propagate and never generate), so that its G
    and P are those of the j positions."""
    out = torch.zeros((4, positions.shape[1]), dtype=positions.dtype)
    out[:j] = positions[4 * q : 4 * q + j]
    if party.index == 0:
        out[j:] = -1
    return out


def _sign_and_shift(party: Party, x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[x >> bits] where x >= 0 (what a ReLU keeps) and XOR shares of [x >= 0] as a bit plane,
    from the two parties' words x0, x1 (x = x0 + x1) and the carry tree, with no opening of x.

    With x0', x1' the words' low 63 bits, x0' + x1' = x + 2^63 s for x in [0, 2^63), where
    s = x0[63] ^ x1[63] (bit 63 of x is 0, so the carry into it is s), hence
        x >> bits = (x0' >> bits) + (x1' >> bits) + carry_bits - 2^(63 - bits) s
    with carry_bits the carry into bit `bits` of x0 + x1: G of the tree's positions 0..bits,
    i.e. of its q = (bits + 1) // 4 lowest slices and j = (bits + 1) % 4 positions above them.
    s is XOR-shared as it stands (each party's bit 63), carry_bits after a gate; both become
    ring shares by bit injection (`Request.b2a`: open u ^ rl, u = v + (1 - 2v) [rl] for the
    opened v), in rounds the comparison makes anyway:
      1. the tree's slices (`_slices`) and the j positions' G, P (`carry4` on them with
         neutral tops, as two more slices); open s ^ rl_0                      (1 round)
      2. the tree's gp4; carry_bits = G of the q slices and the j positions (`anf.g{q+1}`)
      3. the tree's g4 (the sign); open carry_bits ^ rl_1
      4. local: the shift above with the injected bits
    Rounds: 3, the comparison's. Bytes per element and party: the tree's and (2 q + 1) / 8 +
    2 / 8, plus 30 words per 64 elements for the j positions: about 5 where the masked
    opening of x took 8 and its borrow's gate 5 / 8. Dealer: 2 ring words per element (ra),
    and bit planes. What a party sees: words masked by fresh uniform dealer words or bits.
    """
    if not 0 < bits <= TREE_SHIFT_MAX:
        raise ValueError(f"the tree's shift must be in [1, {TREE_SHIFT_MAX}], got {bits}")
    q, j = divmod(bits + 1, 4)
    t = party.rand.take(Request.b2a(x.shape, 2))
    rl = t["rl"]
    planes = to_planes(x)
    positions = _positions(planes)
    slices = positions.view(16, 4, -1).transpose(0, 1)  # [bit in slice, slice, words]
    if j:  # twice: the cross gate wants an even number of slices (one of each party's a side)
        extra = _partial_slice(party, positions, q, j).unsqueeze(1)
        slices = torch.cat([slices, extra, extra], dim=1)
    tree, mine = fanin.cross_begin(party, slices, "carry4")
    wrap_mine = planes[63] ^ rl[0]
    theirs = party.channel.exchange([*mine, wrap_mine])
    g, p = fanin.cross_finish(tree, theirs[:2])
    gs, ps = list(g[:q]), list(p[1:q])
    if j:
        gs, ps = [*gs, g[16]], [*ps, p[16]] if q else ps
    g, p = g[:16], p[:16]
    wrap = wrap_mine ^ theirs[-1]  # s ^ rl_0, opened
    top, top_mine = fanin.masked_begin(party, _groups(g, p, 4), "gp4")
    if len(gs) > 1:
        low, low_mine = fanin.masked_begin(party, torch.stack([*gs, *ps]), f"g{len(gs)}")
        theirs = party.channel.exchange([*top_mine, *low_mine])
        (carry_bits,) = fanin.masked_finish(low, low_mine[0], theirs[1])
    else:
        theirs = party.channel.exchange(top_mine)
        carry_bits = gs[0]
    g, p = fanin.masked_finish(top, top_mine[0], theirs[0])
    top, top_mine = fanin.masked_begin(party, torch.cat([g, p[1:]]).unsqueeze(1), "g4")
    carry_mine = carry_bits.reshape(-1) ^ rl[1]
    theirs_top, theirs_carry = party.channel.exchange([*top_mine, carry_mine])
    (sign,) = fanin.masked_finish(top, top_mine[0], theirs_top)
    opened = (from_plane(v, x.shape) for v in (wrap, carry_mine ^ theirs_carry))
    s, carry = (
        v + (1 - 2 * v) * ra if party.index == 0 else (1 - 2 * v) * ra
        for v, ra in zip(opened, t["ra"], strict=True)
    )
    y = ((x & _LOW63) >> bits) + carry - (s << (RING_BITS - 1 - bits))
    return y, not_plane(party, planes[63] ^ sign[0])


def maximum(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[max(x, y)] = y + (x - y) * [x >= y]. Rounds: 4."""
    ge = not_(party, msb(party, x - y))
    return y + select(party, x - y, ge)


def max_pool2d(party: Party, x: torch.Tensor, kernel: int, maximum=maximum) -> torch.Tensor:
    """2D max pooling, stride = kernel, as a tree of `maximum` (this module's by default; `fss`
    passes its own). Rounds: ceil(log2(k*k)) times those of one `maximum` (4 here)."""
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


def argmax(party: Party, x: torch.Tensor) -> torch.Tensor:
    """The label over the last axis (first maximum on ties, like torch) as a zero test: shares in
    Z_p (p = `ring.PRIME`) of y_k = rho_k (wins_k - (n - 1)) per class k, for rho_k uniform in
    1..p-1 that no party knows. y is 0 at the label and uniform on 1..p-1 elsewhere, so the
    client, adding the two shares mod p, learns the label and nothing else.

    All n(n-1)/2 differences x_i - x_j are compared at once: the slices as in `msb`, then two
    groups of 8 slices (`anf.gp8`: G and P of bits 0..31 and 32..62), then the top as an
    arithmetic gate (`anf.lt2`: the sign bit as an integer of G_lo, G_hi, P_hi and bit 63,
    F(v ^ lambda) = sum_R c_R(v) Lambda_R over 10 sets R), whose dealer products come scaled by
    rho_i and rho_j (`Request.zmax`), so each party gets shares of rho_j [x_i < x_j] and
    rho_i [x_i < x_j] locally. (Groups of 8, not `msb`'s 4, because the top's products are
    ring words here, not bits: 9 x 2 per comparison instead of 45 x 2.) Class k wins against
    j < k if x_j < x_k and against j > k unless x_k < x_j, so
    y_k = sum_{j<k} rho_k lt_jk - sum_{j>k} rho_k lt_kj - k rho_k.
    Rounds: 3 (CrypTen: 57). Bytes per party and 64 comparisons: 8 x (8 x 30 + 2 x 16 + 4),
    about 35 per comparison. What a party sees: masked openings only; its output share is
    uniform.
    """
    n = x.shape[-1]
    rows = x.reshape(-1, n).shape[0]
    if n < 2:
        return torch.zeros_like(x)  # the only class: y = 0 for both parties
    if n > 10:
        raise ValueError(f"argmax takes at most 10 classes, got {n}")
    iu, ju = pairs(n)
    diff = (x[..., iu] - x[..., ju]).reshape(rows, -1)
    g, p, bit63, _ = _slices(party, diff)
    (g, p), _ = fanin.masked(party, _groups(g, p, 8), "gp8")
    fn = ARITH["lt2"]
    t = party.rand.take(Request.zmax(fn.name, (rows, n)))
    (v,) = party.open_xor(torch.stack([g[0], g[1], p[1], bit63]) ^ t["lam"])
    return zero_test(fn, from_planes_packed(v, diff.numel()), t, x.shape)


def zero_test(
    fn: Arith, packed: torch.Tensor, t: dict, shape: torch.Size, sign: torch.Tensor | None = None
) -> torch.Tensor:
    """The label's shares in Z_p, y_k = rho_k (wins_k - (n - 1)), from the opened inputs of the
    arithmetic top `fn` (packed per comparison, row-major over `pairs(n)`) and the dealer's rho
    and rho-scaled mask products (`Request.zmax`, `Request.zlut`). Local.

    `sign`: None when `fn` is the whole comparison bit lt (`lt2`). Otherwise `fn` is the carry c
    alone and lt = m ^ c for a bit m whose opening v_m is `sign` (0/1 per comparison) and whose
    mask lambda_m the dealer knows: with s = 1 - 2 v_m, rho lt = v_m rho + s (rho lambda_m +
    sum_R coef_R rho (1 - 2 lambda_m) Lambda_R), so the dealer deals one product per set R (the
    last column: rho lambda_m) instead of one for R and one for R with m.
    """
    n = shape[-1]
    rows = math.prod(shape) // n
    iu, ju = pairs(n)
    coef = fn.coefficients_mod[packed].reshape(rows, -1, len(fn.subsets))
    rho = t["rho"]
    v = None if sign is None else sign.reshape(rows, -1)

    def scaled(products: torch.Tensor, rho_side: torch.Tensor) -> torch.Tensor:
        """Shares of rho_side * lt per comparison: the constant term takes [rho] itself."""
        if v is None:
            return (coef[..., 0] * rho_side + (coef[..., 1:] * products).sum(-1)) % PRIME
        c = (coef * products[..., :-1]).sum(-1) + products[..., -1]
        return (v * rho_side + (1 - 2 * v) * c) % PRIME

    y = -torch.arange(n) * rho
    y = y.index_add(1, ju, scaled(t["X"], rho[:, ju])).index_add(1, iu, -scaled(t["Y"], rho[:, iu]))
    return (y % PRIME).reshape(shape)
