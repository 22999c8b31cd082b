"""Pairing and dynamic batching: which client requests run together, agreed by both replicas.

A client posts one share to each replica under one request id. Party 1 tells party 0 that a
request arrived (ARRIVED: shape, output, wanted version); party 0 pairs it with its own copy,
checks that both describe the same job (else both answer 400 `share_mismatch`), and queues it.
Party 0's batcher takes queued requests of the same output and model version, up to
`max_batch` images, whenever one of its `max_batches` slots is free, and announces the batch
(BATCH: a fresh batch id (`dealer.new_run_id`: it carries its minting time, which the dealer
checks against its window), the version, the request ids in order, the slot and whether the run
uses the slot's lane (`lanes.py`), else the peer stream, whether this run opens the
model's masked weights, yes until a run has done so on the current peer connection, see
`beaver.linear`, and the dealer material to use: a prefetched entry's id when one fits, see
`prefetch.py`, else the batch id). Both replicas then run ONE
protocol on the concatenated shares, keyed by the batch id (peer frames and dealer
randomness), on the slot's own thread (so a slot's runs happen in the same order on both
replicas), and give each request its own rows of the result. At low load a batch is one
request and starts at once; under load requests queue while the slots are busy and leave
together, so throughput rises without a fixed waiting window.

Party 1 does not simply follow BATCH (`Batcher._refusal`): each announced request it received
must be what its own client asked (output kind, the wanted model version if the client named
one, the number of rows, the image shape), the batch must fit its own policy (no scores output
unless `scores_enabled`, at most `max_batch` images, each request named once) and name a
version it holds. Otherwise it runs nothing: its clients get 502 `peer_error` (409
`model_version_mismatch` for a version it does not hold), party 0's run gets ABORT on the
channel it would have used, so party 0's clients get 502 `peer_error` too, and the refusal is
counted (`privdigit_batches_refused_total{reason}`). An honest party 0 never sends such a BATCH:
it pairs and checks both copies of each request first.

A request that only one replica received never joins a batch: it fails alone with 504 after
the peer timeout (party 1 withdraws it, WITHDRAW, and party 0 fails its copy at once). Such lone
shares hold a place in the replica's `max_inflight` while they wait, so a full replica makes
room for a new request (`make_room`): a share that has waited `pair_grace_s` or longer for its
twin, of the client address holding the most waiting shares, fails at once with 504, provided
that address holds more waiting shares than the newcomer's. One client's lone shares then keep
other clients out for at most `pair_grace_s`, and cannot push each other out. If a withdrawn
request was already announced, party 1 runs its rows on zeros and drops the result, so one
client's missing share never fails another client's request. Rounds and bytes are per batch,
independent of its size.
What the replicas learn from batching: which requests ran together and their sizes (public).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from service.api.errors import ApiError
from service.api.prefetch import PREFETCH_BATCH, PREFETCH_OUTPUT, MaterialPool
from service.api.transport import wire
from service.api.transport.lanes import MAX_LANES, Lanes
from service.api.transport.peer import FramedChannel, PeerLink, PeerLost
from service.mpc.dealer import new_run_id
from service.store import LoadedModel, ModelRegistry

IDLE_S = 0.05  # party 0 refills prefetched material after this long without a run
SWEEP_S = 1.0  # both replicas drop prefetched material that aged or lost its version this often
OUTPUTS = ("label", "scores")


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


class BadAnnouncement(ValueError):
    """A BATCH payload that does not have the announcement's fields and types."""


@dataclass(frozen=True)
class Announcement:
    """The BATCH message: the run party 0 decided on, with its requests' ids and row counts."""

    version: str
    output: str
    requests: tuple[tuple[str, int], ...]  # (request id, images), in the batch's row order
    open_weights: bool
    material: str  # the dealer request id: a prefetched entry's, or the batch id
    slot: int = 0
    lane: bool = False

    @classmethod
    def of(cls, run: Run, jobs: list[Job]) -> Announcement:
        return cls(
            run.model.version,
            run.output,
            tuple((j.request_id, int(j.x.shape[0])) for j in jobs),
            run.open_weights,
            run.material_id,
            run.slot,
            run.lane,
        )

    def to_payload(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "output": self.output,
            "requests": [list(r) for r in self.requests],
            "open_weights": self.open_weights,
            "material": self.material,
            "slot": self.slot,
            "lane": self.lane,
        }

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> Announcement:
        """Parse a BATCH payload; `BadAnnouncement` names the first field that is wrong."""

        def typed(name: str, kind: type) -> Any:
            value = p.get(name)
            if type(value) is not kind:  # exact: a bool is not an int here
                raise BadAnnouncement(f"BATCH field {name!r} is not a {kind.__name__}")
            return value

        requests = p.get("requests")
        if not isinstance(requests, list) or not all(
            isinstance(r, list) and len(r) == 2 and type(r[0]) is str and type(r[1]) is int
            for r in requests
        ):
            raise BadAnnouncement("BATCH field 'requests' is not a list of [id, images] pairs")
        slot = typed("slot", int)
        if not 0 <= slot < MAX_LANES:
            raise BadAnnouncement(f"BATCH slot {slot} is not in [0, {MAX_LANES})")
        return cls(
            typed("version", str),
            typed("output", str),
            tuple((r[0], r[1]) for r in requests),
            typed("open_weights", bool),
            typed("material", str),
            slot,
            typed("lane", bool),
        )


@dataclass(frozen=True)
class Refusal:
    """Why party 1 refuses a BATCH: a metric label, the clients' error code and a message."""

    reason: str  # malformed, scores_disabled, output, version, rows, shape, unknown_version
    message: str
    code: str = "peer_error"
    extra: dict[str, Any] = field(default_factory=dict)


# (run, shares of the batch) -> (share of the result, rounds, bytes): runs in a worker thread
RunBatch = Callable[[Run, torch.Tensor], tuple[torch.Tensor, int, int]]


@dataclass
class Job:
    request_id: str
    x: torch.Tensor
    output: str
    want: str | None
    future: asyncio.Future
    batched: bool = False
    client: str = ""  # the client's address, for `make_room`
    since: float = field(default_factory=time.monotonic)

    @property
    def meta(self) -> dict[str, Any]:
        return {"shape": list(self.x.shape), "output": self.output, "want": self.want}


@dataclass
class Result:
    share: torch.Tensor
    model: LoadedModel
    rounds: int
    peer_bytes: int
    batch_images: int


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
        self.party, self.peer, self.registry = party, peer, registry
        self._run, self.lanes = run_batch, lanes
        self._executors: dict[int, ThreadPoolExecutor] = {}  # one thread per slot, in order
        self._free_slots: asyncio.Queue[int] = asyncio.Queue()  # slots without a run
        for slot in range(max_batches):
            self._free_slots.put_nowait(slot)
        self._ahead = max_batches if pool.depth else 0  # entries kept for the load's batch size
        self.max_batches = max_batches
        self._last_run_end = 0.0
        self._weights_opened = weights_opened
        self.pool = pool
        self.max_batch, self.timeout = max_batch, timeout
        self.scores_enabled = scores_enabled  # party 1's policy: no logits share unless set
        self._on_refuse = on_refuse  # party 1 refused a BATCH (counted by reason)
        self._jobs: dict[str, Job] = {}  # this replica's requests not yet in a batch
        self._peer_meta: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()
        self._queue: OrderedDict[str, Job] = OrderedDict()  # party 0: paired, waiting
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    # -- the client-facing side ----------------------------------------------------------------

    async def submit(
        self, rid: str, x: torch.Tensor, output: str, want: str | None, client: str = ""
    ) -> Result:
        job = Job(rid, x, output, want, asyncio.get_running_loop().create_future(), client=client)
        self._jobs[rid] = job
        if self.party == 1:
            self._send(wire.ARRIVED, rid, job.meta)
        else:
            self._try_pair(rid)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout)
        except TimeoutError:
            if job.batched:  # running: its batch has its own timeouts on the peer channel
                return await job.future
            self._queue.pop(rid, None)
            if self.party == 1:
                self._send(wire.WITHDRAW, rid, {})
            raise ApiError(
                "peer_timeout",
                f"the peer replica did not get request {rid!r} within {self.timeout:g} s (did "
                "the client post the other share with the same request id?)",
            ) from None
        finally:
            self._jobs.pop(rid, None)

    def make_room(self, client: str, grace: float) -> bool:
        """A full replica, for a new request from `client`: fail the oldest share that has waited
        `grace` seconds or more for its twin, of the address holding the most waiting shares,
        if that address holds more of them than `client` does. True if a place was freed."""
        now, waiting = time.monotonic(), {}
        for job in self._jobs.values():  # waiting: not paired (party 0), not announced (1)
            if not job.batched and not job.future.done() and job.request_id not in self._queue:
                waiting.setdefault(job.client, []).append(job)
        mine = len(waiting.get(client, ()))
        for address in sorted(waiting, key=lambda a: -len(waiting[a])):
            if len(waiting[address]) <= mine:
                return False
            stale = [j for j in waiting[address] if now - j.since >= grace]
            if stale:
                victim = min(stale, key=lambda j: j.since)
                message = (
                    f"request {victim.request_id!r} gave up its place: the peer replica did not "
                    f"get its other share within {grace:g} s while this replica was full"
                )
                victim.future.set_exception(ApiError("peer_timeout", message))
                if self.party == 1:
                    self._send(wire.WITHDRAW, victim.request_id, {})
                else:
                    self._send(
                        wire.REJECT, victim.request_id, {"code": "peer_timeout", "message": message}
                    )
                return True
        return False

    def _send(self, kind: int, rid: str, payload: dict[str, Any]) -> None:
        with contextlib.suppress(PeerLost):
            self.peer.send(wire.encode_json(kind, rid, payload))

    # -- control frames from the peer (event loop) ---------------------------------------------

    def on_control(self, frame: wire.Frame) -> None:
        p, rid = frame.payload or {}, frame.request_id
        if frame.kind == wire.ARRIVED and self.party == 0:
            self._peer_meta[rid] = (p, time.monotonic())
            self._try_pair(rid)
        elif frame.kind == wire.WITHDRAW and self.party == 0:
            self._peer_meta.pop(rid, None)
            self._queue.pop(rid, None)  # paired but not batched: it cannot run any more
            job = self._jobs.get(rid)
            if job is not None and not job.batched and not job.future.done():
                job.future.set_exception(
                    ApiError("peer_timeout", f"the peer replica gave up on request {rid!r}")
                )
        elif frame.kind == wire.REJECT:
            job = self._jobs.get(rid)
            if job is not None and not job.future.done():
                job.future.set_exception(ApiError(str(p.get("code")), str(p.get("message"))))
        elif frame.kind == wire.BATCH and self.party == 1:
            material = p.get("material")
            if isinstance(material, str):  # no later DISCARD may drop what this run uses
                self.pool.reserve(material)
            self._start(self._run_announced(rid, p))
        elif frame.kind == wire.PREFETCH and self.party == 1:
            model = self.registry.get(str(p.get("version")))
            batch = p.get("batch", PREFETCH_BATCH)
            if model is not None and type(batch) is int and 1 <= batch <= self.max_batch:
                self.pool.add(rid, model, batch, PREFETCH_OUTPUT)
        elif frame.kind == wire.DISCARD and self.party == 1:
            ids = p.get("ids")
            if isinstance(ids, list):
                named = {i for i in ids if isinstance(i, str)}
                self.pool.drop(lambda e: e.material_id in named)
        self._expire()

    def _expire(self) -> None:
        cutoff = time.monotonic() - 2 * self.timeout
        while self._peer_meta:
            rid, (_, seen) = next(iter(self._peer_meta.items()))
            if seen >= cutoff:
                break
            del self._peer_meta[rid]

    def on_disconnect(self, reason: str) -> None:
        """The stream is gone: requests that wait for their pair cannot complete."""
        for job in list(self._jobs.values()):
            if not job.batched and not job.future.done():
                job.future.set_exception(ApiError("not_ready", f"lost the peer replica: {reason}"))
        self._queue.clear()
        self._peer_meta.clear()
        self.pool.clear()

    # -- party 0: pairing and batching ---------------------------------------------------------

    def _try_pair(self, rid: str) -> None:
        job, seen = self._jobs.get(rid), self._peer_meta.get(rid)
        if job is None or seen is None or job.batched:
            return
        del self._peer_meta[rid]
        theirs = seen[0]
        if theirs != job.meta:
            message = (
                f"replica 0 got a share of shape {job.meta['shape']} for {job.output!r} "
                f"(version {job.want!r}), replica 1 one of shape {theirs.get('shape')} for "
                f"{theirs.get('output')!r} (version {theirs.get('want')!r})"
            )
            self._send(wire.REJECT, rid, {"code": "share_mismatch", "message": message})
            job.future.set_exception(ApiError("share_mismatch", message))
            return
        self._queue[rid] = job
        self._wake.set()

    def start(self) -> None:
        if self.party == 0:
            self._start(self._batch_forever())
            if self.pool.depth:
                self._start(self._refill_forever())
        self._start(self._sweep_forever())

    def discarded(self, ids: list[str]) -> None:
        """Party 0 dropped these unclaimed entries: party 1 drops them too (DISCARD)."""
        if self.party == 0 and ids:
            self._send(wire.DISCARD, "", {"ids": ids})

    def sweep(self) -> None:
        """Drop prefetched entries of versions this replica no longer holds, and old ones:
        party 0 after `max_age_s`, party 1 (which ages its own entries in case party 0 never
        says DISCARD) after that plus the peer timeout, so it never drops one first."""
        held = set(self.registry.versions())
        self.pool.drop(lambda e: e.version not in held)
        self.pool.expire(self.pool.max_age_s + (self.timeout if self.party == 1 else 0.0))

    async def _sweep_forever(self, every: float = SWEEP_S) -> None:
        while True:
            await asyncio.sleep(every)
            self.sweep()

    def _start(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)

    def _executor(self, slot: int) -> ThreadPoolExecutor:
        if slot not in self._executors:
            self._executors[slot] = ThreadPoolExecutor(1, thread_name_prefix=f"slot{slot}")
        return self._executors[slot]

    def _pick_model(self, want: str | None) -> LoadedModel:
        if want is not None:
            model = self.registry.get(want)
            if model is None or want not in self.peer.peer_versions:
                raise ApiError(
                    "model_version_mismatch",
                    f"model version {want!r} is not held by both replicas (this one holds "
                    f"{self.registry.versions()}); fetch /v1/model again",
                )
            return model
        model = self.registry.newest_common(self.peer.peer_versions)
        if model is None:
            raise ApiError("not_ready", "the replicas hold no common model version")
        return model

    def _take_batch(self) -> list[Job]:
        """The oldest queued job and the queued jobs that can run with it, up to max_batch
        images, or exactly as many as an entry of prefetched material holds when that fits."""
        first = next(iter(self._queue.values()))
        alike = [
            j for j in self._queue.values() if (j.output, j.want) == (first.output, first.want)
        ]
        most = self.max_batch
        with contextlib.suppress(ApiError):  # no model: the caller refuses the batch
            queued = min(sum(j.x.shape[0] for j in alike), self.max_batch)
            ready = self.pool.ready_batch(self._pick_model(first.want), queued, first.output)
            if ready is not None and ready > 1:
                most = ready
        batch, images = [], 0
        for job in alike:
            if batch and images + job.x.shape[0] > most:
                break
            batch.append(job)
            images += job.x.shape[0]
            del self._queue[job.request_id]
        return batch

    def _expect(self, model: LoadedModel, queued: int) -> None:
        """Party 0 under load: keep material ready for the batch the next free slot will take
        (the largest power of two up to the images queued now), fetched while this one runs."""
        size = 1 << (queued.bit_length() - 1)
        if size < 2:
            return
        for _ in range(self.pool.ahead(model, size, self._ahead)):
            material_id = new_run_id()
            self._send(wire.PREFETCH, material_id, {"version": model.version, "batch": size})
            self.pool.add(material_id, model, size, PREFETCH_OUTPUT)

    async def _batch_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                slot = await self._free_slots.get()
                queued = sum(j.x.shape[0] for j in self._queue.values())
                jobs = [j for j in self._take_batch() if not j.future.done()]
                if not jobs:
                    self._free_slots.put_nowait(slot)
                    continue
                try:
                    model = self._pick_model(jobs[0].want)
                except ApiError as exc:
                    self._free_slots.put_nowait(slot)
                    for job in jobs:
                        self._send(
                            wire.REJECT, job.request_id, {"code": exc.code, "message": exc.message}
                        )
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
                self._send(wire.BATCH, batch_id, Announcement.of(run, jobs).to_payload())
                if run.output == PREFETCH_OUTPUT:
                    self._expect(model, min(queued, self.max_batch))
                self._start(self._execute(run, jobs, release=True))

    @property
    def idle(self) -> bool:
        """No run in flight, none queued, and none ended within the last `IDLE_S` seconds."""
        return (
            self._free_slots.qsize() == self.max_batches
            and not self._queue
            and time.monotonic() - self._last_run_end >= IDLE_S
        )

    def refill(self, model: LoadedModel | None = None) -> None:
        """Party 0: top the prefetch pool up for the serving model and announce the new ids.

        Only while idle: fetching and expanding competes with a run for the CPU and for this
        process's interpreter lock (one-image runs took 20 ms instead of 10 while requests came
        back to back), so material is made in the pauses between requests, the offline phase.
        """
        if self.party != 0 or not self.peer.connected or not self.idle:
            return
        model = model or self.registry.newest_common(self.peer.peer_versions)
        if model is None:
            return
        for _ in range(self.pool.missing(model)):
            material_id = new_run_id()
            self._send(wire.PREFETCH, material_id, {"version": model.version})
            self.pool.add(material_id, model, PREFETCH_BATCH, PREFETCH_OUTPUT)

    async def _refill_forever(self, every: float = IDLE_S) -> None:
        while True:
            await asyncio.sleep(every)
            self.refill()

    # -- both parties: running a batch ---------------------------------------------------------

    async def _run_announced(self, batch_id: str, p: dict[str, Any]) -> None:
        """Party 1: run the batch party 0 announced, with zeros for requests it never got, once
        it passes this replica's own checks (`_refusal`); else refuse it on both sides."""
        try:
            ann = Announcement.from_payload(p)
        except BadAnnouncement as exc:
            slot = p.get("slot")
            slot = slot if type(slot) is int and 0 <= slot < MAX_LANES else 0
            await self._refuse(
                batch_id, slot, p.get("lane") is True, [], Refusal("malformed", str(exc))
            )
            return
        model = self.registry.get(ann.version)
        jobs: list[Job | None] = []
        for rid, _ in ann.requests:
            job = self._jobs.get(rid)
            if job is not None and not job.batched:
                job.batched = True
                jobs.append(job)
            else:
                jobs.append(None)
        refusal = self._refusal(ann, model, jobs)
        if refusal is not None:
            await self._refuse(batch_id, ann.slot, ann.lane, jobs, refusal, ann.material)
            return
        assert model is not None  # `_refusal` refuses a version this replica does not hold
        filler = [
            job if job is not None else
            Job(rid, torch.zeros((n, *model.network.input_shape), dtype=torch.int64),
                ann.output, None, asyncio.get_running_loop().create_future())
            for job, (rid, n) in zip(jobs, ann.requests, strict=True)
        ]  # fmt: skip
        run = Run(
            batch_id, ann.output, model, ann.open_weights, ann.material or batch_id, ann.slot,
            ann.lane,
        )  # fmt: skip
        await self._execute(run, filler, release=False)

    def _refusal(
        self, ann: Announcement, model: LoadedModel | None, jobs: list[Job | None]
    ) -> Refusal | None:
        """Party 1's own checks of a BATCH, or None when it may run.

        Policy first (whatever the requests): a known output kind, scores only where this
        replica enables them, 1 to `max_batch` images in all, each request id once. Then each
        request this replica received must be exactly what its client asked: the output kind,
        the model version when the client named one, the number of rows, the image shape.
        """
        if ann.output not in OUTPUTS:
            return Refusal("output", f"party 0 announced output {ann.output!r}")
        if ann.output != "label" and not self.scores_enabled:
            return Refusal(
                "scores_disabled",
                f"party 0 announced a {ann.output!r} run; this replica returns labels only",
            )
        rows = [n for _, n in ann.requests]
        if not rows or min(rows) < 1 or sum(rows) > self.max_batch:
            return Refusal(
                "rows",
                f"party 0 announced {rows} images per request (1 to {self.max_batch} in all)",
            )
        if len({rid for rid, _ in ann.requests}) != len(ann.requests):
            return Refusal("rows", "party 0 announced one request twice")
        if model is None:
            return Refusal(
                "unknown_version",
                f"party 0 serves model version {ann.version!r}; this replica holds "
                f"{self.registry.versions()}",
                code="model_version_mismatch",
            )
        for job, (rid, n) in zip(jobs, ann.requests, strict=True):
            if job is None:
                continue
            if job.output != ann.output:
                return Refusal(
                    "output",
                    f"party 0 announced output {ann.output!r} for request {rid!r}, whose client "
                    f"asked this replica for {job.output!r}",
                )
            if job.want is not None and job.want != ann.version:
                return Refusal(
                    "version",
                    f"party 0 announced model version {ann.version!r} for request {rid!r}, "
                    f"whose client asked this replica for {job.want!r}",
                )
            if job.x.shape[0] != n:
                return Refusal(
                    "rows",
                    f"party 0 announced {n} images for request {rid!r}; its client sent this "
                    f"replica {job.x.shape[0]}",
                )
            if tuple(job.x.shape[1:]) != tuple(model.network.input_shape):
                return Refusal(
                    "shape",
                    f"request {rid!r} has images of shape {list(job.x.shape[1:])}; model "
                    f"version {ann.version!r} takes {list(model.network.input_shape)}",
                )
        return None

    async def _refuse(
        self,
        batch_id: str,
        slot: int,
        lane: bool,
        jobs: list[Job | None],
        refusal: Refusal,
        material: str | None = None,
    ) -> None:
        """Party 1: run nothing for this BATCH; fail this replica's requests in it, and tell
        party 0's run (on the slot's lane or the peer stream, from the slot's thread, so the
        ABORT falls between that slot's runs as a run's frames would)."""
        self._on_refuse(refusal.reason)
        message = f"replica 1 refused batch {batch_id!r}: {refusal.message}"
        err = ApiError(refusal.code, message)
        for job in jobs:
            if job is not None and not job.future.done():
                job.future.set_exception(err)
        if material is not None:
            self.pool.take(material)  # reserved for this run: it will not come

        def abort() -> None:
            try:
                ch: FramedChannel = (
                    self.lanes.channel(slot, batch_id) if lane else self.peer.channel(batch_id)
                )
            except PeerLost:
                self._send(wire.ABORT, batch_id, {"code": refusal.code, "message": message})
                return
            except Exception:  # the run id is already in use: a lying party 0; nothing to say
                return
            ch.abort(refusal.code, message)
            ch.close(False)

        await asyncio.get_running_loop().run_in_executor(self._executor(slot), abort)

    async def _execute(self, run: Run, jobs: list[Job], *, release: bool) -> None:
        try:
            x = torch.cat([j.x for j in jobs]) if len(jobs) > 1 else jobs[0].x
            loop = asyncio.get_running_loop()
            share, rounds, nbytes = await loop.run_in_executor(
                self._executor(run.slot), self._run, run, x
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
