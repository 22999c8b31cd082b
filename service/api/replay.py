"""The replay guard: a request id is accepted once within a window (409 `replayed_request`).

A replayed id would ask the replicas to run again on the same shares; every run takes fresh
dealer material whatever its id, so this guard is about clients' ids, not randomness.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from service.api.errors import ApiError


class ReplayGuard:
    """Request ids this replica has accepted; a second use within the window is refused (409).

    Client request ids carry no time, so the guard times them itself: it remembers each id for
    `window_s` seconds after claiming it, and at most `capacity` ids (when more arrive within a
    window, the oldest go early). Memory is bounded by min(capacity, claim rate x window). An id
    forgotten can run again; that reuses no randomness (every run has a fresh run id, so fresh
    dealer material), see docs/security.md, section 4.3.
    """

    def __init__(
        self,
        capacity: int = 1_000_000,
        window_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()  # id -> claim time, oldest first
        self._capacity, self._window, self._clock = capacity, window_s, clock

    def claim(self, request_id: str) -> None:
        now = self._clock()
        while self._seen:
            rid, claimed = next(iter(self._seen.items()))
            if claimed > now - self._window:
                break
            del self._seen[rid]
        if request_id in self._seen:
            raise ApiError("replayed_request", f"request id {request_id!r} was already used")
        self._seen[request_id] = now
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)
