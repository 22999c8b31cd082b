"""Replica pairs: the URLs a client is given, and which pair serves the next request.

A pair is party 0's base URL, then party 1's. A client knows one pair or several; `Picker`
spreads requests over them in turn and puts a pair that failed (down, unready, overloaded)
last for `cooldown_s` seconds, so the next requests go to the others first.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from clients.privdigit.errors import REPLICAS_ENV, PrivDigitError

DEFAULT_REPLICAS: tuple[str, str] = ("http://127.0.0.1:8000", "http://127.0.0.1:8001")
PAIR_SEPARATOR = ";"  # between pairs in one string: "a0,a1;b0,b1"

Pair = tuple[str, str]
Replicas = str | Sequence[str] | Sequence[str | Sequence[str]] | None


def parse_pair(replicas: str | Sequence[str]) -> Pair:
    """The two base URLs (party 0 first) of "URL0,URL1" or a sequence of two URLs."""
    items = replicas.split(",") if isinstance(replicas, str) else list(replicas)
    urls = [str(u).strip().rstrip("/") for u in items if str(u).strip()]
    if len(urls) != 2:
        raise PrivDigitError(
            f"expected two replica URLs (party 0, party 1), got {len(urls)}: {urls!r}; "
            "e.g. http://127.0.0.1:8000,http://127.0.0.1:8001"
        )
    for u in urls:
        try:
            scheme = httpx.URL(u).scheme
        except httpx.InvalidURL:
            scheme = ""
        if scheme not in ("http", "https"):
            raise PrivDigitError(f"replica URL {u!r} must start with http:// or https://")
    if urls[0] == urls[1]:
        raise PrivDigitError(f"both replica URLs are {urls[0]}; give party 0 and party 1")
    return urls[0], urls[1]


def parse_pairs(replicas: Replicas) -> tuple[Pair, ...]:
    """Every pair, from the argument, $PRIVDIGIT_REPLICAS or the local default.

    `replicas` is "URL0,URL1" or two URLs (one pair), "A0,A1;B0,B1" or a sequence of pairs
    (each "URL0,URL1" or two URLs), or None.
    """
    if replicas is None:
        replicas = os.environ.get(REPLICAS_ENV) or ",".join(DEFAULT_REPLICAS)
    if isinstance(replicas, str):
        items: list[str | Sequence[str]] = [p for p in replicas.split(PAIR_SEPARATOR) if p.strip()]
    elif all(isinstance(u, str) and "," not in u for u in replicas):
        items = [[str(u) for u in replicas]]  # two URLs: one pair
    else:  # pairs, each "URL0,URL1" (or "A0,A1;B0,B1") or two URLs
        items = []
        for item in replicas:
            items += (
                [p for p in item.split(PAIR_SEPARATOR) if p.strip()]
                if isinstance(item, str)
                else [item]
            )
    pairs = tuple(parse_pair(p) for p in items)
    if not pairs:
        raise PrivDigitError(
            "no replica pair given; e.g. http://127.0.0.1:8000,http://127.0.0.1:8001"
        )
    urls = [u for pair in pairs for u in pair]
    if len(set(urls)) != len(urls):
        raise PrivDigitError(f"a replica URL appears in more than one pair: {urls!r}")
    return pairs


def read_pairs_file(path: str | os.PathLike[str]) -> list[str]:
    """The pairs listed in a file: one "URL0,URL1" per line; blank lines and # comments skipped."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PrivDigitError(f"cannot read the pairs file {path}: {exc}") from None
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    pairs = [line for line in lines if line]
    if not pairs:
        raise PrivDigitError(f"the pairs file {path} lists no pair (one URL0,URL1 per line)")
    return pairs


class Picker:
    """Which pair to try first: each in turn, pairs that failed lately last."""

    def __init__(self, n: int, cooldown_s: float = 5.0) -> None:
        self.n = n
        self.cooldown_s = cooldown_s
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._failed_at: list[float | None] = [None] * n

    def order(self) -> list[int]:
        """The pairs to try for the next request, in order."""
        with self._lock:
            start = next(self._turn) % self.n
            now = time.monotonic()
            cool = [t is None or now - t >= self.cooldown_s for t in self._failed_at]
        turn = [(start + i) % self.n for i in range(self.n)]
        return sorted(turn, key=lambda k: not cool[k])  # stable: healthy pairs first, in turn

    def failed(self, k: int) -> None:
        """Pair k failed: try the others first for a while."""
        with self._lock:
            self._failed_at[k] = time.monotonic()

    def served(self, k: int) -> None:
        """Pair k answered."""
        if self._failed_at[k] is not None:
            with self._lock:
                self._failed_at[k] = None
