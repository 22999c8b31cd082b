"""Party 1 checks party 0's BATCH against its own client's request and its own policy.

A real replica 1 (the service, one process, scores disabled, no dealer) is driven by a fake
party 0 in this process: the real handshake (`PeerLink` dialling as party 0, with the peer
key the cluster hands the two replicas), then frames this test writes. A client
posts its share to replica 1; the fake party 0 waits for replica 1's ARRIVED and announces a
BATCH that lies about it: a scores run when the client asked a label (and scores are off),
another model version than the client named, more rows than it sent, a scores run of requests
replica 1 never got, a filler of a billion images, an unknown output, a malformed payload.
Replica 1 must run nothing (no run opened, no dealer material asked for), answer its client
with a clear error, abort party 0's run with the same message and count the refusal by reason.
The control is the honest BATCH: replica 1 accepts it and goes on to ask the (absent) dealer.
"""

# ruff: noqa: E501  (the case table keeps one case per line)

from __future__ import annotations

import asyncio
import contextlib
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from benchmarks import metric
from clients import privdigit
from service.api.transport import wire
from service.api.transport.peer import PeerAborted, PeerLink
from service.cluster import DEFAULT_MODEL, Cluster, free_ports
from service.mpc.dealer import new_run_id
from training.export import resplit

PEER_TIMEOUT = 5.0


def _wait(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def _metric(url: str, name: str) -> float:
    return metric(httpx.get(f"{url}/metrics", timeout=5).text, name)


class FakeParty0:
    """Party 0 that says what the test wants: the real handshake, then frames written by hand."""

    def __init__(self, url: str, secret: bytes, versions: list[str]) -> None:
        self.link = PeerLink(secret, lambda: versions, timeout=PEER_TIMEOUT)
        self.frames: queue.Queue[wire.Frame] = queue.Queue()
        self.link.on_control = self.frames.put
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.dialler = asyncio.run_coroutine_threadsafe(self.link.dial_forever(url), self.loop)

    def send(self, kind: int, rid: str, payload: dict[str, Any]) -> None:
        self.link.send(wire.encode_json(kind, rid, payload))

    def arrived(self, rid: str) -> dict[str, Any]:
        """Replica 1's ARRIVED for `rid` (other control frames are skipped)."""
        deadline = time.monotonic() + 30
        while True:
            frame = self.frames.get(timeout=max(0.1, deadline - time.monotonic()))
            if frame.kind == wire.ARRIVED and frame.request_id == rid:
                return frame.payload or {}

    def refusal(self, batch_id: str) -> PeerAborted:
        """What replica 1 tells this batch's run on the peer stream (it must abort)."""
        ch = self.link.channel(batch_id)
        try:
            with pytest.raises(PeerAborted) as info:
                ch.exchange([torch.zeros(1, dtype=torch.int64)])
        finally:
            ch.close(False)
        return info.value

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._cancel_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def party1(tmp_path_factory):
    """Replica 1 alone, holding two versions of the model (a re-split), scores disabled."""
    root = tmp_path_factory.mktemp("lying-party0")
    model = root / "model"
    shutil.copytree(DEFAULT_MODEL, model)
    c = Cluster(
        model=model,
        ports=free_ports(3),  # nothing listens on the dealer's port
        log_dir=root / "logs",
        replica_args=("--peer-timeout", str(PEER_TIMEOUT), "--reload-poll", "0.2"),
    )
    c.prepare()
    url = c.replica_urls[1]
    c.start_process("replica1")
    try:
        old = _wait(lambda: (r := _get(f"{url}/v1/ready")) and r.json()["model_version"], "start")
        new = resplit(model)["model_version"]
        _wait(lambda: _get(f"{url}/v1/ready").json()["model_version"] == new, "the reload")
        fake = FakeParty0(
            f"ws://127.0.0.1:{c.ports[1]}/v1/peer",
            c.key("replica-0", "peer.key"),
            [old, new, "comparison=lut"],
        )
        try:
            _wait(lambda: _get(f"{url}/v1/ready").status_code == 200, "the fake party 0")
            yield c, fake, old, new
        finally:
            fake.close()
    finally:
        c.stop()


def _share(n: int) -> dict[str, Any]:
    x = np.random.default_rng().random((n, 1, 28, 28))
    _, s1 = privdigit.share_image(privdigit.encode_fixed(x, 16))
    return privdigit.encode_tensor(s1)


def _rid() -> str:
    return new_run_id()


# A case: the client's request to replica 1 (None: replica 1 never gets one), how party 0 lies
# in BATCH given the honest announcement, and the refusal: metric reason, client error code.
# fmt: off
CASES = [
    pytest.param({"output": "label"}, lambda a, o, n: {**a, "output": "scores"}, "scores_disabled", "peer_error", id="scores-for-a-label-request"),
    pytest.param(None, lambda a, o, n: {**a, "output": "scores"}, "scores_disabled", None, id="scores-of-requests-it-never-got"),
    pytest.param({"model_version": "old"}, lambda a, o, n: {**a, "version": n}, "version", "peer_error", id="another-version-than-the-client-named"),
    pytest.param({"images": 1}, lambda a, o, n: {**a, "requests": [[a["requests"][0][0], 2]]}, "rows", "peer_error", id="more-rows-than-the-client-sent"),
    pytest.param(None, lambda a, o, n: {**a, "requests": [[_rid(), 10**9]]}, "rows", None, id="a-billion-zero-rows"),
    pytest.param({}, lambda a, o, n: {**a, "requests": a["requests"] * 2}, "rows", "peer_error", id="one-request-twice"),
    pytest.param({}, lambda a, o, n: {**a, "output": "logits"}, "output", "peer_error", id="unknown-output"),
    pytest.param(None, lambda a, o, n: {**a, "requests": "all of them"}, "malformed", None, id="malformed"),
    pytest.param({}, lambda a, o, n: {**a, "version": "v-nobody-has"}, "unknown_version", "model_version_mismatch", id="a-version-it-does-not-hold"),
]
# fmt: on


def _post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", json=body, timeout=60)


def _announce(fake: FakeParty0, url: str, ask: dict[str, Any] | None, lie, versions):
    """Post the client's share (if any) to replica 1, wait for its ARRIVED, send BATCH as
    `lie` makes it; return (client response or None, what party 0's run was told, batch id)."""
    old, new = versions
    rid, batch_id = _rid(), _rid()
    with ThreadPoolExecutor(1) as ex:
        answer, version = None, new
        if ask is not None:
            body = {"request_id": rid, "input": _share(ask.get("images", 1))}
            body.update({k: v for k, v in ask.items() if k != "images"})
            if body.get("model_version") == "old":
                body["model_version"] = version = old
            answer = ex.submit(_post, url, body)
            fake.arrived(rid)
        honest = {
            "version": version,
            "output": "label",
            "requests": [[rid, 1]],
            "open_weights": True,
            "material": batch_id,
            "slot": 0,
            "lane": False,
        }
        fake.send(wire.BATCH, batch_id, lie(honest, old, new))
        told = fake.refusal(batch_id)
        return (answer.result(60) if answer else None), told


@pytest.mark.parametrize(("ask", "lie", "reason", "code"), CASES)
def test_party1_refuses_a_batch_that_is_not_what_its_client_asked(party1, ask, lie, reason, code):
    c, fake, old, new = party1
    url = c.replica_urls[1]
    counter = f'privdigit_batches_refused_total{{reason="{reason}"}}'
    before = {
        m: _metric(url, m)
        for m in (counter, "privdigit_runs_total", 'privdigit_prefetch_total{result="miss"}')
    }
    answer, told = _announce(fake, url, ask, lie, (old, new))
    # party 0's run is aborted with replica 1's reason
    assert "replica 1 refused batch" in str(told), told
    assert told.code == (code or "peer_error")
    # replica 1's client gets a clear error naming the problem, never a share
    if answer is not None:
        assert answer.status_code in (409, 502), answer.text
        error = answer.json()["error"]
        assert error["code"] == code and "replica 1 refused batch" in error["message"], error
    # counted by reason, and nothing ran: no run opened, no dealer material asked for
    after = {m: _metric(url, m) for m in before}
    assert after[counter] - before[counter] == 1
    assert after["privdigit_runs_total"] == before["privdigit_runs_total"]
    miss = 'privdigit_prefetch_total{result="miss"}'
    assert after[miss] == before[miss]
    assert _get(f"{url}/v1/ready").status_code == 200  # the stream is still up


def test_party1_accepts_the_honest_batch(party1):
    """The control: the same request and an honest BATCH pass the checks; replica 1 goes on to
    fetch the run's dealer material (no dealer runs here, so its client gets 503)."""
    c, fake, old, new = party1
    url = c.replica_urls[1]
    refused = _metric(url, "privdigit_batches_refused_total")
    miss = 'privdigit_prefetch_total{result="miss"}'
    misses = _metric(url, miss)
    answer, told = _announce(fake, url, {"model_version": "old"}, lambda a, o, n: a, (old, new))
    assert told.code == "dealer_unavailable", told
    assert answer is not None and answer.json()["error"]["code"] == "dealer_unavailable"
    assert _metric(url, "privdigit_batches_refused_total") == refused
    assert _metric(url, miss) == misses + 1


def test_party1_bounds_and_drops_prefetched_entries_party0_names(party1):
    """A party 0 that floods PREFETCH cannot make replica 1 hold more than its bound (default
    16 entries), and a DISCARD drops the entries it names."""
    c, fake, _, new = party1
    url = c.replica_urls[1]
    gauge = "privdigit_prefetch_entries"
    ids = [_rid() for _ in range(200)]
    for material_id in ids:
        fake.send(wire.PREFETCH, material_id, {"version": new})
    # a BATCH after the flood: once replica 1 refuses it, it has handled every PREFETCH before
    batch_id = _rid()
    fake.send(wire.BATCH, batch_id, {"output": "scores"})
    fake.refusal(batch_id)
    held = _metric(url, gauge)
    assert 1 <= held <= 16
    fake.send(wire.DISCARD, "", {"ids": ids})
    _wait(lambda: _metric(url, gauge) == 0, "the DISCARD")
