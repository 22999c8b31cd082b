"""Beaver multiplication: one path for elementwise mul, matmul and conv2d (Beaver 1991).

Computes [op(x, y)] from [x], [y] and a dealer triple ([a], [b], [c] = [op(a, b)]):
  1. open d = x - a and e = y - b            (both in one round)
  2. [z] = [c] + op(d, [b]) + op([a], e) + op(d, e)   (the last term by party 0 only), computed
     as [c] + op(d, [b] + e) + op([a], e) by party 0 (bilinearity: two ops per party, not three)
Rounds: 1. Bytes sent per party: 8 * (numel(x) + numel(y)).
What a party sees: d and e, each masked by a fresh uniform a or b: uniform, independent of x, y.
The product carries 2f fractional bits; rescaling happens in `truncation`, nowhere else.

`linear` is the same for a model weight y = W whose mask b is fixed per model: e = W - b is
opened by the first query of a model (on a connection) and kept as public `WeightMasks.opened`;
later queries open d only. Bytes per party: 8 * numel(x), plus 8 * numel(W) the first time.
Reusing b is safe because it only ever masks the same W: every opening of e is the same value.

`select_linear` is a select (x * b for XOR-shared bits b, as `comparison.select_plane`) whose
result goes straight into a model weight: ReLU and the next small linear layer in the select's
one round instead of two. With the select's openings d = x - a and e = b ^ rb and s = 1 - 2e,
x * b = e d + e a + s d rb + s (a rb), so (x * b) @ W = (x * b) @ E + (e d) @ [b_W]
+ sum_j e_j [a_j b_W,jk] + sum_j s_j d_j [rb_j b_W,jk] + sum_j s_j [a_j rb_j b_W,jk]: every
term is public times shared. The dealer deals the three products with the weight's fixed mask
b_W (`Request.muxw`): 3 n m words per row for an n x m weight, so it pays only for small layers
(the CNN's last, 100 x 10: 24 KB per image). Rounds: 1 (the select's; E = W - b_W rides in it
the first time). Bytes per party: 8 n + n / 8 per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from service.mpc.dealer import Request, bilinear
from service.mpc.party import Party
from service.mpc.ring import from_plane


def beaver(
    party: Party, x: torch.Tensor, y: torch.Tensor, op: str = "mul", params: tuple[int, ...] = ()
) -> torch.Tensor:
    """Shares of op(x, y) for shared x and y (op: mul | matmul | conv2d with (stride, padding))."""
    t = party.rand.take(Request.beaver(op, x.shape, y.shape, params))
    f = bilinear(op, params)
    d, e = party.open(x - t["a"], y - t["b"])
    return _combine(party, t, f, d, e)


def _combine(party: Party, t, f, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Step 2: [c] + op(d, [b]) + op([a], e), plus op(d, e) folded into party 0's first op."""
    return t["c"] + f(d, t["b"] + e if party.index == 0 else t["b"]) + f(t["a"], e)


@dataclass
class WeightMasks:
    """The public side of one model's fixed weight masks: its id and the opened e = W - b."""

    mask_id: str
    opened: dict[str, torch.Tensor] = field(default_factory=dict)


def linear(
    party: Party,
    x: torch.Tensor,
    w: torch.Tensor,
    name: str,
    masks: WeightMasks | None,
    op: str = "matmul",
    params: tuple[int, ...] = (),
) -> torch.Tensor:
    """Shares of op(x, W) for a model weight W (`name`); fixed mask if `masks`, else `beaver`."""
    if masks is None:
        return beaver(party, x, w, op, params)
    t = party.rand.take(Request.beaverw(op, x.shape, w.shape, params, masks.mask_id, name))
    f = bilinear(op, params)
    e = masks.opened.get(name)
    if e is None:
        d, e = party.open(x - t["a"], w - t["b"])
        masks.opened[name] = e
    else:
        (d,) = party.open(x - t["a"])
    return _combine(party, t, f, d, e)


def mul(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return beaver(party, x, y, "mul")


def matmul(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return beaver(party, x, y, "matmul")


def conv2d(
    party: Party, x: torch.Tensor, w: torch.Tensor, *, stride: int = 1, padding: int = 0
) -> torch.Tensor:
    return beaver(party, x, w, "conv2d", (stride, padding))


def select_shares(party: Party, t, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """[x * b] from a select's openings d = x - a, e = b ^ rb (0/1 per element) and its dealer
    shares: x * b = d e + d (1 - 2e) [rb] + e [a] + (1 - 2e) [a rb], d e by party 0. Local."""
    s = 1 - 2 * e
    z = d * s * t["r"] + e * t["a"] + s * t["ar"]
    return z + d * e if party.index == 0 else z


def _rows_times(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum_j v[i, j] m[i, j, k] for every row i: [batch, n] x [batch, n, m] -> [batch, m]."""
    return torch.bmm(v.unsqueeze(1), m).squeeze(1)


def select_linear(
    party: Party,
    x: torch.Tensor,
    plane: torch.Tensor,
    w: torch.Tensor,
    name: str,
    masks: WeightMasks,
) -> torch.Tensor:
    """Shares of (x * b) @ W for arithmetic [x] [batch, ...] (flattened per row), XOR-shared bits
    b as the bit plane of x's elements, and a model weight W [n, m] with a fixed mask. 1 round."""
    x = x.reshape(x.shape[0], -1)
    t = party.rand.take(Request.muxw(x.shape, w.shape, masks.mask_id, name))
    opened = masks.opened.get(name)
    arith = [x - t["a"]] if opened is not None else [x - t["a"], w - t["b"]]
    arith, (e,) = party.open_mixed(arith, [plane ^ t["rb"]])
    if opened is None:
        opened = masks.opened[name] = arith[1]
    d, e = arith[0], from_plane(e, x.shape)
    q = select_shares(party, t, d, e)
    s = 1 - 2 * e
    out = q @ opened + (d * e) @ t["b"] + _rows_times(e, t["aw"])
    return out + _rows_times(d * s, t["rbw"]) + _rows_times(s, t["arw"])
