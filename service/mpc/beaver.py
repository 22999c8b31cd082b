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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from service.mpc.dealer import Request, bilinear
from service.mpc.party import Party


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
