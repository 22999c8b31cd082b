"""Scheduling: party 0 forms batches of paired requests and runs them in slots; both replicas
run a batch's protocol on the slot's own thread.

Party 0's scheduler takes queued requests (`pairing.py`) of the same output and model version,
up to `max_batch` images, whenever one of its `max_batches` slots is free, and announces the
batch (BATCH, `messages.Batch`: a fresh batch id (`dealer.new_run_id`: it carries its minting
time, which the dealer checks against its window), the version, the request ids in order, the
slot and whether the run uses the slot's lane (`transport/lanes.py`), else the peer stream,
whether this run opens the model's masked weights, yes until a run has done so on the current
peer connection, see `beaver.linear`, and the dealer material to use: a prefetched entry's id
when one fits, see `prefetch.py`, else the batch id). Both replicas then run ONE protocol on
the concatenated shares, keyed by the batch id (peer frames and dealer randomness), on the
slot's own thread (so a slot's runs happen in the same order on both replicas), and give each
request its own rows of the result. At low load a batch is one request and starts at once;
under load requests queue while the slots are busy and leave together, so throughput rises
without a fixed waiting window. Rounds and bytes are per batch, independent of its size.
What the replicas learn from batching: which requests ran together and their sizes (public).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from service.api.batching.pairing import Job, Pairing
from service.api.batching.prefetch import PREFETCH_OUTPUT, MaterialPool
from service.api.errors import ApiError
from service.api.transport import messages
from service.api.transport.lanes import Lanes
from service.api.transport.messages import Batch, Reject
from service.api.transport.peer import PeerLink
from service.mpc.dealer import new_run_id
from service.store import LoadedModel, ModelRegistry

IDLE_S = 0.05  # party 0 refills prefetched material after this long without a run


@dataclass(frozen=True)
class Run:
    """What both replicas agree on for one protocol run (party 0 decides; BATCH carries it)."""

    batch_id: str  # keys the peer mailbox
    output: str
    model: LoadedModel
    open_weights: bool  # this run opens the model's masked weights
    material_id: str  # the dealer request id: a prefetched entry's, or the batch id
    slot: int = 0  # party 0's run slot: the thread, and the lane, the run uses
    lane: bool = False  # the run's rounds go over the slot's lane (else the peer stream)

    def announcement(self, jobs: list[Job]) -> Batch:
        """The BATCH message that tells party 1 about this run of `jobs`."""
        return Batch(
            self.model.version,
            self.output,
            tuple((j.request_id, int(j.x.shape[0])) for j in jobs),
            self.open_weights,
            self.material_id,
            self.slot,
            self.lane,
        )


@dataclass
class Result:
    """One request's answer: its rows of this party's share, and its batch's costs."""

    share: torch.Tensor
    model: LoadedModel
    rounds: int
    peer_bytes: int
    batch_images: int


# (run, shares of the batch) -> (share of the result, rounds, bytes): runs in a worker thread
RunBatch = Callable[[Run, torch.Tensor], tuple[torch.Tensor, int, int]]


class Scheduler:
    """The run slots, one thread each; party 0 also batches and announces. Event loop only."""

    def __init__(
        self,
        party: int,
        peer: PeerLink,
        registry: ModelRegistry,
        pairing: Pairing,
        run_batch: RunBatch,
        lanes: Lanes,
        *,
        weights_opened: Callable[[LoadedModel], bool],
        pool: MaterialPool,
        max_batch: int,
        max_batches: int,
    ) -> None:
        self.party, self.peer, self.registry, self.pairing = party, peer, registry, pairing
        self._run, self.lanes = run_batch, lanes
        self._executors: dict[int, ThreadPoolExecutor] = {}  # one thread per slot, in order
        self._free_slots: asyncio.Queue[int] = asyncio.Queue()  # slots without a run
        for slot in range(max_batches):
            self._free_slots.put_nowait(slot)
        self.max_batch, self.max_batches = max_batch, max_batches
        self._last_run_end = 0.0
        self._weights_opened = weights_opened
        self.pool = pool
        # after each batch party 0 forms: the model and the images queued when it formed
        self.on_batch: Callable[[LoadedModel, int], None] = lambda model, queued: None

    def executor(self, slot: int) -> ThreadPoolExecutor:
        if slot not in self._executors:
            self._executors[slot] = ThreadPoolExecutor(1, thread_name_prefix=f"slot{slot}")
        return self._executors[slot]

    def shutdown(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)

    @property
    def idle(self) -> bool:
        """No run in flight, none queued, and none ended within the last `IDLE_S` seconds."""
        return (
            self._free_slots.qsize() == self.max_batches
            and not self.pairing.queue
            and time.monotonic() - self._last_run_end >= IDLE_S
        )

    def pick_model(self, want: str | None) -> LoadedModel:
        """The version a batch runs: the one its clients named if both hold it, else the
        newest both hold."""
        peer_versions = self.peer.peer_versions
        if want is not None:
            model = self.registry.get(want)
            if model is None or want not in peer_versions:
                raise ApiError(
                    "model_version_mismatch",
                    f"model version {want!r} is not held by both replicas (this one holds "
                    f"{self.registry.versions()}); fetch /v1/model again",
                )
            return model
        model = self.registry.newest_common(peer_versions)
        if model is None:
            raise ApiError("not_ready", "the replicas hold no common model version")
        return model

    def _take_batch(self) -> list[Job]:
        """The oldest queued job and the queued jobs that can run with it, up to max_batch
        images, or exactly as many as an entry of prefetched material holds when that fits."""
        queue = self.pairing.queue
        first = next(iter(queue.values()))
        alike = [j for j in queue.values() if (j.output, j.want) == (first.output, first.want)]
        most = self.max_batch
        with contextlib.suppress(ApiError):  # no model: the caller refuses the batch
            queued = min(sum(j.x.shape[0] for j in alike), self.max_batch)
            ready = self.pool.ready_batch(self.pick_model(first.want), queued, first.output)
            if ready is not None and ready > 1:
                most = ready
        batch, images = [], 0
        for job in alike:
            if batch and images + job.x.shape[0] > most:
                break
            batch.append(job)
            images += job.x.shape[0]
            del queue[job.request_id]
        return batch

    async def batch_forever(self, start: Callable) -> None:
        """Party 0: form, announce and start batches while slots are free (`start` runs a
        coroutine as a task)."""
        queue, wake = self.pairing.queue, self.pairing.wake
        while True:
            await wake.wait()
            wake.clear()
            while queue:
                slot = await self._free_slots.get()
                if not queue:  # its jobs timed out or left while this waited for a slot
                    self._free_slots.put_nowait(slot)
                    break
                queued = sum(j.x.shape[0] for j in queue.values())
                jobs = [j for j in self._take_batch() if not j.future.done()]
                if not jobs:
                    self._free_slots.put_nowait(slot)
                    continue
                try:
                    model = self.pick_model(jobs[0].want)
                except ApiError as exc:
                    self._free_slots.put_nowait(slot)
                    for job in jobs:
                        messages.send(self.peer, job.request_id, Reject(exc.code, exc.message))
                        job.future.set_exception(exc)
                    continue
                for job in jobs:
                    job.batched = True
                batch_id = new_run_id()
                images = sum(j.x.shape[0] for j in jobs)
                ready = self.pool.claim(model, images, jobs[0].output)
                run = Run(
                    batch_id,
                    jobs[0].output,
                    model,
                    not self._weights_opened(model),
                    ready or batch_id,
                    slot,
                    self.lanes.up(slot),
                )
                # BATCH first: it reserves the claimed entry on party 1 before any DISCARD
                messages.send(self.peer, batch_id, run.announcement(jobs))
                if run.output == PREFETCH_OUTPUT:
                    self.on_batch(model, min(queued, self.max_batch))
                start(self.execute(run, jobs, release=True))

    async def execute(self, run: Run, jobs: list[Job], *, release: bool) -> None:
        """Both parties: run the batch on its slot's thread and answer each job with its rows;
        `release` (party 0): free the slot afterwards."""
        try:
            x = torch.cat([j.x for j in jobs]) if len(jobs) > 1 else jobs[0].x
            loop = asyncio.get_running_loop()
            share, rounds, nbytes = await loop.run_in_executor(
                self.executor(run.slot), self._run, run, x
            )
            model = run.model
            start = 0
            for job in jobs:
                n = job.x.shape[0]
                if not job.future.done():
                    job.future.set_result(
                        Result(share[start : start + n], model, rounds, nbytes, x.shape[0])
                    )
                start += n
        except Exception as exc:  # ApiError from the protocol run, or anything unexpected
            err = exc if isinstance(exc, ApiError) else ApiError("internal", repr(exc))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
        finally:
            if release:
                self._free_slots.put_nowait(run.slot)
                self._last_run_end = time.monotonic()  # refill once idle, see `refill`
