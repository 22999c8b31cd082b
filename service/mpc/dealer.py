"""Correlated randomness from a dealer, seed-compressed and bound to a request id.

Kinds (each a `Request`; shapes are public, values secret):
- `beaver(op, x_shape, y_shape)`: [a], [b], [c] with c = op(a, b) for op in mul | matmul | conv2d
  | conv2d_pool (a convolution followed by k x k sum pooling: c is k^2 times smaller).
- `beaverw(op, x_shape, w_shape, mask_id, name)`: the same for a model weight whose mask b is
  fixed per model (mask id) and weight name: [b] comes from a per-(model, weight, party) mask
  seed, so the parties open W - b once per model instead of once per query (`beaver.linear`).
- `and(shape)`: XOR shares of words a, b, c with c = a & b.
- `trunc(shape, bits)`: [r], [r >>> bits], [msb(r)] for uniform r (dealer-assisted truncation).
- `b2a(shape, count)`: `count` random bits per element, XOR shares of their bit planes rl
  [count, words] and ring shares of the same bits ra [count, *shape] (bit injection: one
  opened plane turns an XOR-shared bit into a ring share; `comparison.relu`'s truncation).
- `mux(shape)`: random bits rb, one per element, as XOR shares of their bit plane and as [rb],
  a uniform [a], and [a * rb].
- `muxw((batch, n), (n, m), mask_id, name)`: `mux` for a select whose result goes straight into
  the model weight W (n x m, fixed mask b as in `beaverw`), plus [rb_j b_jk], [a_j b_jk] and
  [a_j rb_j b_jk] for every row, j and k (`beaver.select_linear`: the select and the product
  in one round).
- `cross(fn, (groups, w))`: for a one-round gate whose two operands each party holds one of
  (`fanin.cross`, function `fn` of `anf`): each party's dealer words x (its a-side half) and y
  (its b-side half) from its own seed, and XOR shares of z = XOR_T x_{c_T} & y_T.
- `mand(fn, shape)`: for a one-round gate on XOR-shared inputs (`fanin.masked`): XOR shares of
  masks lambda [inputs, ...] and of Lambda_R, the AND of the masks in each set R of
  `anf.MASKED[fn].subsets`.
- `zmax(fn, (rows, n))`: for the label's zero test (`comparison.argmax`), on the n (n - 1) / 2
  pairwise comparisons of each row: XOR shares of masks lambda [inputs, words] (bit planes of the
  comparisons) and, in Z_p (p = `ring.PRIME`), shares of rho_i Lambda_R and rho_j Lambda_R for
  each comparison (i, j) and set R of `anf.ARITH[fn].subsets` (R nonempty), and of rho_k for each
  class, with rho uniform in 1..p-1 per row and class, known to no party.
- `lut(shape, w, bits)`: for `lut`'s comparison by table lookup: a uniform mask [r]; with
  r' = r + 2^62 when bits > 0 (the truncation's offset: party 0 adds it before the opening)
  and r' = r otherwise, XOR shares of the step tables T_s[v] = [v < r'_s] (v in 0..2^width - 1)
  of the S = ceil(63 / w) slices r'_s of r' mod 2^63 (at most w bits each, as equal as can be:
  `slice_layout`), as [elements, table_words(w)] words, and of msb(r') as a bit plane; when
  bits > 0 also [r >>> bits] and [msb(r)] (`trunc`).
- `zlut(fn, (rows, n), w)`: for `lut.argmax`: the same mask r and tables (offset 0) for the
  n (n - 1) / 2 differences of each row, XOR-shared masks lambda of the carry `fn`'s inputs (bit
  planes), and in Z_p, per comparison (i, j) and rho in (rho_j, rho_i): rho (1 - 2 msb(r))
  Lambda_R for every set R of `fn` (the empty one first) and rho msb(r), and rho_k per class
  (`comparison.zero_test` with a sign: the comparison bit is msb(c) ^ msb(r) ^ carry).
- `fss(shape, gate, bits)`: a uniform mask [r], and DCF keys for alpha = r mod 2^63 with the
  gate's payload plus its constants (see `fss.py`); gate `sign` or `relu` (bits: truncation).

Compression (as in CrypTen's TTP provider): party 0 receives only a 32-byte seed and expands all
its shares locally; party 1 receives a seed plus the corrections for the derived values (c, r
>>> bits, ...). DCF keys cannot be compressed that way: both parties receive their correction
words (their root seeds they still draw from their own seed). The seeds come from HMAC-
SHA256(master key, request id, party), so the dealer keeps no randomness between requests
(except DCF keys made for one party, until the other fetches its copy); it only remembers which
(request id, party) it has served and refuses a second time.

Run ids and the window (a served-once rule with bounded memory): a run id is `new_run_id()`,
the minting time in whole Unix seconds as 10 digits, "-", and 22 characters of
`secrets.token_urlsafe` (33 characters of [A-Za-z0-9_-], e.g. `1718000000-4fJx0v1bQk2m9Zr7TtYw3A`).
A dealer with a window (`Dealer(window_s=...)`, the service's, 600 s by default) serves only run
ids whose time is within the window of its clock: older ones (`t < now - window`), ones from
the future (`t > now + window`) and ones without a time are refused (`RunIdOutOfWindow`). It
forgets a served id once its time leaves the window; the line it forgets below only rises (a
clock stepped back cannot readmit a forgotten id), and an id older than the line is refused, so
each (run id, party) is still served at most once, and the dealer remembers only the ids minted
within 2 windows: memory is bounded by the request rate times twice the window. Without a window
(in-process use: tests, benchmarks, the demo) any non-empty id is accepted and remembered for
the dealer's life. Randomness is
never reused: a `Randomness` consumes its material in plan order, refuses a request that differs
from the plan, and refuses to be drawn past its end.

What the dealer sees: the public plan (kinds and shapes), nothing of any share or data.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, cached_property, lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from service.mpc import anf, dcf
from service.mpc.prg import PRG, SEED_BYTES, fresh_seed
from service.mpc.ring import (
    PRIME,
    RING_BITS,
    from_plane,
    from_planes_packed,
    logical_shift_right,
    msb,
    to_plane,
)

INSTANCE_BYTES = 16


class RandomnessReused(RuntimeError):
    """Correlated randomness was asked for a second time (replay), or past its plan."""


class PlanTooLarge(ValueError):
    """A plan asks for more randomness than the dealer is willing to make at once."""


class RunIdOutOfWindow(ValueError):
    """A run id without a time, or whose time is outside the dealer's window (see `new_run_id`)."""


class PlanMismatch(RuntimeError):
    """A protocol asked for randomness that differs from the plan the dealer served."""


@dataclass(frozen=True)
class Request:
    """One piece of correlated randomness: a kind, public shapes and public parameters."""

    kind: str
    shapes: tuple[tuple[int, ...], ...]
    params: tuple[int | str, ...] = ()

    @staticmethod
    def beaver(op: str, x_shape, y_shape, params: tuple[int, ...] = ()) -> Request:
        return Request("beaver", (tuple(x_shape), tuple(y_shape)), (op, *params))

    @staticmethod
    def beaverw(op: str, x_shape, w_shape, params: tuple[int, ...], mask_id: str, name: str):
        return Request("beaverw", (tuple(x_shape), tuple(w_shape)), (op, *params, mask_id, name))

    @staticmethod
    def and_(shape) -> Request:
        return Request("and", (tuple(shape),))

    @staticmethod
    def trunc(shape, bits: int, nonneg: bool = False) -> Request:
        return Request("trunc", (tuple(shape),), (bits, "nonneg") if nonneg else (bits,))

    @staticmethod
    def b2a(shape, count: int) -> Request:
        return Request("b2a", (tuple(shape),), (count,))

    @staticmethod
    def mux(shape) -> Request:
        return Request("mux", (tuple(shape),))

    @staticmethod
    def muxw(x_shape, w_shape, mask_id: str, name: str) -> Request:
        return Request("muxw", (tuple(x_shape), tuple(w_shape)), (mask_id, name))

    @staticmethod
    def cross(fn: str, shape) -> Request:
        return Request("cross", (tuple(shape),), (fn,))

    @staticmethod
    def mand(fn: str, shape) -> Request:
        return Request("mand", (tuple(shape),), (fn,))

    @staticmethod
    def zmax(fn: str, shape) -> Request:
        return Request("zmax", (tuple(shape),), (fn,))

    @staticmethod
    def lut(shape, slice_bits: int, trunc_bits: int = 0) -> Request:
        return Request("lut", (tuple(shape),), (slice_bits, trunc_bits))

    @staticmethod
    def zlut(fn: str, shape, slice_bits: int) -> Request:
        return Request("zlut", (tuple(shape),), (fn, slice_bits))

    @staticmethod
    def fss(shape, gate: str, bits: int = 0) -> Request:
        return Request("fss", (tuple(shape),), (gate, bits))


SLICE_BITS = frozenset({7, 11})  # the slice widths `lut` uses (tables of 2^w bits per slice)
DCF_BITS = 63  # the gates compare the low 63 bits of the masked value (see fss.py)
FSS_PAYLOAD = {"sign": 1, "relu": 3}  # DCF payload words per element, per gate
_FSS_CONSTANTS = {"sign": ("mr",), "relu": ("mr", "rhi", "mrhi")}


# Up to this many input channels the pooled kernel is the faster way to conv2d_pool with torch's
# int64 convolution here (1 channel on 28x28, batch 16: 0.20 instead of 0.64 ms); with 8 or more
# on 12x12 it is slower, so larger layers keep convolution then pooling.
POOLED_KERNEL_MAX_CHANNELS = 4


def _pooled_kernel(w: torch.Tensor, k: int) -> torch.Tensor:
    """W' [o, c, kh + k - 1, kw + k - 1] with W'[u, v] = sum over a, b < k of W[u - a, v - b]."""
    o, c, kh, kw = w.shape
    out = torch.zeros((o, c, kh + k - 1, kw + k - 1), dtype=w.dtype)
    for a in range(k):
        for b in range(k):
            out[:, :, a : a + kh, b : b + kw] += w
    return out


def bilinear(op: str, params: tuple) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The public bilinear map a Beaver triple is made for (shared by dealer and protocol)."""
    if op == "mul":
        return torch.mul
    if op == "matmul":
        return torch.matmul
    if op == "conv2d":
        stride, padding = int(params[0]), int(params[1])
        return lambda x, w: F.conv2d(x, w, stride=stride, padding=padding)
    if op == "conv2d_pool":
        stride, padding, k = int(params[0]), int(params[1]), int(params[2])

        def conv_pool(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            if stride == 1 and x.shape[1] <= POOLED_KERNEL_MAX_CHANNELS:
                # k x k sum pooling of a stride-1 convolution is one convolution with stride k
                # and the kernel summed over k x k shifts of itself: the same ring values
                return F.conv2d(x, _pooled_kernel(w, k), stride=k, padding=padding)
            y = F.conv2d(x, w, stride=stride, padding=padding)
            n, c, h, wd = y.shape
            return y.reshape(n, c, h // k, k, wd // k, k).sum(dim=(3, 5))

        return conv_pool
    raise ValueError(f"unknown bilinear op {op!r}")


# Per kind: seeded fields (name, 'ring' | 'plane' (one bit per element) | 'root', shape index)
# drawn by both parties from their own seed, and derived fields (name, combine 'add' | 'xor')
# whose party-1 share is a correction.
_SEEDED = {
    "beaver": (("a", "ring", 0), ("b", "ring", 1)),
    "beaverw": (("a", "ring", 0),),  # b: from the fixed weight-mask seed, see `Randomness`
    "and": (("a", "ring", 0), ("b", "ring", 0)),
    "trunc": (("r", "ring", 0),),
    "b2a": (("rl", "ring", 0),),  # shape: see `_seeded_fields`
    "mux": (("rb", "plane", 0), ("a", "ring", 0)),
    "muxw": (("rb", "plane", 0), ("a", "ring", 0)),  # b: as for beaverw
    "fss": (("r", "ring", 0), ("root", "root", 0)),
    "cross": (("x", "ring", 0), ("y", "ring", 0)),  # shapes: see `_seeded_fields`
    "mand": (("lam", "ring", 0),),
    "zmax": (("lam", "ring", 0),),  # shape: see `_seeded_fields`
    "lut": (("r", "ring", 0),),
    "zlut": (("r", "ring", 0), ("lam", "ring", 0)),  # shapes: see `_seeded_fields`
}
_DERIVED = {
    "beaver": ("c",),
    "beaverw": ("c",),
    "and": ("c",),
    "trunc": ("r_hi",),  # "nonneg": also r_msb; both: the carry's cT, cL (see `_derived`)
    "b2a": ("ra",),
    "mux": ("r", "ar"),
    "muxw": ("r", "ar", "rbw", "aw", "arw"),
    "cross": ("z",),
    "mand": ("L",),
    "zmax": ("X", "Y", "rho"),
    "lut": ("T", "m"),  # with truncation: r_hi, r_msb first (see `_derived`)
    "zlut": ("T", "X", "Y", "rho"),
}
_XOR_KINDS = {"and", "cross", "mand"}
_XOR_FIELDS = {"T", "m"}  # XOR-shared derived fields of the other kinds
_MOD_KINDS = {"zmax"}  # derived values in Z_p (ring.PRIME), not Z_2^64
_MOD_FIELDS = {("zlut", "X"), ("zlut", "Y"), ("zlut", "rho")}
WEIGHT_MASK_KINDS = frozenset({"beaverw", "muxw"})  # requests that use a fixed weight mask


def pairs(classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairwise comparisons (i, j), i < j, of `classes` values, in the order argmax uses."""
    return tuple(torch.triu_indices(classes, classes, offset=1))  # type: ignore[return-value]


@lru_cache(maxsize=4096)
def _derived(req: Request) -> tuple[str, ...]:
    carry = ("cT", "cL") if _carry(req) else ()
    if req.kind == "fss":
        return (*_FSS_CONSTANTS[str(req.params[0])], *carry)
    if req.kind == "lut" and req.params[1]:
        return ("r_hi", "r_msb", *_DERIVED["lut"], *carry)
    if req.kind == "trunc":
        return ("r_hi", "r_msb", *carry) if len(req.params) == 2 else ("r_hi", *carry)
    return _DERIVED[req.kind]


@lru_cache(maxsize=4096)
def _op(req: Request, name: str) -> str:
    """How a derived field is shared: "xor", "mod" (Z_p) or "ring" (Z_2^64)."""
    if (
        name == "cT"
        or req.kind in _XOR_KINDS
        or (req.kind in ("lut", "zlut") and name in _XOR_FIELDS)
    ):
        return "xor"
    if req.kind in _MOD_KINDS or (req.kind, name) in _MOD_FIELDS:
        return "mod"
    return "ring"


def slices(slice_bits: int) -> int:
    """How many slices of at most `slice_bits` bits cover 63 bits."""
    return -(-63 // slice_bits)


@cache
def slice_layout(slice_bits: int) -> tuple[tuple[int, int, int], ...]:
    """(shift, width, first table word) of each slice, lowest first: 63 bits cut into
    `slices(slice_bits)` slices as equal as can be (11 -> 11, 11, 11, 10, 10, 10), each with a
    table of max(1, 2^width / 64) words."""
    n = slices(slice_bits)
    widths = [63 // n + (i < 63 % n) for i in range(n)]
    out, shift, word = [], 0, 0
    for width in widths:
        out.append((shift, width, word))
        shift, word = shift + width, word + max(1, (1 << width) // 64)
    return tuple(out)


def table_words(slice_bits: int) -> int:
    """Words of all the slices' tables of one element."""
    _, width, word = slice_layout(slice_bits)[-1]
    return word + max(1, (1 << width) // 64)


@cache
def _steps(w: int) -> np.ndarray:
    """[2^w, max(1, 2^w / 64)] int64: row v is the table [u < v] over u in 0..2^w - 1, bit u of
    the row (little-endian words)."""
    v = np.arange(1 << w)
    bits = np.zeros((1 << w, max(64, 1 << w)), dtype=np.uint8)
    bits[:, : 1 << w] = v[None, :] < v[:, None]
    return np.packbits(bits, axis=1, bitorder="little").view("<i8")


def _step_rows(u: np.ndarray, layout) -> np.ndarray:
    """Each element's step tables of its slices (`layout`: (shift, width, first word) lowest
    first), [elements, words]: one gather per run of slices of one width (signs: a single one)."""
    parts = []
    for width, group in itertools.groupby(layout, key=lambda s: s[1]):
        shifts = np.array([s[0] for s in group], dtype=u.dtype)
        idx = (u[:, None] >> shifts) & u.dtype.type((1 << width) - 1)  # [elements, slices]
        parts.append(_steps(width)[idx.astype(np.intp)].reshape(len(u), -1))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _tables(r: torch.Tensor, w: int) -> torch.Tensor:
    """The step tables of the slices of r mod 2^63, [elements, table_words(w)] (dealer only)."""
    low = (r.reshape(-1) & ((1 << 63) - 1)).numpy()
    return torch.from_numpy(_step_rows(low, slice_layout(w)))


def _unpack_rows(planes: np.ndarray, n: int) -> np.ndarray:
    """Bit planes [k, words] as 0/1 int64 [k, n] (n elements per plane)."""
    bits = np.unpackbits(planes.view(np.uint8), axis=1, bitorder="little")[:, :n]
    return bits.astype(np.int64)


def _lut_truth(req: Request, r: torch.Tensor) -> dict[str, torch.Tensor]:
    w, bits = int(req.params[0]), int(req.params[1])
    out = {}
    if bits:
        out = {"r_hi": logical_shift_right(r, bits), "r_msb": msb(r)}
    return out | {"T": _tables(r, w), "m": to_plane(msb(r))}


# -- the low carry of a truncation (`truncation`): [c mod 2^k < r mod 2^k] for public c ------------


@dataclass(frozen=True)
class CarrySpec:
    """The comparison of a public c with the dealer's mask r that exact truncation needs:
    slices of r (`slices`: (shift, width, first table word)), XOR-shared step tables of them
    (`table_words` per element), a one-round masked gate on the looked-up bits
    lt_0..lt_(S-1), eq_1..eq_(S-1) (and an `extra` XOR-shared factor last) whose outputs are,
    per entry k of `outputs`, the borrow of the lowest k slices as a ring value, and the sets R
    whose mask products Lambda_R the dealer deals as ring shares (`sets`, bit masks)."""

    slices: tuple[tuple[int, int, int], ...]
    table_words: int
    inputs: int
    outputs: tuple[int, ...]
    monomials: tuple[tuple[tuple[int, ...], ...], ...]  # per output, input indices
    sets: tuple[int, ...]

    @cached_property
    def products(self) -> anf.Products:
        """How the dealer ANDs the gate's mask planes into Lambda_R for every R in `sets`."""
        return anf.Products.of(self.sets, self.inputs)


def _even_widths(bits: int, n: int) -> list[int]:
    return [bits // n + (i < bits % n) for i in range(n)]


def _words(width: int) -> int:
    return max(1, (1 << width) // 64)


def _sets_count(s: int) -> int:
    return (1 << s) + (1 << (s - 1)) - 2  # nonempty subsets of the borrow's monomials


@cache
def carry_spec(bits: int, whole: bool = False, extra: bool = False) -> CarrySpec:
    """The layout of `CarrySpec` for a shift by `bits`: the low `bits` bits only (a value known
    to be nonnegative, ReLU), or `whole`: also the borrow of all 64 bits, with a slice boundary
    at `bits`. Slice counts are chosen for the least dealer material (tables + products)."""
    parts = [bits, RING_BITS - bits] if whole else [bits]
    best = None
    for counts in itertools.product(range(1, 9), repeat=len(parts)):
        if any(n > p for n, p in zip(counts, parts, strict=True)):
            continue
        widths = [w for p, n in zip(parts, counts, strict=True) for w in _even_widths(p, n)]
        cost = sum(_words(w) for w in widths) + _sets_count(len(widths)) * (2 if extra else 1)
        if best is None or cost < best[0]:
            best = (cost, widths, counts)
    _, widths, counts = best
    layout, shift, word = [], 0, 0
    for width in widths:
        layout.append((shift, width, word))
        shift, word = shift + width, word + _words(width)
    s = len(widths)
    prefixes = (counts[0], s) if whole else (s,)
    tail = (2 * s - 1,) if extra else ()
    monomials = tuple(
        tuple((i, *range(s + i, s + k - 1), *tail) for i in range(k)) for k in prefixes
    )
    sets = set()
    for mono in (m for out in monomials for m in out):
        for sub in range(1, 1 << len(mono)):
            sets.add(sum(1 << mono[j] for j in range(len(mono)) if sub >> j & 1))
    return CarrySpec(
        tuple(layout), word, 2 * s - 1 + extra, prefixes, monomials, tuple(sorted(sets))
    )


def _carry(req: Request) -> CarrySpec | None:
    """The low-carry layout a request carries, if any: trunc (whole ring, or "nonneg"), lut
    with a shift, fss relu with a shift (times the sign: `extra`)."""
    if req.kind == "trunc":
        return carry_spec(int(req.params[0]), whole=len(req.params) == 1)
    if req.kind == "lut" and req.params[1]:
        return carry_spec(int(req.params[1]))
    if req.kind == "fss" and req.params[0] == "relu" and req.params[1]:
        return carry_spec(int(req.params[1]), extra=True)
    return None


def _carry_truth(spec: CarrySpec, r: torch.Tensor, lam: torch.Tensor) -> dict[str, torch.Tensor]:
    """The step tables of r's slices (cT) and the ring products Lambda_R of the gate's masks
    (cL, [sets, elements]) (dealer only)."""
    u = r.reshape(-1).numpy().view(np.uint64)
    tables = _step_rows(u, spec.slices)
    planes = spec.products(lam.numpy())  # ANDs of the mask planes, 64 elements a word
    products = _unpack_rows(planes[[spec.products.row[m] for m in spec.sets]], u.size)
    return {"cT": torch.from_numpy(tables), "cL": torch.from_numpy(products)}


def _fss_parts(req: Request) -> tuple[int, int]:
    """(elements, payload words) of an fss request."""
    return math.prod(req.shapes[0]), FSS_PAYLOAD[str(req.params[0])]


def key_words(plan: tuple[Request, ...]) -> list[int]:
    """Sizes (64-bit words) of the DCF keys both parties receive for `plan`, in plan order."""
    return [dcf.key_words(DCF_BITS, *_fss_parts(r)) for r in plan if r.kind == "fss"]


def _fss_truth(req: Request, r: torch.Tensor):
    """An fss gate's constants (clear), DCF alpha and payload beta for the mask r (dealer only)."""
    u = r.reshape(-1).numpy().view(np.uint64)
    mr, alpha = u >> np.uint64(63), u & np.uint64((1 << 63) - 1)
    sigma = np.uint64(2) * mr - np.uint64(1)  # +1 or -1
    gate = str(req.params[0])
    if gate == "sign":
        constants, beta = {"mr": mr}, sigma[:, None]
    else:
        r_hi = alpha >> np.uint64(int(req.params[1]))
        constants = {"mr": mr, "rhi": r_hi, "mrhi": mr * r_hi}
        beta = np.stack([np.ones_like(mr), sigma, sigma * r_hi], axis=1)
    clear = {k: torch.from_numpy(v.view(np.int64)).reshape(r.shape) for k, v in constants.items()}
    return clear, alpha, beta


def _zero_test_truth(req: Request, full: dict, private: PRG) -> dict[str, torch.Tensor]:
    """The zero test's material (dealer only), per comparison (i, j) and side rho = rho_j (X) or
    rho_i (Y): zmax: rho Lambda_R for every nonempty set R of the top; zlut: the tables of r, and
    rho (1 - 2 lambda_m) Lambda_R for every set R of the carry (the empty one first), then
    rho lambda_m, with lambda_m = msb(r) (`comparison.zero_test` with a sign); rho per class."""
    fn, (rows, n) = anf.ARITH[str(req.params[0])], req.shapes[0]
    iu, ju = pairs(n)
    packed = from_planes_packed(full["lam"], rows * len(iu))  # each comparison's masks
    products = fn.mask_products[packed].reshape(rows, len(iu), -1)  # 0/1: times rho, below p
    rho = private.mod((rows, n), PRIME - 1) + 1
    out = {}
    if req.kind == "zmax":

        def side(rho_side: torch.Tensor) -> torch.Tensor:
            return products[..., 1:] * rho_side.unsqueeze(-1)

    else:
        lam_m = msb(full["r"])
        out["T"] = _tables(full["r"], int(req.params[1]))

        def side(rho_side: torch.Tensor) -> torch.Tensor:
            signed = torch.where(lam_m == 1, PRIME - rho_side, rho_side)
            return torch.cat(
                [products * signed.unsqueeze(-1), (lam_m * rho_side).unsqueeze(-1)], -1
            )

    return out | {"X": side(rho[:, ju]), "Y": side(rho[:, iu]), "rho": rho}


def _truth(req: Request, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The derived values in the clear, from the reconstructed seeded values (dealer only)."""
    if req.kind in ("beaver", "beaverw"):
        return {"c": _bilinear_of(req)(full["a"], full["b"])}
    if req.kind == "and":
        return {"c": full["a"] & full["b"]}
    if req.kind == "trunc":
        r = full["r"]
        out = {"r_hi": logical_shift_right(r, int(req.params[0]))}
        return out | ({"r_msb": msb(r)} if len(req.params) == 2 else {})
    if req.kind == "b2a":
        shape = req.shapes[0]
        ra = _unpack_rows(full["rl"].numpy(), math.prod(shape))
        return {"ra": torch.from_numpy(ra).reshape(len(ra), *shape)}
    if req.kind in ("mux", "muxw"):
        rb = from_plane(full["rb"], req.shapes[0])
        out = {"r": rb, "ar": full["a"] * rb}
        if req.kind == "muxw":
            b = full["b"].unsqueeze(0)  # [1, n, m] against [batch, n, 1]
            for name, v in (("rbw", rb), ("aw", full["a"]), ("arw", out["ar"])):
                out[name] = v.unsqueeze(-1) * b
        return out
    if req.kind == "lut":
        return _lut_truth(req, full["r"])
    if req.kind == "mand":
        fn = anf.MASKED[str(req.params[0])]
        table = fn.mask_products(full["lam"].numpy())
        return {"L": torch.from_numpy(table[[fn.mask_products.row[r] for r in fn.subsets]])}
    raise ValueError(f"unknown randomness kind {req.kind!r}")


def _cross_truth(req: Request, s0: dict, s1: dict) -> dict[str, torch.Tensor]:
    """z for a cross gate: x from the a side of each half, y from the b side (dealer only).

    z[o] = XOR_T x_{c_T} & y_T, where x of the coefficient 1 (and of a missing one) is 0."""
    rows = anf.CROSS[str(req.params[0])].rows  # per output and T: 0, 1 or 2 + support index
    halves = []
    for x, y in ((s0["x"].numpy(), s1["y"].numpy()), (s1["x"].numpy(), s0["y"].numpy())):
        z = np.zeros((len(rows), *x.shape[1:]), dtype=x.dtype)
        term = np.empty(x.shape[1:], dtype=x.dtype)
        for o, row in enumerate(rows):
            for t, r in enumerate(row):
                if r >= 2:  # x of the coefficients 0 and 1 is 0: no term
                    z[o] ^= np.bitwise_and(x[r - 2], y[t], out=term)
        halves.append(z)
    return {"z": torch.from_numpy(np.concatenate(halves, axis=1))}


def _bilinear_of(req: Request) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    params = req.params[1:-2] if req.kind == "beaverw" else req.params[1:]
    return bilinear(str(req.params[0]), params)


def _comparisons(req: Request) -> int:
    """Elements compared by a lut request, or pairwise comparisons of a zlut / zmax request."""
    if req.kind == "lut":
        return math.prod(req.shapes[0])
    rows, n = req.shapes[0]
    return rows * n * (n - 1) // 2


@lru_cache(maxsize=4096)
def _derived_shape(req: Request, name: str = "") -> tuple[int, ...]:
    """The shape of the derived field `name` of `req` (public: a function of the request)."""
    spec = _carry(req)
    if spec is not None and name in ("cT", "cL"):
        n = math.prod(req.shapes[0])
        return (n, spec.table_words) if name == "cT" else (len(spec.sets), n)
    if req.kind == "muxw" and name not in ("r", "ar"):
        return (*req.shapes[0], req.shapes[1][1])
    if req.kind in ("lut", "zlut") and name in ("T", "m"):
        w, n = int(req.params[0 if req.kind == "lut" else 1]), _comparisons(req)
        return (n, table_words(w)) if name == "T" else (-(-n // 64),)
    if req.kind in ("zmax", "zlut"):
        rows, n = req.shapes[0]
        sets = len(anf.ARITH[str(req.params[0])].subsets)  # zmax: the nonempty ones
        sets += -1 if req.kind == "zmax" else 1  # zlut: all, and rho lambda_m
        return (rows, n) if name == "rho" else (rows, n * (n - 1) // 2, sets)
    if req.kind == "cross":
        return (anf.CROSS[str(req.params[0])].outputs, *req.shapes[0])
    if req.kind == "b2a":
        return (int(req.params[0]), *req.shapes[0])
    if req.kind == "mand":
        return (len(anf.MASKED[str(req.params[0])].subsets), *req.shapes[0][1:])
    if req.kind in ("beaver", "beaverw"):
        # Shape inference only: meta tensors hold no data and cost no arithmetic.
        x = torch.empty(req.shapes[0], dtype=torch.int64, device="meta")
        y = torch.empty(req.shapes[1], dtype=torch.int64, device="meta")
        return tuple(_bilinear_of(req)(x, y).shape)
    return req.shapes[0]


_ARITY = {
    "beaver": 2,
    "beaverw": 2,
    "and": 1,
    "trunc": 1,
    "b2a": 1,
    "mux": 1,
    "muxw": 2,
    "fss": 1,
    "cross": 1,
    "mand": 1,
    "zmax": 1,
    "lut": 1,
    "zlut": 1,
}
_MASK_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _is_name(p: object) -> bool:
    """A mask id or weight name: 1 to 128 of [A-Za-z0-9._-]."""
    return isinstance(p, str) and 0 < len(p) <= 128 and set(p) <= _MASK_ID_CHARS


def validate_plan(plan: tuple[Request, ...], max_elements: int = 50_000_000) -> None:
    """Raise ValueError unless every request is a well-formed kind with sane shapes and params.

    Run on plans that come from outside (the dealer's web endpoint): a plan that passes can be
    dealt without any other error. Remembered for the last 256 plans (it is pure, and replicas
    send the same few plans again and again).
    """
    try:
        hash(plan)
    except TypeError:
        raise ValueError("params are integers and names only") from None
    _validate_plan(plan, max_elements)


@lru_cache(maxsize=256)
def _validate_plan(plan: tuple[Request, ...], max_elements: int) -> None:
    for i, req in enumerate(plan):
        if req.kind not in _ARITY or len(req.shapes) != _ARITY[req.kind]:
            raise ValueError(f"step {i}: unknown kind {req.kind!r} or wrong number of shapes")
        for shape in req.shapes:
            if len(shape) > 8 or any(not isinstance(d, int) or not 0 <= d < 2**31 for d in shape):
                raise ValueError(f"step {i}: bad shape {shape}")
        if not all(isinstance(p, int | str) and not isinstance(p, bool) for p in req.params):
            raise ValueError(f"step {i}: params are integers and names only")
        if req.kind == "trunc" and (
            len(req.params) not in (1, 2)
            or not isinstance(req.params[0], int)
            or not 1 <= req.params[0] < 63
            or req.params[1:] not in ((), ("nonneg",))
        ):
            raise ValueError(f"step {i}: trunc needs one shift in [1, 63) (and maybe 'nonneg')")
        if req.kind in ("beaver", "beaverw"):
            op = req.params[0] if req.params else None
            if op not in ("mul", "matmul", "conv2d", "conv2d_pool"):
                raise ValueError(f"step {i}: unknown bilinear op {op!r}")
            params = req.params[1:]
            if req.kind == "beaverw":
                if len(params) < 2 or not all(_is_name(p) for p in params[-2:]):
                    raise ValueError(f"step {i}: beaverw needs a mask id and a weight name")
                params = params[:-2]
            wanted = {"conv2d": 2, "conv2d_pool": 3}.get(str(op), 0)
            if len(params) != wanted or not all(isinstance(p, int) and 0 <= p < 64 for p in params):
                raise ValueError(
                    f"step {i}: conv2d needs stride and padding, conv2d_pool also the pooling "
                    "size, nothing else takes params"
                )
            if op == "conv2d_pool" and params[2] < 1:
                raise ValueError(f"step {i}: conv2d_pool needs a pooling size >= 1")
            try:
                _derived_shape(req)
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise ValueError(f"step {i}: shapes do not fit {op}: {exc}") from None
        elif req.kind == "fss":
            if (
                len(req.params) != 2
                or req.params[0] not in FSS_PAYLOAD
                or not isinstance(req.params[1], int)
                or not 0 <= req.params[1] < 62
                or (req.params[0] == "sign" and req.params[1] != 0)
            ):
                raise ValueError(f"step {i}: fss needs a gate (sign | relu) and a shift in [0, 62)")
        elif req.kind == "b2a":
            if len(req.params) != 1 or not isinstance(req.params[0], int):
                raise ValueError(f"step {i}: b2a needs a count of bits per element")
            if not 1 <= req.params[0] <= 8:
                raise ValueError(f"step {i}: b2a takes 1 to 8 bits per element")
        elif req.kind == "muxw":
            (x_shape, w_shape), params = req.shapes, req.params
            if len(params) != 2 or not all(_is_name(p) for p in params):
                raise ValueError(f"step {i}: muxw needs a mask id and a weight name")
            if len(x_shape) != 2 or len(w_shape) != 2 or x_shape[1] != w_shape[0]:
                raise ValueError(f"step {i}: muxw needs shapes (batch, n) and (n, m)")
        elif req.kind in ("zmax", "zlut"):
            shape, wanted = req.shapes[0], 1 if req.kind == "zmax" else 2
            if len(req.params) != wanted or req.params[0] not in anf.ARITH:
                raise ValueError(
                    f"step {i}: {req.kind} needs one of the functions {sorted(anf.ARITH)}"
                    + ("" if wanted == 1 else " and a slice width")
                )
            if len(shape) != 2 or not 2 <= shape[1] <= 10:
                raise ValueError(
                    f"step {i}: {req.kind} needs a shape (rows, classes), 2 to 10 classes"
                )
            if req.kind == "zlut":
                w, fn = req.params[1], anf.ARITH[req.params[0]]
                if w not in SLICE_BITS or fn.inputs != 2 * slices(w) - 1:
                    raise ValueError(
                        f"step {i}: zlut {fn.name} needs slices of {sorted(SLICE_BITS)} bits, "
                        f"{(fn.inputs + 1) // 2} of them"
                    )
        elif req.kind == "lut":
            if (
                len(req.params) != 2
                or req.params[0] not in SLICE_BITS
                or not isinstance(req.params[1], int)
                or not 0 <= req.params[1] < 62
            ):
                raise ValueError(
                    f"step {i}: lut needs a slice width in {sorted(SLICE_BITS)} and a shift "
                    "in [0, 62)"
                )
        elif req.kind in ("cross", "mand"):
            table = anf.CROSS if req.kind == "cross" else anf.MASKED
            fn = table.get(req.params[0]) if len(req.params) == 1 else None
            shape = req.shapes[0]
            if fn is None:
                raise ValueError(f"step {i}: {req.kind} needs one of the functions {sorted(table)}")
            if req.kind == "cross" and (len(shape) != 2 or shape[0] % 2):
                raise ValueError(f"step {i}: cross needs a shape (even groups, words)")
            if req.kind == "mand" and (not shape or shape[0] != fn.inputs):
                raise ValueError(f"step {i}: mand {fn.name} needs a shape ({fn.inputs}, ...)")
        elif req.params and req.kind != "trunc":
            raise ValueError(f"step {i}: {req.kind} takes no params")
    total = sum(
        math.prod(s)
        for r in plan
        for s in (
            *r.shapes,
            *(shape for _, _, shape in _seeded_fields(r)),
            *(_derived_shape(r, name) for name in _derived(r)),
        )
    ) + sum(key_words(plan))
    if total > max_elements:
        raise PlanTooLarge(f"plan asks for {total} ring elements; the limit is {max_elements}")


def correction_shapes(plan: tuple[Request, ...]) -> list[tuple[int, ...]]:
    """The shapes of party 1's corrections for `plan`, in the order the dealer sends them: a
    field in Z_p travels packed, four 16-bit values per word (`_pack16`).

    Public (a function of the plan only), so the corrections can travel as one flat buffer.
    """
    return [
        (-(-math.prod(shape) // 4),) if _op(req, name) == "mod" else shape
        for req in plan
        for name in _derived(req)
        for shape in (_derived_shape(req, name),)
    ]


assert PRIME < 1 << 16  # Z_p values travel as 16 bits


def _pack16(v: torch.Tensor) -> torch.Tensor:
    """Values in [0, 2^16) as int64 words of four (little-endian; zero padding)."""
    flat = np.zeros(-(-v.numel() // 4) * 4, dtype="<u2")
    flat[: v.numel()] = v.reshape(-1).numpy()
    return torch.from_numpy(flat.view("<i8"))


def _unpack16(words: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    return torch.from_numpy(words.numpy().view("<u2")[:n].astype(np.int64)).reshape(shape)


def _seeded_fields(req: Request) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, 'ring' | 'root', shape) of what each party draws from its own seed."""
    if req.kind not in _SEEDED:
        raise ValueError(f"unknown randomness kind {req.kind!r}")
    if req.kind == "cross":
        fn, (groups, w) = anf.CROSS[str(req.params[0])], req.shapes[0]
        half = groups // 2
        return [("x", "ring", (len(fn.support), half, w)), ("y", "ring", (fn.width, half, w))]
    if req.kind == "zmax":
        (rows, n), inputs = req.shapes[0], anf.ARITH[str(req.params[0])].inputs
        return [("lam", "ring", (inputs, -(-_comparisons(req) // 64)))]  # bit planes
    if req.kind == "b2a":
        words = -(-math.prod(req.shapes[0]) // 64)
        return [("rl", "ring", (int(req.params[0]), words))]
    if req.kind == "zlut":  # the sign input m is masked by msb(r), not dealt
        (rows, n), inputs = req.shapes[0], anf.ARITH[str(req.params[0])].inputs
        return [
            ("r", "ring", (rows, n * (n - 1) // 2)),
            ("lam", "ring", (inputs, -(-_comparisons(req) // 64))),
        ]
    out = [
        (name, "ring", (-(-math.prod(req.shapes[idx]) // 64),))  # one bit per element
        if how == "plane"
        else (name, how, req.shapes[idx])
        for name, how, idx in _SEEDED[req.kind]
    ]
    spec = _carry(req)
    if spec is not None:  # the carry gate's input masks, bit planes
        out.append(("clam", "ring", (spec.inputs, -(-math.prod(req.shapes[0]) // 64))))
    return out


def _share0(prg: PRG, op: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Party 0's share of a derived value: uniform in Z_2^64, or in Z_p for "mod" fields."""
    return prg.mod(shape, PRIME) if op == "mod" else prg.ring(shape)


def _expand_seeded(req: Request, prg: PRG) -> dict[str, torch.Tensor]:
    out = {}
    for name, how, shape in _seeded_fields(req):
        if how == "root":  # one 128-bit DCF root seed per element
            out[name] = prg.ring((math.prod(shape), 2))
        else:
            out[name] = prg.ring(shape)
    return out


@dataclass
class PartyMaterial:
    """What one party receives for one request id: a seed, for party 1 the corrections, and for
    both parties the DCF correction words of the plan's fss gates (as flat 64-bit words)."""

    request_id: str
    party: int
    seed: bytes
    plan: tuple[Request, ...]
    corrections: list[torch.Tensor] = field(default_factory=list)
    keys: list[np.ndarray] = field(default_factory=list)
    mask_seeds: list[bytes] = field(default_factory=list)  # per WEIGHT_MASK_KINDS request
    dealer: bytes = bytes(INSTANCE_BYTES)  # the dealing `Dealer`'s public instance id

    @property
    def nbytes(self) -> int:
        return (
            len(self.seed)
            + len(self.dealer)
            + len(self.mask_seeds) * SEED_BYTES
            + sum(c.numel() * c.element_size() for c in self.corrections)
            + sum(k.nbytes for k in self.keys)
        )


class Randomness:
    """A party's correlated randomness for one request, drawn once, in plan order."""

    def __init__(self, material: PartyMaterial) -> None:
        self._m = material
        self._prg = PRG(material.seed)
        self._next = 0
        self._corr = iter(material.corrections)
        self._keys = iter(material.keys)
        self._masks = iter(material.mask_seeds)
        self._ready: list[dict[str, torch.Tensor]] | None = None
        self._lock = threading.Lock()

    def prefetch(self) -> Randomness:
        """Expand the whole plan now (offline), so that `take` costs nothing online."""
        with self._lock:
            if self._next or self._ready is not None:
                raise RandomnessReused("prefetch must come before any draw, and only once")
            self._ready = [self._expand(req) for req in self._m.plan]
        return self

    @property
    def dealer(self) -> bytes:
        """The instance id of the dealer that made this material (see `Dealer.instance`)."""
        return self._m.dealer

    @property
    def exhausted(self) -> bool:
        return self._next == len(self._m.plan)

    def take(self, req: Request) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._next >= len(self._m.plan):
                raise RandomnessReused(
                    f"request {self._m.request_id!r}: randomness asked for past its plan"
                )
            expected = self._m.plan[self._next]
            if expected != req:
                raise PlanMismatch(f"step {self._next}: plan has {expected}, protocol asks {req}")
            self._next += 1
            if self._ready is not None:
                out, self._ready[self._next - 1] = self._ready[self._next - 1], {}
                return out
            return self._expand(req)

    def _expand(self, req: Request) -> dict[str, torch.Tensor]:
        out = _expand_seeded(req, self._prg)
        if req.kind in WEIGHT_MASK_KINDS:
            out["b"] = PRG(next(self._masks)).ring(req.shapes[1])
        for name in _derived(req):
            if self._m.party == 0:
                out[name] = _share0(self._prg, _op(req, name), _derived_shape(req, name))
            elif _op(req, name) == "mod":
                out[name] = _unpack16(next(self._corr), _derived_shape(req, name))
            else:
                out[name] = next(self._corr)
        if req.kind == "fss":
            out["keys"] = dcf.DcfKeys.from_words(next(self._keys), DCF_BITS, *_fss_parts(req))
        return out


class PlanRecorder:
    """Stands in for `Randomness` in a dry run: records what a protocol asks for, returns zeros."""

    def __init__(self) -> None:
        self.plan: list[Request] = []

    def take(self, req: Request) -> dict[str, torch.Tensor]:
        self.plan.append(req)
        out = {n: torch.zeros(shape, dtype=torch.int64) for n, _, shape in _seeded_fields(req)}
        for name in _derived(req):
            out[name] = torch.zeros(_derived_shape(req, name), dtype=torch.int64)
        if req.kind == "fss":
            out["keys"] = None  # the gates skip their (local) evaluation in a dry run
        if req.kind in WEIGHT_MASK_KINDS:
            out["b"] = torch.zeros(req.shapes[1], dtype=torch.int64)
        return out


MAX_UNCLAIMED = 16  # request ids whose DCF keys wait for the second party
MASK_WORDS_KEPT = 1 << 22  # words of fixed weight masks the dealer keeps (32 MiB; the CNN: 24K)
RUN_ID_TIME_DIGITS = 10  # Unix seconds, zero-padded: good until the year 2286


def new_run_id(now: float | None = None) -> str:
    """A fresh run id: the time (whole Unix seconds, 10 digits), "-", 22 random characters."""
    t = int(time.time() if now is None else now)
    return f"{t:0{RUN_ID_TIME_DIGITS}d}-{secrets.token_urlsafe(16)}"


def run_id_time(run_id: str) -> int | None:
    """The minting time of a `new_run_id` id, or None if `run_id` carries none."""
    head, _, rest = run_id.partition("-")
    if len(head) != RUN_ID_TIME_DIGITS or not (head.isascii() and head.isdigit()) or not rest:
        return None
    return int(head)


class Dealer:
    """Stateless source of correlated randomness; each (request id, party) is served once.

    `window_s`: serve only run ids minted within this many seconds of `clock()` and forget the
    served ones that leave the window (see the module docstring); None: any id, never forgotten.
    """

    def __init__(
        self,
        master_key: bytes | None = None,
        *,
        window_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = master_key if master_key is not None else fresh_seed()
        # Public and random: material from two dealers (e.g. before and after a restart, with
        # a fresh master key) does not fit together, and the parties check this id to notice.
        self.instance = os.urandom(INSTANCE_BYTES)
        if window_s is not None and not window_s > 0:
            raise ValueError(f"the run id window must be positive, got {window_s}")
        self._window, self._clock = window_s, clock
        self._served: set[tuple[str, int]] = set()
        self._expiry: list[tuple[int, str, int]] = []  # (run id time, id, party), a heap
        self._floor = -math.inf  # ids older than this are refused and forgotten; only rises
        self._lock = threading.Lock()
        # DCF keys are costly to make and both parties need them: made once per request id and
        # kept only until the other party fetches its copy (a few at most, oldest dropped).
        self._unclaimed: OrderedDict[str, tuple] = OrderedDict()
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # `_mask`'s, by recency

    def _seed(self, request_id: str, party: int) -> bytes:
        """Party 0's or 1's seed for `request_id`; "party" 2 is the dealer's own stream."""
        msg = b"privdigit/dealer/v1\x00" + request_id.encode() + b"\x00" + bytes([party])
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def _mask_seed(self, req: Request, party: int) -> bytes:
        """The seed of `party`'s share of the fixed mask of one model weight (beaverw, muxw)."""
        mask_id, name = str(req.params[-2]).encode(), str(req.params[-1]).encode()
        msg = b"privdigit/weight-mask/v1\x00%s\x00%s\x00%d" % (mask_id, name, party)
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def _mask(self, req: Request) -> torch.Tensor:
        """The fixed mask b itself (dealer only): the sum of both parties' mask shares. Kept
        per (mask id, weight, shape), up to MASK_WORDS_KEPT words, the least recent dropped
        first: it is the same for every request (read only: no caller changes it in place)."""
        key = (str(req.params[-2]), str(req.params[-1]), tuple(req.shapes[1]))
        with self._lock:
            b = self._masks.get(key)
            if b is not None:
                self._masks.move_to_end(key)
                return b
        shares = [PRG(self._mask_seed(req, p)).ring(req.shapes[1]) for p in (0, 1)]
        b = shares[0] + shares[1]
        with self._lock:
            self._masks[key] = b
            while sum(m.numel() for m in self._masks.values()) > MASK_WORDS_KEPT:
                self._masks.popitem(last=False)  # the newest stays even if larger than that
                if len(self._masks) == 1:
                    break
        return b

    def deal(self, request_id: str, party: int, plan: tuple[Request, ...]) -> PartyMaterial:
        """Party `party`'s material for `request_id`; a second call for the same pair raises."""
        if party not in (0, 1):
            raise ValueError(f"party must be 0 or 1, got {party}")
        if not request_id:
            raise ValueError("a request id is required")
        with self._lock:
            t = self._check_window(request_id)
            if (request_id, party) in self._served:
                raise RandomnessReused(
                    f"request id {request_id!r} was already served to party {party}"
                )
            self._served.add((request_id, party))
            if t is not None:
                heapq.heappush(self._expiry, (t, request_id, party))
        seed = self._seed(request_id, party)
        plan = tuple(plan)
        masks = [self._mask_seed(r, party) for r in plan if r.kind in WEIGHT_MASK_KINDS]
        if party == 0 and not any(r.kind == "fss" for r in plan):
            return PartyMaterial(request_id, 0, seed, plan, mask_seeds=masks, dealer=self.instance)
        with self._lock:
            cached = self._unclaimed.pop(request_id, None)
        if cached is not None and cached[0] == plan:
            corrections, keys = cached[1]
        else:
            corrections, keys = self._derive(request_id, plan)
            if keys:
                with self._lock:
                    self._unclaimed[request_id] = (plan, (corrections, keys))
                    while len(self._unclaimed) > MAX_UNCLAIMED:
                        self._unclaimed.popitem(last=False)
        mine = corrections if party == 1 else []
        return PartyMaterial(request_id, party, seed, plan, mine, keys, masks, self.instance)

    def _check_window(self, request_id: str) -> int | None:
        """(Under the lock.) Forget served ids that left the window; the id's time, or None
        without a window; `RunIdOutOfWindow` if the id has no time or one outside the window."""
        if self._window is None:
            return None
        now = self._clock()
        self._floor = max(self._floor, now - self._window)
        while self._expiry and self._expiry[0][0] < self._floor:
            _, rid, party = heapq.heappop(self._expiry)
            self._served.discard((rid, party))
        t = run_id_time(request_id)
        if t is None:
            raise RunIdOutOfWindow(
                f"run id {request_id!r} carries no time: the dealer takes ids minted by "
                "new_run_id (10 digits of Unix seconds, '-', random characters)"
            )
        if t < self._floor:
            raise RunIdOutOfWindow(
                f"run id {request_id!r} is {now - t:.0f} s old; the dealer serves run ids "
                f"minted within {self._window:g} s of its clock (are the clocks in sync?)"
            )
        if t > now + self._window:
            raise RunIdOutOfWindow(
                f"run id {request_id!r} is {t - now:.0f} s in the future; the dealer serves run "
                f"ids minted within {self._window:g} s of its clock (are the clocks in sync?)"
            )
        return t

    @property
    def remembered(self) -> int:
        """How many (run id, party) pairs the served-once rule holds now."""
        with self._lock:
            return len(self._served)

    def _derive(
        self, request_id: str, plan: tuple[Request, ...]
    ) -> tuple[list[torch.Tensor], list[np.ndarray]]:
        """Party 1's corrections and both parties' DCF keys, replaying both parties' seeds."""
        prg0, prg1 = PRG(self._seed(request_id, 0)), PRG(self._seed(request_id, 1))
        private = PRG(self._seed(request_id, 2))  # the dealer's own: values no party may know
        corrections, keys = [], []
        for req in plan:
            s0, s1 = _expand_seeded(req, prg0), _expand_seeded(req, prg1)
            if req.kind == "cross":  # each half's x and y come from one party's seed only
                truth = _cross_truth(req, s0, s1)
            else:
                xor = req.kind in _XOR_KINDS
                full = {
                    n: (s0[n] ^ s1[n]) if xor or n in ("rb", "lam", "clam", "rl") else s0[n] + s1[n]
                    for n in s0
                }
                if req.kind in WEIGHT_MASK_KINDS:
                    full["b"] = self._mask(req)
                if req.kind == "fss":
                    truth, alpha, beta = _fss_truth(req, full["r"])
                    roots = (s0["root"].numpy().view(np.uint64), s1["root"].numpy().view(np.uint64))
                    keys.append(dcf.gen(alpha, beta, DCF_BITS, *roots).to_words())
                elif req.kind in ("zmax", "zlut"):
                    truth = _zero_test_truth(req, full, private)
                else:
                    truth = _truth(req, full)
                spec = _carry(req)
                if spec is not None:
                    truth = truth | _carry_truth(spec, full["r"], full["clam"])
            for name, value in truth.items():
                op = _op(req, name)
                share = _share0(prg0, op, value.shape)  # party 0's, turned into party 1's here
                if op == "xor":
                    corrections.append(share.bitwise_xor_(value))
                elif op == "mod":  # value - share in [-(p - 1), p - 1]
                    share.neg_().add_(value)
                    corrections.append(_pack16(share.add_(PRIME * (share < 0))))
                else:
                    corrections.append(share.neg_().add_(value))
        return corrections, keys


def deal_pair(
    dealer: Dealer, request_id: str, plan: tuple[Request, ...]
) -> tuple[Randomness, Randomness]:
    """Both parties' randomness for one request, for in-process use."""
    return (
        Randomness(dealer.deal(request_id, 0, plan)),
        Randomness(dealer.deal(request_id, 1, plan)),
    )
