"""The channel between the two parties: one `exchange` is one communication round.

`exchange(tensors)` sends this party's tensors and returns the peer's, in the same order; both
parties call it at the same point of the protocol. `ChannelStats` counts rounds and bytes sent,
so every protocol's documented cost is checked by a test. `InMemoryChannel.pair()` connects two
parties running in two threads of one process; the service's network channel implements the
same interface.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class ChannelError(RuntimeError):
    """The peer did not answer in time, or sent something that does not fit the protocol."""


@dataclass
class ChannelStats:
    """Rounds (exchanges) and bytes this endpoint has sent."""

    rounds: int = 0
    bytes_sent: int = 0

    def record(self, tensors: Sequence[torch.Tensor]) -> None:
        self.rounds += 1
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)


class Channel(Protocol):
    stats: ChannelStats

    def exchange(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Send `tensors` to the peer and return the peer's tensors of this round."""
        ...


class NullChannel:
    """A channel to nobody: the peer 'sends' zeros. Used to dry-run a protocol (plan recording)."""

    def __init__(self) -> None:
        self.stats = ChannelStats()

    def exchange(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.stats.record(tensors)
        return [torch.zeros_like(t) for t in tensors]


class InMemoryChannel:
    """One endpoint of an in-process channel; build both with `InMemoryChannel.pair()`."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, *, timeout: float = 60.0) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._timeout = timeout
        self.stats = ChannelStats()

    @classmethod
    def pair(cls, *, timeout: float = 60.0) -> tuple[InMemoryChannel, InMemoryChannel]:
        a_to_b: queue.Queue = queue.Queue()
        b_to_a: queue.Queue = queue.Queue()
        return cls(b_to_a, a_to_b, timeout=timeout), cls(a_to_b, b_to_a, timeout=timeout)

    def exchange(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        sent = [t.clone() for t in tensors]
        self.stats.record(sent)
        self._outbox.put(sent)
        try:
            received = self._inbox.get(timeout=self._timeout)
        except queue.Empty:
            raise ChannelError(f"peer sent nothing for {self._timeout} s") from None
        if len(received) != len(sent) or any(
            r.shape != s.shape or r.dtype != s.dtype for r, s in zip(received, sent, strict=True)
        ):
            raise ChannelError("peer's message does not match this round's shapes")
        return received
