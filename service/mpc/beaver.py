"""Beaver multiplication: one path for elementwise mul, matmul and conv2d (Beaver 1991).

Computes [op(x, y)] from [x], [y] and a dealer triple ([a], [b], [c] = [op(a, b)]):
  1. open d = x - a and e = y - b            (both in one round)
  2. [z] = [c] + op(d, [b]) + op([a], e) + op(d, e)   (the last term by party 0 only)
Rounds: 1. Bytes sent per party: 8 * (numel(x) + numel(y)).
What a party sees: d and e, each masked by a fresh uniform a or b: uniform, independent of x, y.
The product carries 2f fractional bits; rescaling happens in `truncation`, nowhere else.
"""

from __future__ import annotations

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
    z = t["c"] + f(d, t["b"]) + f(t["a"], e)
    return z + f(d, e) if party.index == 0 else z


def mul(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return beaver(party, x, y, "mul")


def matmul(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return beaver(party, x, y, "matmul")


def conv2d(
    party: Party, x: torch.Tensor, w: torch.Tensor, *, stride: int = 1, padding: int = 0
) -> torch.Tensor:
    return beaver(party, x, w, "conv2d", (stride, padding))
