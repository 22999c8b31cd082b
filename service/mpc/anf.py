"""Boolean functions in algebraic normal form, for the one-round gates of `fanin` (pure tables).

A function of n bits is, per output, the XOR of AND-monomials over its inputs (its ANF); a
monomial is a bitmask of inputs. `fanin` evaluates such a function on XOR-shared bits in one
round, and the dealer (`dealer.py`) derives the matching correlated randomness from the same
tables, so both sides read them from here.

Two shapes of gate:
- **cross** (`Cross`): inputs a (k bits, known in the clear to one party) and b (k bits, known
  to the other). Per output, f(a, b) = XOR_T c_T(a) b^T over the monomials b^T of b; each
  c_T(a) is one product of a's bits for the functions used here (checked at import).
- **masked** (`Masked`): inputs XOR-shared between the parties. Opening u ^ lambda for dealer
  masks lambda turns each monomial into XOR_{R subset m} (public part) & Lambda_R, where
  Lambda_R is the AND of the masks in R: the dealer deals shares of Lambda_R for every R with at
  least two inputs (`subsets`).
- **arithmetic** (`Arith`): the same opening, for an integer-valued function: with v = u ^
  lambda public, F(u) = F(v ^ lambda) is an integer polynomial in the mask bits,
  sum_R coefficient[v][R] Lambda_R (Lambda_R the product of the masks in R, Lambda_{} = 1), so
  additive shares of the Lambda_R in any ring give additive shares of F(u) there, locally.

Functions here:
- `carry4` (cross, 4 + 4 bits): the group generate G (carry out of a + b with no carry in) and
  propagate P (a ^ b all ones) of a 4-bit slice of two addends.
- `gp4` (masked, 8 bits G0..G3, P0..P3, 0 lowest): G = G3 ^ P3 G2 ^ P3 P2 G1 ^ P3 P2 P1 G0 and
  P = P0 P1 P2 P3, four groups into one (valid because G_i P_i = 0, so the terms exclude each
  other and XOR is OR).
- `g4` (masked, 7 bits G0..G3, P1..P3): G only, for the top of the tree.
- `gp8` (masked, 16 bits G0..G7, P0..P7): G and P of eight groups at once, as `gp4`.
- `g2`, `g3`, `g5`, `g6` (masked, as `g4`): the carry into a truncation's shift from the
  tree's lowest slices (`comparison.relu`).
- `lt2` (arithmetic, 4 bits G_lo, G_hi, P_hi and the sum's bit 63 before the carry): the sign
  bit = bit ^ (G_hi ^ P_hi G_lo) as an integer, for the argmax's zero test.
- `c6` (arithmetic, 11 bits G0..G5, P1..P5): the carry of 6 slices as an integer, for `lut`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from service.mpc.ring import PRIME


def _moebius(table: np.ndarray, n: int) -> np.ndarray:
    """The integer Moebius transform along axis 0 of a table over n-bit words: row m becomes
    sum over submasks S of m of (-1)^|m - S| table[S], the coefficient of the monomial m of the
    function's multilinear polynomial (mod 2: of its ANF). In place."""
    words = np.arange(1 << n)
    for i in range(n):
        bit = (words >> i & 1).astype(bool)
        table[bit] -= table[words[bit] ^ (1 << i)]
    return table


def _anf(truth: Callable[[int], tuple[int, ...]], n: int, outputs: int) -> tuple[tuple[int, ...]]:
    """The ANF monomials of each output of `truth` on n bits (Moebius transform of the table)."""
    table = np.array([truth(v) for v in range(1 << n)], dtype=np.int64).reshape(-1, outputs) & 1
    table = _moebius(table, n) & 1
    return tuple(tuple(int(m) for m in np.flatnonzero(table[:, o])) for o in range(outputs))


@dataclass(frozen=True)
class Products:
    """How to AND the inputs of many input sets together by doubling: step (i, src, n) appends,
    for each of the n rows src, that row AND input i. Row 0 is the empty set (all ones)."""

    steps: tuple[tuple[int, np.ndarray | slice, int], ...]  # (i, src rows, how many)
    row: dict[int, int]  # input set (bitmask) -> its row

    @staticmethod
    def of(needed: Iterable[int], inputs: int) -> Products:
        needed = set(needed)
        # every set is built from its part below input i, for each i in turn
        closure = {m & ((2 << i) - 1) for m in needed for i in range(inputs)} | {0}
        masks, steps = [0], []
        for i in range(inputs):
            src = [j for j, m in enumerate(masks) if (m | 1 << i) in closure and not m >> i & 1]
            if src:  # a run of rows reads as a view, not a copy
                run = src == list(range(src[0], src[0] + len(src)))
                rows = slice(src[0], src[0] + len(src)) if run else np.array(src)
                steps.append((i, rows, len(src)))
                masks += [masks[j] | 1 << i for j in src]
        return Products(tuple(steps), {m: j for j, m in enumerate(masks)})

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        """The table of products [rows, ...] for the input words [inputs, ...]."""
        out = np.empty((len(self.row), *inputs.shape[1:]), dtype=inputs.dtype)
        out[0] = -1
        end = 1
        for i, src, n in self.steps:
            np.bitwise_and(out[src], inputs[i], out=out[end : end + n])
            end += n
        return out


@dataclass(frozen=True)
class Masked:
    """A function of `inputs` XOR-shared bits, one tuple of monomials per output."""

    name: str
    inputs: int
    monomials: tuple[tuple[int, ...], ...]

    @cached_property
    def subsets(self) -> tuple[int, ...]:
        """Input sets R (bitmasks, at least two inputs) whose mask products the dealer deals."""
        monos = (m for o in self.monomials for m in o)
        return tuple(sorted({r for m in monos for r in _submasks(m) if r & (r - 1)}))

    @cached_property
    def mask_products(self) -> Products:
        """How the dealer builds Lambda_R for every R in `subsets`."""
        return Products.of(self.subsets, self.inputs)

    @cached_property
    def terms(self) -> tuple[tuple[int, int, int], ...]:
        """(output, public mask m - R, mask set R) for every R inside every monomial m."""
        return tuple(
            sorted(
                (o, mono & ~r, r)
                for o, monos in enumerate(self.monomials)
                for mono in monos
                for r in _submasks(mono)
            )
        )

    def __call__(self, bits: int) -> tuple[int, ...]:
        """The clear outputs for input bits packed in an int (tests)."""
        return tuple(sum((bits & m) == m for m in monos) & 1 for monos in self.monomials)


@dataclass(frozen=True)
class Cross:
    """f(a, b) for a: `k` bits of one party, b: `k` bits of the other; per output o and nonempty
    b-monomial T, coefficient[o][T] is the a-monomial whose product multiplies b^T (None: 0),
    and constant[o] the a-monomial of the b-free term (None: 0). f must be symmetric
    (f(a, b) = f(b, a)): `fanin.cross` lets the parties swap roles for half the groups."""

    name: str
    k: int
    outputs: int
    coefficient: tuple[tuple[int | None, ...], ...]
    constant: tuple[int | None, ...]

    @property
    def width(self) -> int:
        """Nonempty b-monomials: the masked words the b side sends per group."""
        return (1 << self.k) - 1

    @cached_property
    def support(self) -> tuple[int, ...]:
        """The a-monomials (other than 1) that are some coefficient: the masked words the a
        side sends per group, each once however many coefficients it is."""
        used = {s for row in self.coefficient for s in row if s}
        return tuple(sorted(used))

    @cached_property
    def rows(self) -> tuple[tuple[int, ...], ...]:
        """Per output and b-monomial: the row of a table [0, 1, support...] that holds its
        coefficient."""

        def row(s: int | None) -> int:
            return 0 if s is None else 1 if s == 0 else 2 + self.support.index(s)

        return tuple(tuple(row(s) for s in r) for r in self.coefficient)

    def __call__(self, a: int, b: int) -> tuple[int, ...]:
        """The clear outputs (tests)."""
        out = []
        for o in range(self.outputs):
            v = 0 if self.constant[o] is None else int((a & self.constant[o]) == self.constant[o])
            for t in range(1, 1 << self.k):
                s = self.coefficient[o][t - 1]
                if s is not None and (b & t) == t and (a & s) == s:
                    v ^= 1
            out.append(v)
        return tuple(out)


@dataclass(frozen=True)
class Arith:
    """An integer-valued function of `inputs` XOR-shared bits, as its multilinear polynomial:
    (monomial, integer coefficient) pairs (`_poly` of its values on every input word; inputs
    that never occur may take any value that keeps the polynomial small)."""

    name: str
    inputs: int
    poly: tuple[tuple[int, int], ...]

    def __call__(self, bits: int) -> int:
        """The clear value for input bits packed in an int (tests)."""
        return sum(c for m, c in self.poly if bits & m == m)

    @cached_property
    def _table(self) -> np.ndarray:
        """[v, R] for every opening v and every R inside some monomial: with u_k = v_k ^
        lambda_k = v_k + (1 - 2 v_k) lambda_k, a monomial m is sum over R in m of
        prod_{m - R} v_k prod_R (1 - 2 v_k) Lambda_R."""
        words = np.arange(1 << self.inputs)
        sets = sorted({r for m, _ in self.poly for r in _submasks(m)})
        col = {r: j for j, r in enumerate(sets)}
        table = np.zeros((len(words), len(sets)), dtype=np.int64)
        for m, c in self.poly:
            for r in _submasks(m):
                public = m & ~r
                sign = 1 - 2 * (np.bitwise_count(words & r) & 1).astype(np.int64)
                table[:, col[r]] += c * ((words & public) == public) * sign
        keep = table.any(axis=0)
        return table[:, keep], tuple(r for r, k in zip(sets, keep, strict=True) if k)

    @property
    def subsets(self) -> tuple[int, ...]:
        """The mask sets R whose products Lambda_R appear for some v (the empty set first)."""
        return self._table[1]

    @property
    def coefficients(self) -> np.ndarray:
        """[2^inputs, len(subsets)]: F(v ^ lambda) = sum_j coefficients[v, j] Lambda_subsets[j]."""
        return self._table[0]

    @cached_property
    def mask_products(self) -> torch.Tensor:
        """[2^inputs, len(subsets)] 0/1 (uint8): Lambda_R for every mask word lambda and every R of
        `subsets` (the empty one: 1), the dealer's side of the gate."""
        words = np.arange(1 << self.inputs)[:, None]
        sets = np.array(self.subsets)[None, :]
        return torch.from_numpy(((words & sets) == sets).astype(np.uint8))

    @cached_property
    def coefficients_mod(self) -> torch.Tensor:
        """`coefficients` mod p (`ring.PRIME`), for the zero test in Z_p."""
        return torch.from_numpy(self.coefficients % PRIME)


def _submasks(m: int) -> Iterable[int]:
    """Every submask of m, m itself first and 0 last."""
    r = m
    while True:
        yield r
        if not r:
            return
        r = (r - 1) & m


def _poly(truth: Callable[[int], int], n: int) -> tuple[tuple[int, int], ...]:
    """The multilinear polynomial of an integer function of n bits (Moebius transform)."""
    table = _moebius(np.array([truth(v) for v in range(1 << n)], dtype=np.int64), n)
    return tuple((int(m), int(table[m])) for m in np.flatnonzero(table))


def _cross(name: str, k: int, outputs: int, truth: Callable[[int, int], tuple[int, ...]]) -> Cross:
    mask = (1 << k) - 1
    monos = _anf(lambda v: truth(v & mask, v >> k), 2 * k, outputs)
    coefficient, constant = [], []
    for o in range(outputs):
        per_t: dict[int, int] = {}
        for m in monos[o]:
            t = m >> k
            if t in per_t:
                raise AssertionError(f"{name}: b^{t} has more than one coefficient monomial")
            per_t[t] = m & mask
        constant.append(per_t.get(0))
        coefficient.append(tuple(per_t.get(t) for t in range(1, 1 << k)))
    if any(truth(a, b) != truth(b, a) for a in range(1 << k) for b in range(1 << k)):
        raise AssertionError(f"{name}: the parties swap roles, so f(a, b) must equal f(b, a)")
    return Cross(name, k, outputs, tuple(coefficient), tuple(constant))


def _masked(name: str, n: int, outputs: int, truth: Callable[[int], tuple[int, ...]]) -> Masked:
    return Masked(name, n, _anf(truth, n, outputs))


def _bit(v: int, i: int) -> int:
    return v >> i & 1


def _gp(n: int) -> Callable[[int], tuple[int, int]]:
    """G and P of n groups, inputs G0..G(n-1) = bits 0..n-1 and P0..P(n-1) = bits n..2n-1 (0
    lowest): G = XOR_i G_i P_(i+1) ... P_(n-1) (the terms exclude each other, so XOR is OR)."""

    def gp(v: int) -> tuple[int, int]:
        g, p = [_bit(v, i) for i in range(n)], [_bit(v, n + i) for i in range(n)]
        big_g = 0
        for i in range(n):
            term = g[i]
            for j in range(i + 1, n):
                term &= p[j]
            big_g ^= term
        return big_g, int(all(p))

    return gp


def _g_top(n: int) -> Masked:
    """G only of n groups, for the top of a tree: inputs G0..G(n-1) = bits 0..n-1 and P1..P(n-1)
    = bits n..2n-2 (P0 is never needed); monomials G_i P_(i+1) ... P_(n-1), built directly."""
    monos = [1 << i | sum(1 << (n + j - 1) for j in range(i + 1, n)) for i in range(n)]
    return Masked(f"g{n}", 2 * n - 1, (tuple(sorted(monos)),))


CARRY4 = _cross("carry4", 4, 2, lambda a, b: (int(a + b >= 16), int(a ^ b == 15)))
GP4 = _masked("gp4", 8, 2, _gp(4))
G4 = _g_top(4)
G9 = _g_top(9)  # the top of `lut`'s sign: 9 slices of 7 bits
GP8 = _masked("gp8", 16, 2, _gp(8))
G_LOW = tuple(_g_top(n) for n in (2, 3, 5, 6))  # a2b's low carry for a truncation (with G4)
MASKED = {f.name: f for f in (GP4, G4, GP8, G9, *G_LOW)}
CROSS = {CARRY4.name: CARRY4}


def _lt(n: int) -> Callable[[int], int]:
    """m ^ carry for n groups, inputs G0..G(n-1) = bits 0..n-1, P1..P(n-1) = bits n..2n-2 and m
    (the sum's bit 63 before the carry) = bit 2n-1; carry = sum_i G_i P_(i+1) ... P_(n-1),
    written so that its integer polynomial is small: the terms exclude each other when a group
    never both generates and propagates (always true of the tree's values), so their XOR is
    their sum, and m ^ c = m + c - 2 m c. Other inputs never occur."""

    def lt(v: int) -> int:
        g = [_bit(v, i) for i in range(n)]
        p = [0] + [_bit(v, n + j) for j in range(n - 1)]  # p[0]: never used
        m = _bit(v, 2 * n - 1)
        c = sum(g[i] * math.prod(p[i + 1 :]) for i in range(n))
        return m + c - 2 * m * c

    return lt


LT2 = Arith("lt2", 4, _poly(_lt(2), 4))  # (G_lo, G_hi, P_hi, m): `comparison.argmax`'s top
# the carry of 6 slices alone (`_lt` without its m input, which is then 0): `lut.argmax`'s top,
# which handles m itself (one mask product per set instead of two)
C6 = Arith("c6", 11, _poly(_lt(6), 11))
ARITH = {f.name: f for f in (LT2, C6)}
