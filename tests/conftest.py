"""Shared test helpers: run a protocol for both parties in-process against a fresh dealer."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from service.mpc.channel import NullChannel
from service.mpc.dealer import Dealer, PlanRecorder, deal_pair
from service.mpc.inprocess import TwoPartyResult, run_two_party
from service.mpc.party import Party
from service.mpc.ring import FixedPoint
from service.mpc.sharing import share

settings.register_profile("default", max_examples=40, deadline=None)
settings.load_profile("default")

FP = FixedPoint(16)
_ids = itertools.count()


def run_shared(
    fn: Callable[..., torch.Tensor],
    *secrets: torch.Tensor,
    fp: FixedPoint = FP,
    dealer: Dealer | None = None,
) -> TwoPartyResult:
    """Share each ring tensor in `secrets`, plan fn's randomness by a dry run, run both parties."""
    shares = [share(s) for s in secrets]
    recorder = PlanRecorder()
    fn(Party(0, NullChannel(), recorder, fp), *[s[0] for s in shares])  # type: ignore[arg-type]
    r0, r1 = deal_pair(dealer or Dealer(), f"test-{next(_ids)}", tuple(recorder.plan))
    result = run_two_party(lambda p: fn(p, *[s[p.index] for s in shares]), r0, r1, fp)
    assert r0.exhausted and r1.exhausted, "the protocol did not use all the randomness it planned"
    return result


def opened(result: TwoPartyResult) -> torch.Tensor:
    return result.out0 + result.out1


def opened_xor(result: TwoPartyResult) -> torch.Tensor:
    return result.out0 ^ result.out1


@pytest.fixture
def fp() -> FixedPoint:
    return FP


def reals(shape: Sequence[int], scale: float = 10.0) -> torch.Tensor:
    return torch.randn(tuple(shape), dtype=torch.float64) * scale


@pytest.fixture(scope="session")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The first 1000 MNIST test images (uint8, 28x28) and their labels."""
    data = np.load(Path(__file__).parent / "fixtures" / "mnist_test_1000.npz")
    return data["images"], data["labels"]


@pytest.fixture
def small_mnist(tmp_path: Path, monkeypatch) -> Path:
    """A cache in training.data's format with 800 training and 200 test images (the fixture's),
    set as PRIVDIGIT_DATA_DIR, so training runs for real on small data without the wheel."""
    data = np.load(Path(__file__).parent / "fixtures" / "mnist_test_1000.npz")
    images, labels = data["images"], data["labels"].astype(np.uint8)
    cache = tmp_path / "data"
    cache.mkdir()
    np.savez(
        cache / "mnist_uint8.npz",
        train_images=images[:800],
        train_labels=labels[:800],
        test_images=images[800:],
        test_labels=labels[800:],
    )
    monkeypatch.setenv("PRIVDIGIT_DATA_DIR", str(cache))
    return cache
