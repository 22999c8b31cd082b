"""Fixed-point rescaling: [x] -> [floor(x / 2^bits)] exactly, the one place it happens.

floor is the signed 64-bit arithmetic shift x >> bits, for EVERY x in Z_2^64: no input range,
no failure probability, and no dependence on the dealer's randomness, so the same shared input
always gives the same shares' sum (a label is a deterministic function of the input). Earlier
versions added 2^62 and gave floor or floor + 1 for |x| < 2^62 only, depending on the mask.

With a dealer mask r and the opening c = y + r mod 2^64 (c is uniform: it reveals nothing), the
integer y_u (y read as unsigned) is c - r + 2^64 [c < r], so, with lo = the low `bits` bits,
    y_u >>> bits = (c >>> bits) - (r >>> bits) - [c_lo < r_lo] + 2^(64 - bits) [c < r].
Both borrows compare the public c with the dealer's r: the dealer deals XOR-shared step tables
of r's slices (T_s[v] = [v < r_s], as `lut` does for signs), each party looks up lt_s = T_s[c_s]
and eq_s = [c_s = r_s] locally, and one masked gate (`carry_begin` / `carry_finish`) opens
those bits masked by fresh dealer bits lambda and evaluates the borrows arithmetically:
    borrow = sum_s lt_s eq_(s+1) ... eq_(S-1)  (the terms exclude each other, so + is XOR)
    prod_(i in M) u_i = sum_(R subset of M) prod_(M - R) delta_i prod_R (1 - 2 delta_i) Lambda_R
for the opened delta = u ^ lambda and the dealer's ring shares of Lambda_R = AND of the masks
in R (`dealer.carry_spec`: the slices and sets, chosen for the least dealer material).

`truncate(x)` (any x): y = x + 2^63, so x >> bits = (y_u >>> bits) - 2^(63 - bits); both
borrows (the 64-bit one [c < r] with a slice boundary at `bits`). Rounds: 2 (the opening, the
gate). Bytes per element and party: 8 + (2S - 1) / 8 (S slices: 7 for bits 16, 2 of them below
bit 16). Dealer: about 2 KB per element (the 64-bit borrow's products; used for logits and for
a linear layer right after another only, not on a ReLU network's path).

`begin` / `finish` (nonneg=True, for a ReLU's selected value): exact for y in [0, 2^63), i.e.
whenever the ReLU keeps it (its select zeroes the rest): there y_u = y and [c < r] =
msb(r) (1 - msb(c)), linear in [msb(r)]; only the low borrow needs the gate, whose opening
rides in a round the comparison makes anyway (a2b: its second; lut: its top's), so the ReLU
keeps its rounds. Bytes per element and party: 8 (c, shared with lut's sign) + (2L - 1) / 8
(L = 2 slices below bit 16 or 3 below 18). Dealer: L tables and 2^L + 2^(L-1) - 2 ring products,
12 words per element for bits 16, 13 for 18. `fss` passes its sign as an extra factor of the
gate (`extra`): the gate then gives [s * borrow] (twice the products).
What a party sees: c (uniform: r is), the gate's inputs masked by fresh uniform dealer bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from service.mpc.dealer import CarrySpec, Request, carry_spec
from service.mpc.party import Party
from service.mpc.ring import (
    RING_BITS,
    from_plane,
    from_planes_packed,
    logical_shift_right,
    msb,
    to_plane_rows,
)

_SIGN = 1 << (RING_BITS - 1)


@dataclass
class PendingTruncation:
    """A truncation between its masked opening and its local finish."""

    masked: torch.Tensor
    randomness: dict[str, torch.Tensor]
    bits: int
    spec: CarrySpec


@dataclass
class PendingCarry:
    """The low-carry gate between its masked opening and its evaluation."""

    mine: torch.Tensor
    t: dict[str, torch.Tensor]
    spec: CarrySpec
    count: int
    index: int


def _check(bits: int) -> None:
    if not 0 < bits < RING_BITS - 2:
        raise ValueError(f"truncation bits must be in (0, 62), got {bits}")


def begin(party: Party, x: torch.Tensor, bits: int, *, nonneg: bool = True) -> PendingTruncation:
    """The masked share of c this party will send (`Request.trunc`); nonneg: exact where x >= 0
    (a ReLU's kept values), else on the whole ring."""
    _check(bits)
    t = party.rand.take(Request.trunc(x.shape, bits, nonneg))
    if not nonneg and party.index == 0:
        x = x + torch.tensor(_SIGN - (1 << RING_BITS), dtype=x.dtype)  # + 2^63
    return PendingTruncation(x + t["r"], t, bits, carry_spec(bits, whole=not nonneg))


@cache
def _layout(spec: CarrySpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each slice's shift and width mask, as columns [S, 1], and the first table word of
    slices 0..S-1 then 1..S-1 [2S - 1, 1] (the rows `carry_begin` looks up)."""
    shift, width, first = torch.tensor(spec.slices).t().unsqueeze(-1)
    return shift, (1 << width) - 1, torch.cat([first, first[1:]])


def carry_begin(
    party: Party, c: torch.Tensor, t: dict, spec: CarrySpec, extra: torch.Tensor | None = None
) -> tuple[PendingCarry, torch.Tensor]:
    """The gate's message (its inputs masked, bit planes [inputs, words]) from the opened c and
    the tables `t["cT"]`; `extra`: XOR shares (0/1 per element) of a factor of every term."""
    flat = c.reshape(-1)
    shift, width, first = _layout(spec)
    idx = (flat.unsqueeze(0) >> shift) & width  # [S, n]: c's slices (the mask drops the sign)

    s = idx.shape[0]  # one gather: T[c_s] for every slice, T[c_s - 1] for slices 1..S-1
    i = torch.cat([idx, (idx[1:] - 1).clamp(min=0)])
    word = torch.gather(t["cT"], 1, (first + (i >> 6)).t()).t()
    both = (word >> (i & 63)) & 1
    lt = both[:s]
    le = torch.where(idx[1:] == 0, int(party.index == 0), both[s:])  # T[-1] = 1
    rows = [lt, lt[1:] ^ le, *([extra.reshape(1, -1) & 1] if extra is not None else [])]
    mine = to_plane_rows(torch.cat(rows)) ^ t["clam"]
    return PendingCarry(mine, t, spec, flat.numel(), party.index), mine


TABLE_INPUTS_MAX = 10  # gates up to this many inputs evaluate by a table of coefficients


@cache
def _coefficients(spec: CarrySpec) -> tuple[torch.Tensor, ...] | None:
    """Per output, [2^inputs, 1 + len(sets)]: for each opened word v, the coefficient of 1 and
    of each Lambda_R (R in `spec.sets`) in the output, prod over its monomials m of
    (v_i + (1 - 2 v_i) lambda_i) = sum_(R in m) prod_(m - R) v_i prod_R (1 - 2 v_i) Lambda_R;
    None for gates too wide for a table."""
    if spec.inputs > TABLE_INPUTS_MAX:
        return None
    v = np.arange(1 << spec.inputs)
    column = {0: 0} | {r: 1 + j for j, r in enumerate(spec.sets)}
    tables = []
    for monomials in spec.monomials:
        table = np.zeros((v.size, len(column)), dtype=np.int64)
        for mono in monomials:
            m = sum(1 << i for i in mono)
            r = m
            while True:  # every R inside m
                public = m & ~r
                sign = 1 - 2 * (np.bitwise_count(v & r) & 1).astype(np.int64)
                table[:, column[r]] += ((v & public) == public) * sign
                if not r:
                    break
                r = (r - 1) & m
        tables.append(torch.from_numpy(table))
    return tuple(tables)


def carry_finish(pending: PendingCarry, theirs: torch.Tensor) -> list[torch.Tensor]:
    """Ring shares of each output's borrow (`spec.outputs`), flat per element. Local."""
    delta = pending.mine ^ theirs
    n, lam = pending.count, pending.t["cL"]
    tables = _coefficients(pending.spec)
    if tables is not None:  # each element's opened inputs as one word, its coefficients looked up
        packed = from_planes_packed(delta, n)
        outs = []
        for table in tables:
            coef = table[packed]  # [n, 1 + sets]
            total = (coef[:, 1:] * lam.t()).sum(1)
            outs.append(total + coef[:, 0] if pending.index == 0 else total)
        return outs
    d = [from_plane(delta[i], (n,)) for i in range(pending.spec.inputs)]
    s = [1 - 2 * v for v in d]
    row = {mask: i for i, mask in enumerate(pending.spec.sets)}
    outs = []
    for monomials in pending.spec.monomials:
        terms, rows = [], []
        for mono in monomials:
            # prod (d_i + s_i lambda_i): the coefficient of Lambda_R for every R, index = R's
            # bits over the monomial (doubling: without i times d_i, then with i times s_i)
            coefs = [d[mono[0]], s[mono[0]]]
            for i in mono[1:]:
                coefs = [c * d[i] for c in coefs] + [c * s[i] for c in coefs]
            if pending.index == 0:
                terms.append(coefs[0])  # Lambda_{} = 1, held by party 0
                rows.append(None)
            for sub in range(1, len(coefs)):
                terms.append(coefs[sub])
                rows.append(row[sum(1 << mono[j] for j in range(len(mono)) if sub >> j & 1)])
        secret = [k for k, r in enumerate(rows) if r is not None]
        total = (torch.stack([terms[k] for k in secret]) * lam[[rows[k] for k in secret]]).sum(0)
        for k, r in enumerate(rows):
            if r is None:
                total += terms[k]
        outs.append(total)
    return outs


def finish(
    party: Party, pending: PendingTruncation, c: torch.Tensor, borrow: torch.Tensor
) -> torch.Tensor:
    """Shares of x >> bits (nonneg: where x >= 0) from the opened c and the gate's low borrow
    (shares, flat); local."""
    t, bits = pending.randomness, pending.bits
    low = borrow.reshape(c.shape)
    z = (t["r_msb"] * (1 - msb(c)) << (RING_BITS - bits)) - t["r_hi"] - low
    return z + logical_shift_right(c, bits) if party.index == 0 else z


def truncate(party: Party, x: torch.Tensor, bits: int) -> torch.Tensor:
    """Shares of x >> bits (signed floor) for any x in the ring. 2 rounds."""
    pending = begin(party, x, bits, nonneg=False)
    (c,) = party.open(pending.masked)
    gate, mine = carry_begin(party, c, pending.randomness, pending.spec)
    (theirs,) = party.channel.exchange([mine])
    low, wrap = (v.reshape(c.shape) for v in carry_finish(gate, theirs))
    z = (wrap << (RING_BITS - bits)) - pending.randomness["r_hi"] - low
    if party.index == 0:
        z = z + logical_shift_right(c, bits) - (1 << (RING_BITS - 1 - bits))
    return z
