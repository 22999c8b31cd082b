"""Comparison by table lookup: a 2-round sign (ReLU 3 rounds, argmax 2), paid in dealer tables.

[x] is opened masked, c = x + r for a uniform dealer mask r (c reveals nothing), and, with
x = c - r, the sign is
    msb(x) = msb(c) ^ msb(r) ^ [c' < r']        (c', r': the low 63 bits)
exact on the whole ring (with the truncation's offset, r stands for r + 2^62 here). The borrow
[c' < r'] compares a public number with the dealer's: cut both into S slices
(`dealer.slice_layout`: 9 of 7 bits for signs); per slice, lt_s = [c_s < r_s] and
eq_s = [c_s = r_s] are bits of a table the dealer deals XOR-shared, T_s[v] = [v < r_s] for
every v in 0..2^w - 1 (a one-time truth table: Ishai, Kushilevitz, Meldgaard, Orlandi and
Paskin-Cherniavsky, TCC 2013; Dessouky et al., NDSS 2017), so lt_s = T_s[c_s] and
eq_s = T_s[c_s - 1] ^ T_s[c_s] (T_s[-1] = 1) are two local lookups. The borrow is then the G of
the slices with lt as generate and eq as propagate,
XOR_s lt_s eq_(s+1) ... eq_(S-1), one `fanin.masked` gate (`anf.g9`):
  1. open c = x + r (the truncation's opening: the same c serves both)        (1 round)
  2. lookups (local); the top over the 9 slices                                (1 round)
Sign: 2 rounds (a2b: 3). Bytes per element and party: 8 (c, shared with the truncation) + 17/8
(the top's masked inputs). Dealer per element, to party 1: the tables, S 2^w bits (w = 7,
S = 9: 144 bytes), and the top's 749 mask products (about 94 bytes); party 0 expands the same
from its seed. So this trades dealer material for rounds: `network` uses it for the small
comparison layers and keeps a2b for the large first one.

`relu`: sign, then `comparison.select_plane` (or the caller's fused select): 3 rounds.
`argmax`: the label as `comparison.argmax`'s zero test in Z_p, in 2 rounds: all n (n - 1) / 2
differences opened masked at once; 6 slices of 11, 11, 11, 10, 10, 10 bits (tables of 1,152
bytes: 6 is where tables and top cost least together); the top is the arithmetic gate
`anf.c6` over lt_s and eq_s, with m = msb(c) ^ msb(r) (its mask msb(r) is the dealer's) joined
as `comparison.zero_test` says, scaled by the classes' rho (`Request.zlut`).
What a party sees: c (uniform: r is), the top's inputs masked by fresh dealer bits (uniform), the
select's openings (uniform); its output shares are uniform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache, partial

import torch

from service.mpc import comparison, fanin, truncation
from service.mpc.anf import ARITH
from service.mpc.dealer import Request, pairs, slice_layout
from service.mpc.party import Party
from service.mpc.ring import from_planes_packed, msb, to_plane, to_plane_rows

LABEL_SHARING = comparison.LABEL_SHARING  # the same zero test
SIGN_SLICE_BITS = 7  # 9 slices: tables of 128 bits
ARGMAX_SLICE_BITS = 11  # 6 slices: tables of 2,048 bits (45 comparisons per image only)
_LOW63 = (1 << 63) - 1


@cache
def _layout(w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each slice's shift and width mask (`dealer.slice_layout(w)`) as columns [S, 1], and the
    first table word of slices 0..S-1 then 1..S-1 [2S - 1, 1] (the rows `_lookup` reads)."""
    shift, width, first = torch.tensor(slice_layout(w)).t().unsqueeze(-1)
    return shift, (1 << width) - 1, torch.cat([first, first[1:]])


def _lookup(party: Party, c: torch.Tensor, tables: torch.Tensor, w: int) -> torch.Tensor:
    """XOR shares of lt_s and eq_s for every slice s (`dealer.slice_layout(w)`), as bit planes
    [2S - 1, words]: lt of slices 0..S-1, then eq of slices 1..S-1 (the top never needs eq of
    slice 0). `tables`: this party's shares [elements, words]."""
    shift, width, first = _layout(w)
    idx = (c.reshape(1, -1) & _LOW63) >> shift & width  # [S, n]: c's slices
    s = idx.shape[0]  # one gather: T[c_s] for every slice, T[c_s - 1] for slices 1..S-1
    i = torch.cat([idx, (idx[1:] - 1).clamp(min=0)])
    word = torch.gather(tables, 1, (first + (i >> 6)).t()).t()
    both = (word >> (i & 63)) & 1
    lt = both[:s]
    le = torch.where(idx[1:] == 0, int(party.index == 0), both[s:])  # T[-1] = 1
    return to_plane_rows(torch.cat([lt, lt[1:] ^ le]))


def _open(party: Party, x: torch.Tensor, t: dict) -> torch.Tensor:
    """c = x + r, opened (1 round)."""
    (c,) = party.open(x + t["r"])
    return c


def _sign(party: Party, c: torch.Tensor, t: dict, xor_ride: Sequence[torch.Tensor] = ()):
    """XOR shares of msb(c - r) as a bit plane, from the opened c and the lut material. 1 round
    (the top). With `xor_ride` (messages sent in the same round): also the peer's ones."""
    inputs = _lookup(party, c, t["T"], SIGN_SLICE_BITS)
    gate, mine = fanin.masked_begin(party, inputs, f"g{len(slice_layout(SIGN_SLICE_BITS))}")
    theirs, *ride = party.channel.exchange([*mine, *xor_ride])
    (borrow,) = fanin.masked_finish(gate, mine[0], theirs)
    sign = borrow ^ t["m"] ^ (to_plane(msb(c)) if party.index == 0 else 0)
    return (sign, ride) if xor_ride else sign


def msb_plane(party: Party, x: torch.Tensor) -> torch.Tensor:
    """XOR shares of the sign bits of [x] (1 where x < 0) as one bit plane. 2 rounds."""
    t = party.rand.take(Request.lut(x.shape, SIGN_SLICE_BITS))
    return _sign(party, _open(party, x, t), t)


def relu(
    party: Party, x: torch.Tensor, trunc_bits: int = 0, select: Callable = comparison.select_plane
) -> torch.Tensor:
    """[max(x, 0) / 2^trunc_bits]: the truncation's opening is the sign's c. Rounds: 2 + 1
    (select, or the caller's fused select as in `comparison.relu`). Bytes per element and
    party: 8 + 17/8 + 8 + 1/8."""
    t = party.rand.take(Request.lut(x.shape, SIGN_SLICE_BITS, trunc_bits))
    c = _open(party, x, t)  # the truncation's opening too
    if not trunc_bits:
        return select(party, x, comparison.not_plane(party, _sign(party, c, t)))
    spec = truncation.carry_spec(trunc_bits)
    low, low_mine = truncation.carry_begin(party, c, t, spec)
    sign, (low_theirs,) = _sign(party, c, t, [low_mine])  # the low borrow rides with the top
    pending = truncation.PendingTruncation(c, t, trunc_bits, spec)
    y = truncation.finish(party, pending, c, truncation.carry_finish(low, low_theirs)[0])
    return select(party, y, comparison.not_plane(party, sign))


def maximum(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[max(x, y)] = y + (x - y) [x >= y]. Rounds: 3."""
    ge = comparison.not_plane(party, msb_plane(party, x - y))
    return y + comparison.select_plane(party, x - y, ge)


max_pool2d = partial(comparison.max_pool2d, maximum=maximum)


def argmax(party: Party, x: torch.Tensor) -> torch.Tensor:
    """The label over the last axis as `comparison.argmax`'s zero test (shares in Z_p of
    rho_k (wins_k - (n - 1)), 0 at the first maximum only). Rounds: 2 (a2b: 3). Bytes per
    comparison and party: 8 (c) + 11/8 (the top's masked inputs). Dealer per comparison:
    6 tables (1,152 bytes) and 2 x 96 values in Z_p (16 bits each on the wire)."""
    n = x.shape[-1]
    if n < 2:
        return torch.zeros_like(x)  # the only class: y = 0 for both parties
    if n > 10:
        raise ValueError(f"argmax takes at most 10 classes, got {n}")
    rows = x.reshape(-1, n).shape[0]
    iu, ju = pairs(n)
    diff = (x[..., iu] - x[..., ju]).reshape(rows, -1)
    fn = ARITH["c6"]
    t = party.rand.take(Request.zlut(fn.name, (rows, n), ARGMAX_SLICE_BITS))
    c = _open(party, diff, t)
    (v,) = party.open_xor(_lookup(party, c, t["T"], ARGMAX_SLICE_BITS) ^ t["lam"])
    packed = from_planes_packed(v, diff.numel())
    return comparison.zero_test(fn, packed, t, x.shape, sign=msb(c))
