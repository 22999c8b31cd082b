"""A party: its index (0 or 1), its channel to the peer, its randomness and its precision.

Everything a protocol needs is on the `Party` passed to it; there is no process-wide party,
channel or dealer. Openings are explicit calls, one round each, so every place where a value is
revealed to the parties is visible at the call site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.mpc.channel import Channel
from service.mpc.dealer import Randomness
from service.mpc.ring import FixedPoint


@dataclass
class Party:
    index: int
    channel: Channel
    rand: Randomness
    fp: FixedPoint

    def __post_init__(self) -> None:
        if self.index not in (0, 1):
            raise ValueError(f"party index must be 0 or 1, got {self.index}")

    def public(self, value: torch.Tensor) -> torch.Tensor:
        """This party's share of a public value: party 0 holds it, party 1 holds zero."""
        return value if self.index == 0 else torch.zeros_like(value)

    def open_mixed(
        self, arith: Sequence[torch.Tensor], xor: Sequence[torch.Tensor] = ()
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One round: reveal additive shares `arith` (summed) and XOR shares `xor` (xored)."""
        mine = [*arith, *xor]
        theirs = self.channel.exchange(mine)
        k = len(arith)
        opened_arith = [a + b for a, b in zip(mine[:k], theirs[:k], strict=True)]
        opened_xor = [a ^ b for a, b in zip(mine[k:], theirs[k:], strict=True)]
        return opened_arith, opened_xor

    def open(self, *shares: torch.Tensor) -> list[torch.Tensor]:
        """One round: reveal additive shares."""
        return self.open_mixed(shares)[0]

    def open_xor(self, *shares: torch.Tensor) -> list[torch.Tensor]:
        """One round: reveal XOR shares."""
        return self.open_mixed((), shares)[1]
