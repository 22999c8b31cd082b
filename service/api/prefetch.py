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
What prefetching reveals: that a run of one image will come, which everyone may assume, and
under load the batch sizes party 0 expects, which the batches themselves show anyway.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from service.mpc.dealer import Randomness
from service.store import LoadedModel

Fetch = Callable[[str, LoadedModel, int, str], Randomness]
PREFETCH_BATCH, PREFETCH_OUTPUT = 1, "label"  # the run kept ready


@dataclass
class Entry:
    material_id: str
    version: str
    batch: int
    output: str
    future: Future[Randomness]

    @property
    def ready(self) -> bool:
        """Fetched, successfully."""
        return self.future.done() and not self.future.exception()

    def fits(self, model: LoadedModel, batch: int, output: str) -> bool:
        return (self.version, self.batch, self.output) == (model.version, batch, output)


class MaterialPool:
    """Prefetched dealer material by id; one background thread fetches, in order."""

    def __init__(
        self, fetch: Fetch, depth: int, on_drop: Callable[[int], None] = lambda n: None
    ) -> None:
        self.depth = depth
        self._fetch = fetch
        self._on_drop = on_drop  # entries dropped unused (the load or the model changed)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._claimed: dict[str, Entry] = {}  # party 0: promised to a run, not yet taken
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="prefetch")

    def add(self, material_id: str, model: LoadedModel, batch: int, output: str) -> None:
        future = self._executor.submit(self._fetch, material_id, model, batch, output)
        with self._lock:
            self._entries[material_id] = Entry(material_id, model.version, batch, output, future)

    def missing(self, model: LoadedModel) -> int:
        """How many entries for the usual run (one image, label) party 0 should add now.

        Entries of other model versions are dropped: the serving version moved on.
        """
        self._drop_unused(lambda e: e.version != model.version)
        with self._lock:
            have = sum(
                e.fits(model, PREFETCH_BATCH, PREFETCH_OUTPUT) for e in self._entries.values()
            )
        return max(0, self.depth - have)

    def ahead(self, model: LoadedModel, batch: int, count: int) -> int:
        """How many entries of `batch` images party 0 should add to hold `count` of them.

        Entries of other sizes than 1 and `batch` are dropped: the load changed.
        """
        self._drop_unused(lambda e: e.batch not in (PREFETCH_BATCH, batch))
        with self._lock:
            have = sum(e.fits(model, batch, PREFETCH_OUTPUT) for e in self._entries.values())
        return max(0, count - have)

    def _drop_unused(self, stale: Callable[[Entry], bool]) -> None:
        """Cancel and forget the unclaimed entries `stale` picks; count them."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if stale(e)]
            for key in keys:
                self._entries.pop(key).future.cancel()
        if keys:
            self._on_drop(len(keys))

    def ready_batch(self, model: LoadedModel, most: int, output: str) -> int | None:
        """The largest batch size, up to `most` images, with an entry ready for this run."""
        with self._lock:
            sizes = [
                e.batch
                for e in self._entries.values()
                if e.version == model.version and e.output == output and e.batch <= most and e.ready
            ]
        return max(sizes, default=None)

    def claim(self, model: LoadedModel, batch: int, output: str) -> str | None:
        """Party 0: the id of the oldest entry fetched successfully for this run, if any,
        promised to that run at once, so two runs are never given the same material."""
        with self._lock:
            for e in self._entries.values():
                if e.fits(model, batch, output) and e.ready:
                    self._claimed[e.material_id] = self._entries.pop(e.material_id)
                    return e.material_id
        return None

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

    def close(self) -> None:
        self.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
