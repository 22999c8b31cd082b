"""Dynamic batching, assembled: which client requests run together, agreed by both replicas.

`Batcher` wires one replica's pieces together and routes the peer's control messages to them:
pairing of a request's two shares (`pairing.py`), party 0's slots and batches (`scheduler.py`),
party 1's checks of each announced batch (`follower.py`), and prefetching of dealer material
(`prefetch_policy.py` over `prefetch.py`). Each of those modules describes its own part.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import torch

from service.api.batching.follower import Follower
from service.api.batching.pairing import Job, Pairing, parse_arrived
from service.api.batching.prefetch import MaterialPool
from service.api.batching.prefetch_policy import PrefetchPolicy
from service.api.batching.scheduler import Result, RunBatch, Scheduler
from service.api.transport import messages, wire
from service.api.transport.lanes import Lanes
from service.api.transport.messages import BadMessage, Discard, Prefetch, Reject, Withdraw
from service.api.transport.peer import PeerLink
from service.store import LoadedModel, ModelRegistry


class Batcher:
    """One per replica process; lives on the event loop (no locks: one thread touches it)."""

    def __init__(
        self,
        party: int,
        peer: PeerLink,
        registry: ModelRegistry,
        run_batch: RunBatch,
        lanes: Lanes,
        *,
        weights_opened: Callable[[LoadedModel], bool],
        pool: MaterialPool,
        max_batch: int,
        max_batches: int,
        timeout: float,
        scores_enabled: bool = False,
        on_refuse: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.party, self.pool = party, pool
        self.pairing = Pairing(party, peer, timeout)
        self.scheduler = Scheduler(
            party,
            peer,
            registry,
            self.pairing,
            run_batch,
            lanes,
            weights_opened=weights_opened,
            pool=pool,
            max_batch=max_batch,
            max_batches=max_batches,
        )
        self.prefetch = PrefetchPolicy(
            party,
            peer,
            registry,
            pool,
            self.scheduler,
            max_batch=max_batch,
            max_batches=max_batches,
            timeout=timeout,
        )
        self.scheduler.on_batch = self.prefetch.expect
        self.follower = Follower(
            peer,
            registry,
            self.pairing,
            self.scheduler,
            lanes,
            pool,
            max_batch=max_batch,
            scores_enabled=scores_enabled,
            on_refuse=on_refuse,
        )
        self._tasks: set[asyncio.Task] = set()
        # the prefetch policy's, for the replica and the tests
        self.refill, self.sweep, self.discarded = (
            self.prefetch.refill,
            self.prefetch.sweep,
            self.prefetch.discarded,
        )

    # -- the client-facing side ----------------------------------------------------------------

    async def submit(
        self, rid: str, x: torch.Tensor, output: str, want: str | None, client: str = ""
    ) -> Result:
        job = Job(rid, x, output, want, asyncio.get_running_loop().create_future(), client=client)
        return await self.pairing.wait(job)

    def make_room(self, client: str, grace: float) -> bool:
        return self.pairing.make_room(client, grace)

    # -- control frames from the peer (event loop) ---------------------------------------------

    def on_control(self, frame: wire.Frame) -> None:
        kind, rid, party = frame.kind, frame.request_id, self.party
        if kind == wire.ARRIVED and party == 0:
            self.pairing.arrived(rid, parse_arrived(frame.payload))
        elif kind == wire.BATCH and party == 1:
            self._start(self.follower.announced(rid, frame.payload))
        elif (
            (kind == wire.WITHDRAW and party == 0)
            or kind == wire.REJECT
            or (kind in (wire.PREFETCH, wire.DISCARD) and party == 1)
        ):
            try:
                message = messages.decode(frame)
            except BadMessage:
                message = None  # ignored, as any message this replica does not act on
            if isinstance(message, Withdraw):
                self.pairing.withdrawn(rid)
            elif isinstance(message, Reject):
                self.pairing.rejected(rid, message)
            elif isinstance(message, Prefetch):
                self.prefetch.prefetch(rid, message)
            elif isinstance(message, Discard):
                self.prefetch.discard(message)
        self.pairing.expire()

    def on_disconnect(self, reason: str) -> None:
        """The stream is gone: requests that wait for their pair cannot complete."""
        self.pairing.disconnected(reason)
        self.pool.clear()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.party == 0:
            self._start(self.scheduler.batch_forever(self._start))
            if self.pool.depth:
                self._start(self.prefetch.refill_forever())
        self._start(self.prefetch.sweep_forever())

    def _start(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.scheduler.shutdown()
