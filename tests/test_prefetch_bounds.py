"""Prefetched dealer material is bounded on both replicas (service/api/batching/).

In one process, with a fake clock and a fetch that returns at once: the pool holds at most
`max_entries` unclaimed entries (party 1 drops its oldest, party 0 never asks for more), drops
entries by age, and an entry promised to a run is out of reach of every drop. A party-1
`Batcher` fed PREFETCH, DISCARD and BATCH frames drops what party 0 names, what aged (after the
peer timeout's grace) and what is of a version it no longer holds; a party-0 `Batcher` names
every entry it drops (DISCARD) before it announces new ones. Nothing here sleeps.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from service.api.batching import Batcher
from service.api.batching.prefetch import MaterialPool
from service.api.transport import wire


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _model(version: str):
    return SimpleNamespace(version=version, network=SimpleNamespace(input_shape=(1, 28, 28)))


V1, V2 = _model("v1"), _model("v2")


def _fetch(material_id, model, batch, output):
    return SimpleNamespace(dealer=b"d", material_id=material_id)


def _pool(clock, dropped=None, **kw) -> MaterialPool:
    sink = dropped if dropped is not None else []
    return MaterialPool(_fetch, kw.pop("depth", 4), on_drop=sink.extend, clock=clock, **kw)


def _ready(pool: MaterialPool) -> None:
    """Wait for the fetch thread to finish what was queued (it fetches in order)."""
    pool.add("sync", V1, 1, "label")
    pool.take("sync").future.result(5)


def test_the_pool_holds_at_most_max_entries_dropping_the_oldest():
    clock, dropped = Clock(), []
    pool = _pool(clock, dropped, max_entries=4)
    ids = [f"e{i}" for i in range(10)]
    for i, material_id in enumerate(ids):
        clock.now += 1
        pool.add(material_id, V1 if i % 2 else V2, 1 + i % 3, "label")
        assert len(pool) == min(i + 1, 4)
    assert dropped == ids[:6]  # the six oldest, reported (party 0 names them in DISCARD)
    assert [pool.take(i) is not None for i in ids] == [False] * 6 + [True] * 4
    pool.close()


def test_a_reserved_or_claimed_entry_escapes_every_drop_until_its_run_takes_it():
    clock, dropped = Clock(), []
    pool = _pool(clock, dropped, max_entries=2)
    pool.add("a", V1, 1, "label")
    _ready(pool)
    pool.reserve("a")  # party 1: BATCH named it
    pool.add("b", V1, 1, "label")
    pool.add("c", V1, 1, "label")
    pool.add("d", V1, 1, "label")  # beyond the bound: the oldest unreserved ("b") goes
    clock.now += 10_000
    pool.expire()
    pool.drop(lambda e: True)
    assert sorted(dropped) == ["b", "c", "d"] and len(pool) == 0 and pool.claimed == 1
    assert pool.take("a").future.result(5).material_id == "a" and pool.claimed == 0
    pool.close()


def test_party_0_asks_for_no_more_than_the_bound_and_never_offers_an_old_entry():
    clock = Clock()
    pool = _pool(clock, depth=8, max_entries=5)
    assert pool.missing(V1) == 5  # depth 8, but the bound is 5
    for i in range(3):
        pool.add(f"one{i}", V1, 1, "label")
    assert pool.ahead(V1, 16, 4) == 2  # room for two more
    pool.add("sixteen", V1, 16, "label")
    _ready(pool)
    assert pool.ready_batch(V1, 16, "label") == 16
    clock.now += pool.max_age_s  # as old as the bound: neither offered nor claimed
    assert pool.ready_batch(V1, 16, "label") is None and pool.claim(V1, 1, "label") is None
    assert pool.expire() == []  # dropped once older than the bound
    clock.now += 0.001
    assert sorted(pool.expire()) == ["one0", "one1", "one2", "sixteen"]
    pool.close()


def test_entries_age_out_at_max_age_only():
    clock, dropped = Clock(), []
    pool = _pool(clock, dropped, max_age_s=30.0)
    pool.add("old", V1, 1, "label")
    clock.now += 20
    pool.add("young", V1, 1, "label")
    clock.now += 10  # "old" is exactly 30 s old: still kept
    assert pool.expire() == [] and len(pool) == 2
    clock.now += 0.001
    assert pool.expire() == ["old"] and dropped == ["old"]
    assert pool.expire(5.0) == ["young"]  # a caller's own age bound
    pool.close()


@pytest.mark.parametrize(("max_entries", "max_age_s"), [(0, 10.0), (4, 0.0), (4, -1.0)])
def test_a_pool_without_bounds_is_refused(max_entries, max_age_s):
    with pytest.raises(ValueError, match="max_entries"):
        MaterialPool(_fetch, 4, max_entries=max_entries, max_age_s=max_age_s)


# -- the batchers ----------------------------------------------------------------------------


class Peer:
    def __init__(self, versions):
        self.sent: list[wire.Frame] = []
        self.peer_versions, self.connected = versions, True

    def send(self, frame: bytes) -> None:
        self.sent.append(wire.decode_frame(frame))


class Registry:
    def __init__(self, *models) -> None:
        self.models = {m.version: m for m in models}

    def get(self, version):
        return self.models.get(version)

    def versions(self):
        return list(self.models)

    def newest_common(self, theirs):
        common = [v for v in self.models if v in theirs]
        return self.models[common[-1]] if common else None


def _batcher(party, pool, registry, peer, timeout=5.0) -> Batcher:
    return Batcher(
        party,
        peer,
        registry,
        lambda run, x: None,
        SimpleNamespace(up=lambda slot: False),
        weights_opened=lambda model: True,
        pool=pool,
        max_batch=16,
        max_batches=1,
        timeout=timeout,
    )


def _frame(kind, rid="", **payload) -> wire.Frame:
    return wire.decode_frame(wire.encode_json(kind, rid, payload))


def test_party_1_drops_what_party_0_names_what_aged_and_versions_it_no_longer_holds():
    clock, dropped = Clock(), []
    pool = _pool(clock, dropped, max_entries=8, max_age_s=60.0)
    registry = Registry(V1, V2)
    b = _batcher(1, pool, registry, Peer(["v1", "v2"]), timeout=5.0)

    for i in range(20):  # a flood: only the newest 8 are kept
        b.on_control(_frame(wire.PREFETCH, f"p{i}", version="v1"))
    assert len(pool) == 8 and dropped == [f"p{i}" for i in range(12)]
    # PREFETCH that party 1 must not act on: unknown version, size out of range or not an int
    for bad in ({"version": "v9"}, {"version": "v1", "batch": 17}, {"version": "v1", "batch": 0},
                {"version": "v1", "batch": True}, {"version": "v1", "batch": "4"}):  # fmt: skip
        b.on_control(_frame(wire.PREFETCH, "bad", **bad))
    assert pool.take("bad") is None and len(pool) == 8

    b.on_control(_frame(wire.DISCARD, ids=["p12", "p13", "p99", 7]))  # named by party 0
    assert len(pool) == 6 and pool.take("p12") is None and pool.take("p13") is None
    b.on_control(_frame(wire.DISCARD, ids="p14"))  # malformed: ignored
    assert len(pool) == 6

    clock.now += 1
    b.on_control(_frame(wire.PREFETCH, "w0", version="v2", batch=4))
    # the registry drops v1 (two reloads later): v1 entries go at the next sweep
    del registry.models["v1"]
    b.sweep()
    assert len(pool) == 1 and pool.take("w0") is not None
    registry.models["v1"] = V1

    # age: party 1 keeps its entries for max_age plus the peer timeout (party 0 drops first)
    b.on_control(_frame(wire.PREFETCH, "x", version="v1"))
    clock.now += 60.0 + 5.0
    b.sweep()
    assert len(pool) == 1
    clock.now += 0.01
    b.sweep()
    assert len(pool) == 0
    pool.close()


def test_party_1_keeps_the_entry_a_batch_named_through_later_discards():
    clock = Clock()
    pool = _pool(clock, max_entries=4)
    b = _batcher(1, pool, Registry(V1), Peer(["v1"]))

    async def scenario():
        b.on_control(_frame(wire.PREFETCH, "m", version="v1"))
        # BATCH names "m" (for a request party 1 never got: zeros), then party 0 drops more
        b.on_control(
            _frame(wire.BATCH, "batch", version="v1", output="label", requests=[["r", 1]],
                   open_weights=True, material="m", slot=0, lane=False)
        )  # fmt: skip
        b.on_control(_frame(wire.DISCARD, ids=["m"]))
        clock.now += 10_000
        b.sweep()
        return pool.take("m")

    entry = asyncio.run(scenario())
    assert entry is not None and entry.material_id == "m"
    pool.close()


def test_a_malformed_batch_reserves_nothing_so_its_entry_stays_bounded():
    """A BATCH party 1 refuses as malformed names an entry: it must stay within every drop
    (a lying party 0 could otherwise pin entries beyond the pool's bound until disconnect)."""
    clock = Clock()
    pool = _pool(clock, max_entries=4)
    b = _batcher(1, pool, Registry(V1), Peer(["v1"]))

    async def scenario():
        b.on_control(_frame(wire.PREFETCH, "m", version="v1"))
        b.on_control(
            _frame(wire.BATCH, "batch", version="v1", output="label", requests="not a list",
                   open_weights=True, material="m", slot=0, lane=False)
        )  # fmt: skip
        await asyncio.sleep(0)  # the refusal runs
        return pool.claimed

    assert asyncio.run(scenario()) == 0
    b.on_control(_frame(wire.DISCARD, ids=["m"]))
    assert pool.take("m") is None and len(pool) == 0
    pool.close()


def test_party_0_names_every_entry_it_drops_before_announcing_new_ones():
    clock = Clock()
    peer = Peer(["v1", "v2"])
    registry = Registry(V1)
    pool = MaterialPool(_fetch, 2, clock=clock, max_entries=4)
    b = _batcher(0, pool, registry, peer)
    pool._on_drop = b.discarded  # as the replica wires it
    b.refill()
    first = [f.request_id for f in peer.sent if f.kind == wire.PREFETCH]
    assert len(first) == 2 and all(f.payload == {"version": "v1"} for f in peer.sent)
    registry.models["v2"] = V2  # a new version both hold: v1's entries are dropped and named
    peer.sent.clear()
    b.refill()
    kinds = [f.kind for f in peer.sent]
    assert kinds == [wire.DISCARD, wire.PREFETCH, wire.PREFETCH]
    assert sorted(peer.sent[0].payload["ids"]) == sorted(first)
    assert all(f.payload == {"version": "v2"} for f in peer.sent[1:])
    peer.sent.clear()
    clock.now += pool.max_age_s + 1  # aged: dropped and named by the sweep, refilled
    b.sweep()
    b.refill()
    assert [f.kind for f in peer.sent] == [wire.DISCARD, wire.PREFETCH, wire.PREFETCH]
    pool.close()
