"""Party 1's side of a batch: check party 0's BATCH against its own clients and policy, then
run it, or refuse it on both sides.

Party 1 does not simply follow BATCH (`Follower.refusal`): each announced request it received
must be what its own client asked (output kind, the wanted model version if the client named
one, the number of rows, the image shape), the batch must fit its own policy (no scores output
unless `scores_enabled`, at most `max_batch` images, each request named once) and name a
version it holds. Otherwise it runs nothing: its clients get 502 `peer_error` (409
`model_version_mismatch` for a version it does not hold), party 0's run gets ABORT on the
channel it would have used, so party 0's clients get 502 `peer_error` too, and the refusal is
counted (`privdigit_batches_refused_total{reason}`). An honest party 0 never sends such a BATCH:
it pairs and checks both copies of each request first (`pairing.py`). If a request party 1
withdrew was already announced, party 1 runs its rows on zeros and drops the result, so one
client's missing share never fails another client's request.
What party 1 learns here: the batch's composition and sizes (public).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import torch

from service.api.batching.pairing import Job, Pairing
from service.api.batching.prefetch import MaterialPool
from service.api.batching.scheduler import Run, Scheduler
from service.api.errors import ApiError
from service.api.transport import messages
from service.api.transport.lanes import MAX_LANES, Lanes
from service.api.transport.messages import Abort, BadMessage, Batch
from service.api.transport.peer import FramedChannel, PeerLink, PeerLost
from service.store import LoadedModel, ModelRegistry

OUTPUTS = ("label", "scores")


@dataclass(frozen=True)
class Refusal:
    """Why party 1 refuses a BATCH: a metric label, the clients' error code and a message."""

    reason: str  # malformed, scores_disabled, output, version, rows, shape, unknown_version
    message: str
    code: str = "peer_error"
    extra: dict[str, Any] = field(default_factory=dict)


class Follower:
    """Party 1: runs the batches party 0 announces, after its own checks; event loop only."""

    def __init__(
        self,
        peer: PeerLink,
        registry: ModelRegistry,
        pairing: Pairing,
        scheduler: Scheduler,
        lanes: Lanes,
        pool: MaterialPool,
        *,
        max_batch: int,
        scores_enabled: bool,
        on_refuse: Callable[[str], None],
    ) -> None:
        self.peer, self.registry, self.pairing, self.scheduler = peer, registry, pairing, scheduler
        self.lanes, self.pool = lanes, pool
        self.max_batch = max_batch
        self.scores_enabled = scores_enabled  # no logits share unless set
        self._on_refuse = on_refuse  # counted by reason

    def announced(self, batch_id: str, payload: Any) -> Coroutine[Any, Any, None]:
        """Party 0's BATCH, parsed once, now (on the event loop, before any later DISCARD): a
        well-formed one reserves the entry it names, so no DISCARD drops what its run uses; a
        malformed one reserves nothing. The run (or the refusal) to start as a task."""
        try:
            ann = Batch.from_payload(payload)
        except BadMessage as exc:
            p = payload if isinstance(payload, dict) else {}
            slot = p.get("slot")
            slot = slot if type(slot) is int and 0 <= slot < MAX_LANES else 0
            return self.refuse(
                batch_id, slot, p.get("lane") is True, [], Refusal("malformed", str(exc))
            )
        self.pool.reserve(ann.material)
        return self.run_announced(batch_id, ann)

    async def run_announced(self, batch_id: str, ann: Batch) -> None:
        """Run the batch party 0 announced, with zeros for requests this replica never got,
        once it passes this replica's own checks (`refusal`); else refuse it on both sides."""
        model = self.registry.get(ann.version)
        jobs: list[Job | None] = []
        for rid, _ in ann.requests:
            job = self.pairing.jobs.get(rid)
            if job is not None and not job.batched:
                job.batched = True
                jobs.append(job)
            else:
                jobs.append(None)
        refusal = self.refusal(ann, model, jobs)
        if refusal is not None:
            await self.refuse(batch_id, ann.slot, ann.lane, jobs, refusal, ann.material)
            return
        assert model is not None  # `refusal` refuses a version this replica does not hold
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
        await self.scheduler.execute(run, filler, release=False)

    def refusal(
        self, ann: Batch, model: LoadedModel | None, jobs: list[Job | None]
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

    async def refuse(
        self,
        batch_id: str,
        slot: int,
        lane: bool,
        jobs: list[Job | None],
        refusal: Refusal,
        material: str | None = None,
    ) -> None:
        """Run nothing for this BATCH; fail this replica's requests in it, and tell party 0's
        run (on the slot's lane or the peer stream, from the slot's thread, so the ABORT falls
        between that slot's runs as a run's frames would)."""
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
                messages.send(self.peer, batch_id, Abort(refusal.code, message))
                return
            except Exception:  # the run id is already in use: a lying party 0; nothing to say
                return
            ch.abort(refusal.code, message)
            ch.close(False)

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.scheduler.executor(slot), abort)
