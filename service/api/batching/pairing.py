"""Pairing: a client's two shares of one request, met across the replicas and checked alike.

A client posts one share to each replica under one request id. Party 1 tells party 0 that a
request arrived (ARRIVED: shape, output, wanted version); party 0 pairs it with its own copy,
checks that both describe the same job (else both answer 400 `share_mismatch`), and queues it
for the scheduler (`scheduler.py`). Party 1 keeps its copy until a BATCH names it
(`follower.py`).

A request that only one replica received never joins a batch: it fails alone with 504 after
the peer timeout (party 1 withdraws it, WITHDRAW, and party 0 fails its copy at once). Such lone
shares hold a place in the replica's `max_inflight` while they wait, so a full replica makes
room for a new request (`make_room`): a share that has waited `pair_grace_s` or longer for its
twin, of the client address holding the most waiting shares, fails at once with 504, provided
that address holds more waiting shares than the newcomer's. One client's lone shares then keep
other clients out for at most `pair_grace_s`, and cannot push each other out.
What the replicas learn from pairing: each request's shape, output kind and wanted version
(public metadata the client sent both).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from service.api.errors import ApiError
from service.api.transport import messages
from service.api.transport.messages import Arrived, BadMessage, Reject, Stream, Withdraw


@dataclass
class Job:
    """One client request on this replica: its share, what it asked for, the answer's future."""

    request_id: str
    x: torch.Tensor
    output: str
    want: str | None
    future: asyncio.Future
    batched: bool = False
    client: str = ""  # the client's address, for `make_room`
    since: float = field(default_factory=time.monotonic)

    @property
    def arrived(self) -> Arrived:
        """What this replica tells (party 1) or compares with (party 0) the peer."""
        return Arrived(list(self.x.shape), self.output, self.want)


class Pairing:
    """This replica's requests not yet in a batch, and (party 0) the paired ones waiting to be
    scheduled in `queue`, oldest first; `wake` is set whenever one joins it. Event loop only."""

    def __init__(self, party: int, peer: Stream, timeout: float) -> None:
        self.party, self.peer, self.timeout = party, peer, timeout
        self.jobs: dict[str, Job] = {}  # this replica's requests not yet in a batch
        self.queue: OrderedDict[str, Job] = OrderedDict()  # party 0: paired, waiting
        self.wake = asyncio.Event()
        # party 0: what party 1 said of requests this replica may not have yet (None: malformed)
        self._peer_meta: OrderedDict[str, tuple[Arrived | None, float]] = OrderedDict()

    def _send(self, rid: str, message: messages.Message) -> None:
        messages.send(self.peer, rid, message)

    async def wait(self, job: Job) -> Any:
        """Hold `job` until its batch answers; 504 when its twin never came in time."""
        rid = job.request_id
        self.jobs[rid] = job
        if self.party == 1:
            self._send(rid, job.arrived)
        else:
            self._try_pair(rid)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout)
        except TimeoutError:
            if job.batched:  # running: its batch has its own timeouts on the peer channel
                return await job.future
            self.queue.pop(rid, None)
            if self.party == 1:
                self._send(rid, Withdraw())
            raise ApiError(
                "peer_timeout",
                f"the peer replica did not get request {rid!r} within {self.timeout:g} s (did "
                "the client post the other share with the same request id?)",
            ) from None
        finally:
            self.jobs.pop(rid, None)

    def make_room(self, client: str, grace: float) -> bool:
        """A full replica, for a new request from `client`: fail the oldest share that has waited
        `grace` seconds or more for its twin, of the address holding the most waiting shares,
        if that address holds more of them than `client` does. True if a place was freed."""
        now, waiting = time.monotonic(), {}
        for job in self.jobs.values():  # waiting: not paired (party 0), not announced (1)
            if not job.batched and not job.future.done() and job.request_id not in self.queue:
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
                    self._send(victim.request_id, Withdraw())
                else:
                    self._send(victim.request_id, Reject("peer_timeout", message))
                return True
        return False

    # -- messages from the peer ----------------------------------------------------------------

    def arrived(self, rid: str, theirs: Arrived | None) -> None:
        """Party 0: party 1 got request `rid` (None: its ARRIVED was malformed)."""
        self._peer_meta[rid] = (theirs, time.monotonic())
        self._try_pair(rid)

    def withdrawn(self, rid: str) -> None:
        """Party 0: party 1 gave up request `rid`."""
        self._peer_meta.pop(rid, None)
        self.queue.pop(rid, None)  # paired but not batched: it cannot run any more
        job = self.jobs.get(rid)
        if job is not None and not job.batched and not job.future.done():
            job.future.set_exception(
                ApiError("peer_timeout", f"the peer replica gave up on request {rid!r}")
            )

    def rejected(self, rid: str, reject: Reject) -> None:
        """The peer failed request `rid`: so does this replica."""
        job = self.jobs.get(rid)
        if job is not None and not job.future.done():
            job.future.set_exception(ApiError(reject.code, reject.message))

    def expire(self) -> None:
        cutoff = time.monotonic() - 2 * self.timeout
        while self._peer_meta:
            rid, (_, seen) = next(iter(self._peer_meta.items()))
            if seen >= cutoff:
                break
            del self._peer_meta[rid]

    def disconnected(self, reason: str) -> None:
        """The stream is gone: requests that wait for their pair cannot complete."""
        for job in list(self.jobs.values()):
            if not job.batched and not job.future.done():
                job.future.set_exception(ApiError("not_ready", f"lost the peer replica: {reason}"))
        self.queue.clear()
        self._peer_meta.clear()

    def _try_pair(self, rid: str) -> None:
        job, seen = self.jobs.get(rid), self._peer_meta.get(rid)
        if job is None or seen is None or job.batched:
            return
        del self._peer_meta[rid]
        theirs = seen[0]
        if theirs != job.arrived:
            shape, output, want = (
                (theirs.shape, theirs.output, theirs.want) if theirs else (None, None, None)
            )
            message = (
                f"replica 0 got a share of shape {list(job.x.shape)} for {job.output!r} "
                f"(version {job.want!r}), replica 1 one of shape {shape} for "
                f"{output!r} (version {want!r})"
            )
            self._send(rid, Reject("share_mismatch", message))
            job.future.set_exception(ApiError("share_mismatch", message))
            return
        self.queue[rid] = job
        self.wake.set()


def parse_arrived(payload: Any) -> Arrived | None:
    """An ARRIVED payload, or None when it is malformed (it then pairs with nothing)."""
    try:
        return Arrived.from_payload(payload)
    except BadMessage:
        return None
