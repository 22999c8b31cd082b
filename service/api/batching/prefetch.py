"""Dealer material fetched ahead of time (the offline phase), so a request's run starts at once.

Party 0 keeps up to `depth` entries for the run it expects most: one image, label output, the
serving model version. Under load it also keeps entries "ahead" for the batch size that load
produces (`ahead`): a power of two no larger than the images queued when the last batch formed;
a batch of at least that many images then runs that many on the prefetched material, and
fetching happens while the previous batch runs instead of between runs. It names each entry
with a fresh id and tells party 1 (PREFETCH, with the batch size), and both replicas fetch and
expand their material for that id in the background. A batch that fits takes the oldest entry
that is ready on party 0: its id travels in BATCH as the dealer request id, so both parties use
the same randomness (party 1 waits for its own fetch if it is still running). An entry is used
once, then dropped; a lost peer connection drops them all. Party 1 fetches on demand an entry it
never heard of (after a restart): the dealer serves every (id, party) once either way, so no
randomness is ever used twice.

Memory is bounded on both sides (an entry of 16 images is about 5 MB, expanded):
- Count: at most `max_entries` unclaimed entries (`--prefetch-max-entries`). Party 0 never
  asks for more (`room`); party 1 drops its oldest beyond the bound, whatever party 0 says.
- Version and load: party 0 drops entries of another model version than the one it serves
  and of another batch size than the load's, and names every entry it drops to party 1
  (DISCARD), which drops them too. Party 1 also drops, by itself, entries of a version it no
  longer holds.
- Age: party 0 drops (and names) entries older than `max_age_s` (`--prefetch-max-age`);
  party 1 drops its own after `max_age_s` plus the peer timeout, so a party 0 that never
  says DISCARD still cannot make it hold material for long.
An entry promised to a run (party 0: `claim`; party 1: `reserve`, when BATCH names it) is out
of reach of every drop until the run takes it, so the two replicas never disagree about an
entry a run uses: BATCH travels before any later DISCARD or PREFETCH on the one stream.
What prefetching reveals: that a run of one image will come, which everyone may assume, and
under load the batch sizes party 0 expects, which the batches themselves show anyway.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from service.mpc.dealer import Randomness
from service.store import LoadedModel

Fetch = Callable[[str, LoadedModel, int, str], Randomness]
PREFETCH_BATCH, PREFETCH_OUTPUT = 1, "label"  # the run kept ready
MAX_ENTRIES, MAX_AGE_S = 16, 120.0  # the defaults of the settings that bound the pool


@dataclass
class Entry:
    material_id: str
    version: str
    batch: int
    output: str
    future: Future[Randomness]
    added: float  # the pool's clock when it was added

    @property
    def ready(self) -> bool:
        """Fetched, successfully."""
        return self.future.done() and not self.future.exception()

    def fits(self, model: LoadedModel, batch: int, output: str) -> bool:
        return (self.version, self.batch, self.output) == (model.version, batch, output)


class MaterialPool:
    """Prefetched dealer material by id; one background thread fetches, in order.

    `on_drop` hears the ids of the unclaimed entries dropped unused (the load, the model or
    the bounds moved on); entries used by a run, or dropped with the connection or because the
    dealer restarted, are not reported (the peer does the same by itself).
    """

    def __init__(
        self,
        fetch: Fetch,
        depth: int,
        on_drop: Callable[[list[str]], None] = lambda ids: None,
        *,
        max_entries: int = MAX_ENTRIES,
        max_age_s: float = MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_age_s <= 0:
            raise ValueError("max_entries must be >= 1 and max_age_s > 0")
        self.depth, self.max_entries, self.max_age_s = depth, max_entries, max_age_s
        self._fetch, self._clock = fetch, clock
        self._on_drop = on_drop
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # oldest first
        self._claimed: dict[str, Entry] = {}  # promised to a run, not yet taken
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="prefetch")

    def add(self, material_id: str, model: LoadedModel, batch: int, output: str) -> None:
        """Fetch an entry in the background; beyond `max_entries`, the oldest are dropped."""
        future = self._executor.submit(self._fetch, material_id, model, batch, output)
        with self._lock:
            old = self._entries.pop(material_id, None)  # an id named twice: the newest counts
            self._entries[material_id] = Entry(
                material_id, model.version, batch, output, future, self._clock()
            )
            over = set(
                itertools.islice(self._entries, max(0, len(self._entries) - self.max_entries))
            )
        if old is not None:
            old.future.cancel()
        self.drop(lambda e: e.material_id in over)

    def room(self) -> int:
        """How many entries party 0 may still add within `max_entries`."""
        with self._lock:
            return max(0, self.max_entries - len(self._entries))

    def missing(self, model: LoadedModel) -> int:
        """How many entries for the usual run (one image, label) party 0 should add now.

        Entries of other model versions are dropped: the serving version moved on.
        """
        self.drop(lambda e: e.version != model.version)
        with self._lock:
            have = sum(
                e.fits(model, PREFETCH_BATCH, PREFETCH_OUTPUT) for e in self._entries.values()
            )
        return min(max(0, self.depth - have), self.room())

    def ahead(self, model: LoadedModel, batch: int, count: int) -> int:
        """How many entries of `batch` images party 0 should add to hold `count` of them.

        Entries of other model versions, and of other sizes than 1 and `batch`, are dropped:
        the model or the load changed.
        """
        self.drop(lambda e: e.version != model.version or e.batch not in (PREFETCH_BATCH, batch))
        with self._lock:
            have = sum(e.fits(model, batch, PREFETCH_OUTPUT) for e in self._entries.values())
        return min(max(0, count - have), self.room())

    def drop(self, stale: Callable[[Entry], bool]) -> list[str]:
        """Cancel and forget the unclaimed entries `stale` picks; report their ids."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if stale(e)]
            for key in keys:
                self._entries.pop(key).future.cancel()
        if keys:
            self._on_drop(keys)
        return keys

    def expire(self, older_than_s: float | None = None) -> list[str]:
        """Drop the unclaimed entries added more than `older_than_s` (else `max_age_s`) ago."""
        cutoff = self._clock() - (self.max_age_s if older_than_s is None else older_than_s)
        return self.drop(lambda e: e.added < cutoff)

    def _fresh(self, e: Entry) -> bool:
        return e.ready and self._clock() - e.added < self.max_age_s

    def ready_batch(self, model: LoadedModel, most: int, output: str) -> int | None:
        """The largest batch size, up to `most` images, with an entry ready for this run."""
        with self._lock:
            sizes = [
                e.batch
                for e in self._entries.values()
                if e.version == model.version and e.output == output and e.batch <= most
                and self._fresh(e)
            ]  # fmt: skip
        return max(sizes, default=None)

    def claim(self, model: LoadedModel, batch: int, output: str) -> str | None:
        """Party 0: the id of the oldest entry fetched successfully for this run (and younger
        than `max_age_s`), if any, promised to that run at once, so two runs are never given
        the same material."""
        with self._lock:
            for e in self._entries.values():
                if e.fits(model, batch, output) and self._fresh(e):
                    self._claimed[e.material_id] = self._entries.pop(e.material_id)
                    return e.material_id
        return None

    def reserve(self, material_id: str) -> None:
        """Party 1: BATCH named this entry; keep it from every drop until its run takes it."""
        with self._lock:
            entry = self._entries.pop(material_id, None)
            if entry is not None:
                self._claimed[material_id] = entry

    def take(self, material_id: str) -> Entry | None:
        """The entry a run uses (removed: each entry serves one run)."""
        with self._lock:
            return self._claimed.pop(material_id, None) or self._entries.pop(material_id, None)

    def forget_other_dealers(self, dealer: bytes) -> None:
        """Drop fetched entries made by another dealer instance than `dealer` (it restarted)."""
        with self._lock:
            for entries in (self._entries, self._claimed):
                for key in [
                    k for k, e in entries.items() if e.ready and e.future.result().dealer != dealer
                ]:
                    del entries[key]

    def clear(self) -> None:
        """Forget every entry (the peer connection is gone, so are its announcements)."""
        with self._lock:
            entries = [*self._entries.values(), *self._claimed.values()]
            self._entries, self._claimed = OrderedDict(), {}
        for e in entries:
            e.future.cancel()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def claimed(self) -> int:
        """Entries promised to a run and not yet taken."""
        with self._lock:
            return len(self._claimed)

    def close(self) -> None:
        self.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
