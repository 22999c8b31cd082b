"""Party 0's batch loop survives a queue that empties while it waits for a free slot.

Seen on the netns rig (`benchmarks.wan`, hybrid at 40 ms): under load, paired requests queued
behind a slow run time out and leave the queue while the loop waits for the slot; the loop
then took a batch from an empty queue, died (StopIteration), and party 0 never announced a batch
again: every later request failed with 504 until a restart. In one process, no network.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from service.api.batching.prefetch import MaterialPool
from service.api.errors import ApiError
from service.api.transport import wire
from tests.test_prefetch_bounds import V1, Clock, Peer, Registry, _batcher, _fetch, _frame

META = {"shape": [1, 1, 28, 28], "output": "label", "want": None}


async def _scenario() -> list[str]:
    peer = Peer(["v1"])
    pool = MaterialPool(_fetch, 0, clock=Clock())
    b = _batcher(0, pool, Registry(V1), peer, timeout=0.5)
    b.start()
    x = torch.zeros(1, 1, 28, 28, dtype=torch.int64)
    try:
        slot = await b.scheduler._free_slots.get()  # a long run holds the only slot
        b.on_control(_frame(wire.ARRIVED, "early", **META))
        with pytest.raises(ApiError) as info:  # paired and queued, then timed out in the queue
            await b.submit("early", x, "label", None)
        assert info.value.code == "peer_timeout"
        b.scheduler._free_slots.put_nowait(slot)  # the long run ends
        b.on_control(_frame(wire.ARRIVED, "later", **META))
        later = asyncio.ensure_future(b.submit("later", x, "label", None))
        deadline = time.monotonic() + 30
        while not any(f.kind == wire.BATCH for f in peer.sent):
            assert time.monotonic() < deadline, "party 0 never announced the next batch"
            await asyncio.sleep(0.01)
        later.cancel()
        return [r[0] for f in peer.sent if f.kind == wire.BATCH for r in f.payload["requests"]]
    finally:
        await b.stop()
        pool.close()


def test_a_request_after_one_that_timed_out_in_the_queue_is_still_batched():
    assert asyncio.run(_scenario()) == ["later"]
