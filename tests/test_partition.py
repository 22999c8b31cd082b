"""Partitions: sizes, disjointness, coverage, label skew, determinism, spec parsing."""

from __future__ import annotations

import numpy as np
import pytest

from training.partition import PartitionSpec, dirichlet, iid, parse_partition, shards

# Class counts of real MNIST train, scaled down 10x (not multiples of the shard size).
MNIST_COUNTS = (592, 674, 596, 613, 584, 542, 592, 627, 585, 595)


def mnist_like_labels(seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(MNIST_COUNTS)])
    return np.random.default_rng(seed).permutation(labels)


def check_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.shape[0] == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


def test_iid_sizes_cover_and_near_uniform() -> None:
    labels = mnist_like_labels()
    parts = iid(labels, 20, seed=1)
    assert len(parts) == 20
    check_cover(parts, labels.shape[0])
    sizes = [p.shape[0] for p in parts]
    assert max(sizes) - min(sizes) <= 1
    global_freq = np.bincount(labels, minlength=10) / labels.shape[0]
    for p in parts:
        freq = np.bincount(labels[p], minlength=10) / p.shape[0]
        assert np.abs(freq - global_freq).max() < 0.08


def test_shards_two_labels_when_classes_align() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 300))
    parts = shards(labels, 10, seed=3)
    check_cover(parts, labels.shape[0])
    assert all(p.shape[0] == 300 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_shards_mnist_counts_mostly_two_labels() -> None:
    labels = mnist_like_labels()
    parts = shards(labels, 100, seed=0)
    check_cover(parts, labels.shape[0])
    n_labels = np.array([len(np.unique(labels[p])) for p in parts])
    assert n_labels.max() <= 4  # a shard may straddle a class boundary
    assert n_labels.mean() < 2.5
    sizes = [p.shape[0] for p in parts]
    assert max(sizes) - min(sizes) <= 2


@pytest.mark.parametrize("n_clients", [5, 50])
def test_dirichlet_small_alpha_skewed_and_min_size(n_clients: int) -> None:
    labels = mnist_like_labels()
    parts = dirichlet(labels, n_clients, alpha=0.1, seed=2, min_size=10)
    check_cover(parts, labels.shape[0])
    assert min(p.shape[0] for p in parts) >= 10
    top = [np.bincount(labels[p], minlength=10).max() / p.shape[0] for p in parts]
    assert np.mean(top) > 0.3  # IID would give ~0.11
    wide = dirichlet(labels, n_clients, alpha=100.0, seed=2)
    top_wide = [np.bincount(labels[p], minlength=10).max() / p.shape[0] for p in wide]
    assert np.mean(top_wide) < np.mean(top)


def test_dirichlet_min_size_forced_by_redistribution() -> None:
    labels = mnist_like_labels()[:600]
    parts = dirichlet(labels, 50, alpha=0.01, seed=0, min_size=12)
    check_cover(parts, 600)
    assert min(p.shape[0] for p in parts) >= 12


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "shards"])
def test_determinism_per_seed(spec: str) -> None:
    labels = mnist_like_labels()
    part = parse_partition(spec)
    a, b, c = part(labels, 10, 7), part(labels, 10, 7), part(labels, 10, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_parse_partition_forms() -> None:
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition("shards") == PartitionSpec("shards")
    assert parse_partition("dirichlet:0.3") == PartitionSpec("dirichlet", 0.3)
    assert str(parse_partition("dirichlet:0.3")) == "dirichlet:0.3"


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "noniid",
        "dirichlet",
        "dirichlet:",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:x",
        "dirichlet:nan",
        "shards:3",
    ],
)
def test_parse_partition_bad_spec(spec: str) -> None:
    with pytest.raises(ValueError, match=r"iid.*dirichlet:ALPHA.*shards"):
        parse_partition(spec)


def test_too_many_clients() -> None:
    with pytest.raises(ValueError):
        iid(np.zeros(5, dtype=np.int64), 6, 0)
    with pytest.raises(ValueError):
        dirichlet(np.zeros(50, dtype=np.int64), 10, 1.0, 0, min_size=10)
