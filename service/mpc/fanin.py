"""Boolean gates with many inputs in one round, on bit planes (functions from `anf`).

Two gates, both on int64 words whose bits are independent lanes (bit planes):

- `cross`: f(a, b) where one party holds a and the other b in the clear (the two addends of an
  arithmetic sharing, bit by bit). Groups are split in halves; in the first half party 0 holds
  a, in the second party 1, so both send the same amount. Per group and output,
  f = c_0(a) ^ XOR_T c_T(a) & b^T over the 2^k - 1 nonempty monomials b^T of b, and each
  coefficient c_T is one monomial of a (`anf.Cross`). The b side sends w_T = b^T ^ y_T, the a
  side m_S = a^S ^ x_S for each monomial S that is some coefficient (`support`: the outputs
  share them), for dealer words x (a side) and y (b side) and XOR shares of z = XOR_T x_{c_T}
  & y_T. Then the a side holds c_0 ^ XOR_T c_T & w_T ^ [z] and the b side XOR_T m_{c_T} & y_T
  ^ [z]; they XOR to f. Rounds: 1. Words sent per party and group pair: |support| + 2^k - 1,
  i.e. 30 per 64 lanes with `carry4` (G and P together).
  What a party sees: words masked by fresh uniform dealer words (uniform).
- `masked`: f(u) for XOR-shared inputs u. Both parties open delta = u ^ lambda for dealer masks
  lambda; each monomial m is then XOR_{R in m} delta^(m - R) & Lambda_R with Lambda_R the AND of
  the masks in R (Lambda_{} = 1, held by party 0; Lambda_{i} = lambda_i; larger R from the
  dealer, `anf.Masked.subsets`). Rounds: 1. Words sent per party: one per input (per 64
  lanes). What a party sees: delta, masked by fresh uniform lambda.

Both accept `ride`: additive shares opened in the same round (a protocol's other openings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from service.mpc.anf import CROSS, MASKED, Cross, Masked, Products
from service.mpc.dealer import Request
from service.mpc.party import Party


def _xor_reduce(x: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.from_numpy(np.bitwise_xor.reduce(x.numpy(), axis=axis))


def _monomials(bits: torch.Tensor) -> torch.Tensor:
    """All products of the k input rows [k, ...]: row m is the AND of the inputs in mask m."""
    return torch.from_numpy(_all_products(bits.shape[0])(bits.numpy()))


@cache
def _all_products(k: int) -> Products:
    products = Products.of(range(1 << k), k)
    assert all(row == mask for mask, row in products.row.items())  # doubling keeps mask order
    return products


def _exchange(party: Party, mine: list, ride: Sequence[torch.Tensor]) -> tuple[list, list]:
    """One round: this gate's messages and the `ride` shares; the peer's messages, and the
    ride values opened (added up)."""
    theirs = party.channel.exchange([*mine, *ride])
    k = len(mine)
    return theirs[:k], [m + o for m, o in zip(ride, theirs[k:], strict=True)]


@dataclass
class PendingCross:
    fn: Cross
    rand: dict[str, torch.Tensor]
    support: torch.Tensor  # [support, half, w] on this party's a-side half: the coefficients
    const: torch.Tensor  # [outputs, half, w]: the b-free terms c_0(a)
    index: int


@cache
def _terms(fn: Cross) -> tuple[tuple[list[int], list[int], list[int]], ...]:
    """Per output: the b-monomials (index T - 1) whose coefficient is 1, and those whose
    coefficient is a monomial of a with that monomial's support row (the others have none)."""
    return tuple(
        (
            [t for t, r in enumerate(row) if r == 1],
            [t for t, r in enumerate(row) if r >= 2],
            [r - 2 for r in row if r >= 2],
        )
        for row in fn.rows
    )


@cache
def _constant_rows(fn: Cross) -> torch.Tensor:
    """Rows of all a-monomials plus a zero row (index 2^k) that hold each constant term."""
    return torch.tensor([1 << fn.k if s is None else s for s in fn.constant])


def cross_begin(party: Party, bits: torch.Tensor, name: str) -> tuple[PendingCross, list]:
    """This party's messages for `cross` on its own bits [k, groups, w] (groups even)."""
    fn = CROSS[name]
    k, groups, w = bits.shape
    if k != fn.k or groups % 2:
        raise ValueError(f"{name} needs [{fn.k}, even groups, words], got {tuple(bits.shape)}")
    t = party.rand.take(Request.cross(name, (groups, w)))
    half = groups // 2
    lo, hi = bits[:, :half], bits[:, half:]
    a, b = (lo, hi) if party.index == 0 else (hi, lo)
    mono_a = _monomials(a)
    support = mono_a[list(fn.support)]
    const = torch.cat([mono_a, torch.zeros_like(mono_a[:1])])[_constant_rows(fn)]
    pending = PendingCross(fn, t, support, const, party.index)
    return pending, [support ^ t["x"], _monomials(b)[1:] ^ t["y"]]


def cross_finish(pending: PendingCross, theirs: Sequence[torch.Tensor]) -> torch.Tensor:
    """XOR shares of the outputs [outputs, groups, w] from the peer's messages."""
    their_support, their_mono = (v.numpy() for v in theirs)
    support, y = pending.support.numpy(), pending.rand["y"].numpy()
    # a side: c_0 ^ XOR_T c_T & (b^T ^ y_T); b side: XOR_T (c_T ^ x_T) & y_T; term by term,
    # in place (a coefficient 1 takes the other word as it is, a missing one nothing)
    as_a = pending.const.numpy().copy()
    as_b = np.zeros_like(as_a)
    xor = np.bitwise_xor.reduce
    for o, (ones, ts, rows) in enumerate(_terms(pending.fn)):
        as_a[o] ^= xor(their_mono[ones], axis=0) ^ xor(support[rows] & their_mono[ts], axis=0)
        as_b[o] ^= xor(y[ones], axis=0) ^ xor(their_support[rows] & y[ts], axis=0)
    halves = [as_a, as_b] if pending.index == 0 else [as_b, as_a]
    return torch.from_numpy(np.concatenate(halves, axis=1)) ^ pending.rand["z"]


def cross(party: Party, bits: torch.Tensor, name: str, ride: Sequence[torch.Tensor] = ()):
    """XOR shares of f(a, b) [outputs, groups, w], and the opened `ride` values. 1 round."""
    pending, mine = cross_begin(party, bits, name)
    theirs, opened = _exchange(party, mine, ride)
    return cross_finish(pending, theirs), opened


@dataclass(frozen=True)
class _MaskedPlan:
    public: Products  # the products of opened words each term needs
    public_row: np.ndarray  # per term: its row in that table
    secret_row: np.ndarray  # per term: its row of the Lambda table [1, lambda, dealer's]
    starts: tuple[int, ...]  # first term of each output (terms are sorted by output)


@cache
def _masked_plan(fn: Masked) -> _MaskedPlan:
    public = Products.of((p for _, p, _ in fn.terms), fn.inputs)
    lam = {0: 0} | {1 << i: 1 + i for i in range(fn.inputs)}
    lam |= {r: 1 + fn.inputs + j for j, r in enumerate(fn.subsets)}
    outputs = [o for o, _, _ in fn.terms]
    return _MaskedPlan(
        public,
        np.array([public.row[p] for _, p, _ in fn.terms]),
        np.array([lam[r] for _, _, r in fn.terms]),
        tuple(outputs.index(o) for o in range(len(fn.monomials))),
    )


@dataclass
class PendingMasked:
    fn: Masked
    rand: dict[str, torch.Tensor]
    index: int


def masked_begin(party: Party, inputs: torch.Tensor, name: str) -> tuple[PendingMasked, list]:
    """This party's message for `masked` on XOR shares [inputs, ...]."""
    fn = MASKED[name]
    if inputs.shape[0] != fn.inputs:
        raise ValueError(f"{name} takes {fn.inputs} inputs, got {inputs.shape[0]}")
    t = party.rand.take(Request.mand(name, tuple(inputs.shape)))
    return PendingMasked(fn, t, party.index), [inputs ^ t["lam"]]


def masked_finish(pending: PendingMasked, mine: torch.Tensor, theirs: torch.Tensor):
    """XOR shares of the outputs [outputs, ...] from both parties' openings."""
    delta = (mine ^ theirs).numpy()
    plan, t = _masked_plan(pending.fn), pending.rand
    d = plan.public(delta)
    one = d[:1] if pending.index == 0 else np.zeros_like(d[:1])
    lam = np.concatenate([one, t["lam"].numpy(), t["L"].numpy()])
    products = np.take(d, plan.public_row, axis=0)
    products &= np.take(lam, plan.secret_row, axis=0)
    # each output's terms are a run starting at plan.starts (none empty): one reduceat for all
    return torch.from_numpy(np.bitwise_xor.reduceat(products, plan.starts, axis=0))


def masked(party: Party, inputs: torch.Tensor, name: str, ride: Sequence[torch.Tensor] = ()):
    """XOR shares of f(inputs) [outputs, ...], and the opened `ride` values. 1 round."""
    pending, mine = masked_begin(party, inputs, name)
    theirs, opened = _exchange(party, mine, ride)
    return masked_finish(pending, mine[0], theirs[0]), opened
