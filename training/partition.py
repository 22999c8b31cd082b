"""Seeded partitions of a label array into per-client index arrays.

Partitions are not secrets, so numpy's seeded ``default_rng`` is fine here. Every function
returns a list of ``n_clients`` disjoint int64 index arrays whose union is ``range(len(labels))``.

* :func:`iid`: shuffle, then cut into ``n_clients`` equal parts (sizes differ by at most 1).
* :func:`dirichlet`: per class, split its examples by proportions ``p ~ Dir(alpha)`` over the
  clients (Hsu et al. 2019); small ``alpha`` gives skewed label histograms.
* :func:`shards`: the FedAvg paper's pathological non-IID split (McMahan et al. 2017): sort by
  label, cut into ``n_clients * shards_per_client`` equal shards, deal each client
  ``shards_per_client`` random shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

Partitioner = Callable[[np.ndarray, int, int], list[np.ndarray]]

ACCEPTED_SPECS = '"iid", "dirichlet:ALPHA" (ALPHA a float > 0, e.g. "dirichlet:0.5") or "shards"'


def _check(labels: np.ndarray, n_clients: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if n_clients > arr.shape[0]:
        raise ValueError(f"cannot split {arr.shape[0]} examples among {n_clients} clients")
    return arr


def iid(labels: np.ndarray, n_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle all indices and cut them into ``n_clients`` parts of (almost) equal size."""
    arr = _check(labels, n_clients)
    perm = np.random.default_rng(seed).permutation(arr.shape[0])
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, n_clients)]


def _dirichlet_draw(
    labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    """One draw: per class, Dirichlet proportions over clients (capped at the mean size)."""
    n = labels.shape[0]
    cap = n / n_clients
    buckets: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    sizes = np.zeros(n_clients, dtype=np.int64)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        p = rng.dirichlet(np.full(n_clients, alpha))
        # Clients already at the mean size take no more (the usual balancing trick of
        # Yurochkin et al. 2019); keeps the min-size retry from looping forever.
        p = np.where(sizes < cap, p, 0.0)
        total = p.sum()
        p = np.full(n_clients, 1.0 / n_clients) if total <= 0 else p / total
        cuts = (np.cumsum(p) * idx.shape[0]).astype(np.int64)[:-1]
        for k, part in enumerate(np.split(idx, cuts)):
            buckets[k].append(part)
            sizes[k] += part.shape[0]
    return buckets


def dirichlet(
    labels: np.ndarray, n_clients: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Label-skewed split: class ``c``'s examples go to clients in proportions ``Dir(alpha)``.

    Redraws up to 20 times until every client has ``>= min_size`` examples; if that still fails,
    moves random examples from the largest clients to the small ones.
    """
    arr = _check(labels, n_clients)
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if n_clients * min_size > arr.shape[0]:
        raise ValueError(
            f"min_size={min_size} x {n_clients} clients exceeds {arr.shape[0]} examples"
        )
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    for _ in range(20):
        buckets = _dirichlet_draw(arr, n_clients, alpha, rng)
        parts = [np.concatenate(b).astype(np.int64) for b in buckets]
        if min(p.shape[0] for p in parts) >= min_size:
            break
    else:
        parts = _redistribute(parts, min_size, rng)
    return [np.sort(p) for p in parts]


def _redistribute(
    parts: list[np.ndarray], min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Top up clients below ``min_size`` with random examples taken from the largest client."""
    parts = [rng.permutation(p) for p in parts]
    while True:
        sizes = np.array([p.shape[0] for p in parts])
        small = int(np.argmin(sizes))
        need = min_size - int(sizes[small])
        if need <= 0:
            return parts
        big = int(np.argmax(sizes))
        take = min(need, int(sizes[big]) - min_size)
        parts[small] = np.concatenate([parts[small], parts[big][:take]])
        parts[big] = parts[big][take:]


def shards(
    labels: np.ndarray, n_clients: int, seed: int, shards_per_client: int = 2
) -> list[np.ndarray]:
    """FedAvg-paper shards: sort by label, cut into equal shards, deal random shards to clients.

    Note a shard can straddle a class boundary (MNIST class counts are not multiples of 300), so
    a client can hold up to ``2 * shards_per_client`` labels; most hold ``<= shards_per_client``.
    """
    arr = _check(labels, n_clients)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    n_shards = n_clients * shards_per_client
    if n_shards > arr.shape[0]:
        raise ValueError(f"cannot cut {arr.shape[0]} examples into {n_shards} shards")
    order = np.argsort(arr, kind="stable")
    pieces = np.array_split(order, n_shards)
    deal = np.random.default_rng(seed).permutation(n_shards).reshape(n_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])).astype(np.int64) for row in deal]


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition spec; call it as ``spec(labels, n_clients, seed)``."""

    kind: Literal["iid", "dirichlet", "shards"]
    alpha: float | None = None

    def __call__(self, labels: np.ndarray, n_clients: int, seed: int) -> list[np.ndarray]:
        if self.kind == "iid":
            return iid(labels, n_clients, seed)
        if self.kind == "dirichlet":
            assert self.alpha is not None
            return dirichlet(labels, n_clients, self.alpha, seed)
        return shards(labels, n_clients, seed)

    def __str__(self) -> str:
        return f"dirichlet:{self.alpha:g}" if self.kind == "dirichlet" else self.kind


def parse_partition(spec: str) -> PartitionSpec:
    """Parse ``"iid"``, ``"dirichlet:ALPHA"`` (ALPHA > 0) or ``"shards"``."""
    text = spec.strip().lower() if isinstance(spec, str) else ""
    if text in ("iid", "shards"):
        return PartitionSpec(text)  # type: ignore[arg-type]
    if text.startswith("dirichlet:"):
        raw = text.split(":", 1)[1]
        try:
            alpha = float(raw)
        except ValueError:
            alpha = float("nan")
        if np.isfinite(alpha) and alpha > 0:
            return PartitionSpec("dirichlet", alpha)
        raise ValueError(f"bad dirichlet alpha {raw!r} in partition {spec!r}: use {ACCEPTED_SPECS}")
    raise ValueError(f"unknown partition {spec!r}: use {ACCEPTED_SPECS}")
