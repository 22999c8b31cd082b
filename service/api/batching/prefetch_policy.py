"""When to prefetch dealer material, and what the peer is told about it (PREFETCH, DISCARD).

The pool itself (`prefetch.py`) holds the entries and bounds them; this module decides when to
fill and empty it. Party 0 tops the pool up for the serving model while idle (`refill`: making
material competes with a run for the CPU, so it is made in the pauses between requests, the
offline phase), and under load keeps entries ahead for the batch size the load produces
(`expect`). It names each new entry to party 1 (PREFETCH) and each entry it drops unused
(DISCARD); party 1 fetches and drops what it is told (`prefetch`, `discard`), within its own
bounds. Both sweep out entries of versions they no longer hold, and old ones (`sweep`).
What it reveals: see `prefetch.py`.
"""

from __future__ import annotations

import asyncio

from service.api.batching.prefetch import PREFETCH_BATCH, PREFETCH_OUTPUT, MaterialPool
from service.api.batching.scheduler import IDLE_S, Scheduler
from service.api.transport import messages
from service.api.transport.messages import Discard, Prefetch
from service.api.transport.peer import PeerLink
from service.mpc.dealer import new_run_id
from service.store import LoadedModel, ModelRegistry

SWEEP_S = 1.0  # both replicas drop prefetched material that aged or lost its version this often


class PrefetchPolicy:
    """Fills and empties one replica's `MaterialPool`; event loop only."""

    def __init__(
        self,
        party: int,
        peer: PeerLink,
        registry: ModelRegistry,
        pool: MaterialPool,
        scheduler: Scheduler,
        *,
        max_batch: int,
        max_batches: int,
        timeout: float,
    ) -> None:
        self.party, self.peer, self.registry = party, peer, registry
        self.pool, self.scheduler = pool, scheduler
        self.max_batch, self.timeout = max_batch, timeout
        self._ahead = max_batches if pool.depth else 0  # entries kept for the load's batch size

    # -- party 0 -------------------------------------------------------------------------------

    def refill(self, model: LoadedModel | None = None) -> None:
        """Party 0: top the prefetch pool up for the serving model and announce the new ids.

        Only while idle: fetching and expanding competes with a run for the CPU and for this
        process's interpreter lock (one-image runs took 20 ms instead of 10 while requests came
        back to back), so material is made in the pauses between requests, the offline phase.
        """
        if self.party != 0 or not self.peer.connected or not self.scheduler.idle:
            return
        model = model or self.registry.newest_common(self.peer.peer_versions)
        if model is None:
            return
        for _ in range(self.pool.missing(model)):
            self._announce(model, None)

    def expect(self, model: LoadedModel, queued: int) -> None:
        """Party 0 under load: keep material ready for the batch the next free slot will take
        (the largest power of two up to the images queued now), fetched while this one runs."""
        size = 1 << (queued.bit_length() - 1)
        if size < 2:
            return
        for _ in range(self.pool.ahead(model, size, self._ahead)):
            self._announce(model, size)

    def _announce(self, model: LoadedModel, batch: int | None) -> None:
        material_id = new_run_id()
        messages.send(self.peer, material_id, Prefetch(model.version, batch))
        self.pool.add(material_id, model, batch or PREFETCH_BATCH, PREFETCH_OUTPUT)

    def discarded(self, ids: list[str]) -> None:
        """Party 0 dropped these unclaimed entries: party 1 drops them too (DISCARD)."""
        if self.party == 0 and ids:
            messages.send(self.peer, "", Discard(tuple(ids)))

    async def refill_forever(self, every: float = IDLE_S) -> None:
        while True:
            await asyncio.sleep(every)
            self.refill()

    # -- party 1 -------------------------------------------------------------------------------

    def prefetch(self, material_id: str, message: Prefetch) -> None:
        """Party 1: fetch what party 0 named, if it is a version held and a batch size allowed."""
        model = self.registry.get(message.version)
        batch = PREFETCH_BATCH if message.batch is None else message.batch
        if model is not None and 1 <= batch <= self.max_batch:
            self.pool.add(material_id, model, batch, PREFETCH_OUTPUT)

    def discard(self, message: Discard) -> None:
        """Party 1: drop the entries party 0 dropped."""
        named = set(message.ids)
        self.pool.drop(lambda e: e.material_id in named)

    # -- both ----------------------------------------------------------------------------------

    def sweep(self) -> None:
        """Drop prefetched entries of versions this replica no longer holds, and old ones:
        party 0 after `max_age_s`, party 1 (which ages its own entries in case party 0 never
        says DISCARD) after that plus the peer timeout, so it never drops one first."""
        held = set(self.registry.versions())
        self.pool.drop(lambda e: e.version not in held)
        self.pool.expire(self.pool.max_age_s + (self.timeout if self.party == 1 else 0.0))

    async def sweep_forever(self, every: float = SWEEP_S) -> None:
        while True:
            await asyncio.sleep(every)
            self.sweep()
