"""Thin client for privdigit: classify a digit image on two replicas that each see only a share.

The client turns an image into an MNIST-style 28x28 array (`preprocess`), encodes it in fixed
point, splits it into two additive shares over Z_2^64 (`share_image`), posts one share to each
replica and reconstructs only the result: the label (`reconstruct_label`: from shares that add
up, mod the prime 65521, to 0 at the label and to random nonzero values elsewhere, or from XOR
shares of a one-hot vector, as the replicas' `sharing` says) or, when the operator enabled it,
the logits from additive shares (`reconstruct_scores`).

Wire format of a tensor (both directions):
    {"dtype": "int64", "shape": [...], "data": base64(little-endian int64 values, C order)}

Dependencies: numpy, httpx, Pillow and the standard library only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import os
import secrets
import ssl
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_REPLICAS",
    "AsyncPrivDigitClient",
    "BadResponse",
    "ImageError",
    "Prediction",
    "PrivDigitClient",
    "PrivDigitError",
    "ReplicaUnreachable",
    "ServiceError",
    "VersionMismatch",
    "decode_tensor",
    "encode_fixed",
    "encode_tensor",
    "preprocess",
    "reconstruct_label",
    "reconstruct_scores",
    "share_image",
]

DEFAULT_REPLICAS: tuple[str, str] = ("http://127.0.0.1:8000", "http://127.0.0.1:8001")
REPLICAS_ENV = "PRIVDIGIT_REPLICAS"
CLASSES = 10
LABEL_PRIME = 65521  # the "zero" sharing's modulus (the service's `ring.PRIME`)
LABEL_SHARINGS = ("zero", "xor")
SIDE = 28  # MNIST canvas
BOX = 20  # MNIST fits the digit's bounding box into 20x20 ...
CENTRE = 14.0  # ... and moves its centre of mass to pixel (14, 14)
MAX_SOURCE_SIDE = 1024  # larger images are reduced first (the result is 20 px anyway)
MIN_CONTRAST = 0.05  # ink at most this far from the background: the image is blank
START_HINT = (
    "is the cluster running? start it with `python -m service up`, or point --replicas / "
    f"{REPLICAS_ENV} at the two replicas"
)
USER_AGENT = "privdigit-client/0.1"


# -- errors ----------------------------------------------------------------------------------


class PrivDigitError(Exception):
    """Base class of every error this client raises on purpose."""


class ImageError(PrivDigitError):
    """An input that is not a usable digit image: unreadable file, bad array or blank image."""

    def __init__(self, reason: str, source: str | None = None) -> None:
        super().__init__(f"{source}: {reason}" if source else reason)
        self.reason = reason
        self.source = source


class ReplicaUnreachable(PrivDigitError):
    """A replica could not be reached (connection refused, DNS, TLS, timeout)."""

    def __init__(self, replica: str, reason: str) -> None:
        hint = START_HINT
        if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate" in reason.lower():
            hint = "pass the replicas' CA certificate with --cacert PATH (or verify=PATH)"
        super().__init__(f"replica {replica} is unreachable ({reason}); {hint}")
        self.replica = replica
        self.reason = reason


class VersionMismatch(PrivDigitError):
    """The two replicas disagree on the model (version or fixed point), or answer for another."""


class BadResponse(PrivDigitError):
    """A replica answered something that does not follow the protocol."""


class ServiceError(PrivDigitError):
    """A replica answered with an error status and a well-formed `{"error": {...}}` body."""

    def __init__(self, replica: str, status: int, code: str, message: str) -> None:
        super().__init__(f"replica {replica} answered {status} {code}: {message}")
        self.replica = replica
        self.status = status
        self.code = code
        self.message = message


# -- tensors on the wire ---------------------------------------------------------------------


def encode_tensor(arr: np.ndarray) -> dict[str, Any]:
    """The JSON form of an integer array: base64 of its little-endian int64 values, C order."""
    a = np.asarray(arr)
    if a.dtype == np.uint64:
        a = a.view(np.int64)
    elif not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"only integer arrays go on the wire, got dtype {a.dtype}")
    raw = np.ascontiguousarray(a, dtype="<i8").tobytes()
    return {
        "dtype": "int64",
        "shape": [int(d) for d in a.shape],
        "data": base64.b64encode(raw).decode("ascii"),
    }


def decode_tensor(obj: Any) -> np.ndarray:
    """The int64 array a JSON tensor holds; `BadResponse` unless it is exactly well-formed."""
    if not isinstance(obj, dict):
        raise BadResponse(f"a tensor must be a JSON object, got {type(obj).__name__}")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype != "int64":
        raise BadResponse(f"tensor dtype must be 'int64', got {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadResponse(f"tensor shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(data, str):
        raise BadResponse("tensor data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadResponse("tensor data is not valid standard base64") from None
    expected = 8 * math.prod(shape)
    if len(raw) != expected:
        raise BadResponse(f"tensor data holds {len(raw)} bytes; shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype="<i8").astype(np.int64).reshape(shape)


# -- fixed point and secret sharing ----------------------------------------------------------


def encode_fixed(x: np.ndarray, frac_bits: int) -> np.ndarray:
    """round(x * 2^frac_bits) as int64: real values as ring elements (half to even, like torch)."""
    xf = np.asarray(x, dtype=np.float64)
    if not np.isfinite(xf).all():
        raise ValueError("cannot encode NaN or infinite values")
    scaled = np.round(xf * float(2**frac_bits))
    if scaled.size and float(np.abs(scaled).max()) >= 2.0**62:
        raise ValueError(f"values too large for fixed point with {frac_bits} fractional bits")
    return scaled.astype(np.int64)


def _random_u64(n: int) -> np.ndarray:
    """n uniform 64-bit words from the operating system's CSPRNG."""
    return np.frombuffer(os.urandom(8 * n), dtype="<u8").astype(np.uint64)


def share_image(x_encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two int64 arrays, s0 uniform and s1 = x - s0 (mod 2^64), that add up to `x_encoded`."""
    x = np.asarray(x_encoded)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"share_image takes ring elements (int64), got dtype {x.dtype}")
    flat = np.ascontiguousarray(x, dtype=np.int64).reshape(-1).view(np.uint64)
    s0 = _random_u64(flat.size)
    s1 = flat - s0  # uint64 arithmetic on arrays wraps modulo 2^64 silently
    return s0.view(np.int64).reshape(x.shape), s1.view(np.int64).reshape(x.shape)


def _share_pair(s0: Any, s1: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both shares as 2-D int64 arrays of the same shape, or `BadResponse`."""
    a, b = np.asarray(s0), np.asarray(s1)
    if not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
        raise BadResponse("shares must be integer arrays")
    if a.shape != b.shape or a.ndim != 2:
        raise BadResponse(f"shares must be 2-D of the same shape, got {a.shape} and {b.shape}")
    return a.astype(np.int64), b.astype(np.int64)


def reconstruct_label(s0: np.ndarray, s1: np.ndarray, sharing: str = "zero") -> np.ndarray:
    """The label of each row, from the replicas' two shares.

    sharing "zero": (s0 + s1) mod LABEL_PRIME is 0 at exactly one place per row, the label (the
    other places are uniform on 1..p-1 and mean nothing); "xor": s0 XOR s1 is one-hot.
    """
    if sharing not in LABEL_SHARINGS:
        raise BadResponse(f"unknown label sharing {sharing!r}; known: {LABEL_SHARINGS}")
    a, b = _share_pair(s0, s1)
    if sharing == "zero":
        if ((a < 0) | (a >= LABEL_PRIME) | (b < 0) | (b >= LABEL_PRIME)).any():
            raise BadResponse(f"label shares must lie in [0, {LABEL_PRIME})")
        hot = (a + b) % LABEL_PRIME == 0
        binary = np.ones(len(a), dtype=bool)
    else:
        onehot = a ^ b
        hot = onehot == 1
        binary = ((onehot == 0) | (onehot == 1)).all(axis=1)
    bad = np.flatnonzero(~(binary & (hot.sum(axis=1) == 1)))
    if bad.size:
        raise BadResponse(
            f"row {int(bad[0])} of the reconstructed output names no single label: the "
            "replicas' shares do not belong together"
        )
    return hot.argmax(axis=1).astype(np.int64)


def reconstruct_scores(s0: np.ndarray, s1: np.ndarray, frac_bits: int) -> np.ndarray:
    """The logits: (s0 + s1) mod 2^64 read as signed fixed point with `frac_bits` bits, float64."""
    a, b = _share_pair(s0, s1)
    total = (a.view(np.uint64) + b.view(np.uint64)).view(np.int64)
    return total.astype(np.float64) / float(2**frac_bits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed stably."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# -- preprocessing ---------------------------------------------------------------------------


def _grey(rgb: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601, as Pillow's convert("L")) of an (..., 3) float array."""
    return rgb @ np.array([0.299, 0.587, 0.114])


def _from_pil(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Grey levels in [0, 1] and alpha in [0, 1] (None when opaque) of a Pillow image."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode.startswith("I") or img.mode == "F":
        scale = 65535.0 if img.mode.startswith("I;16") else None
        img = img.convert("F")
        img.thumbnail((MAX_SOURCE_SIDE, MAX_SOURCE_SIDE), Image.Resampling.BOX)
        arr = np.asarray(img, dtype=np.float64)
        if scale is None:
            top = float(arr.max()) if arr.size else 0.0
            scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
        return np.clip(arr / scale, 0.0, 1.0), None
    transparent = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    img = img.convert("RGBA" if transparent else "L")
    img.thumbnail((MAX_SOURCE_SIDE, MAX_SOURCE_SIDE), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float64) / 255.0
    if transparent:
        return _grey(arr[..., :3]), arr[..., 3]
    return arr, None


def _open(image: str | os.PathLike[str] | bytes | bytearray | memoryview) -> Image.Image:
    """The decoded Pillow image of a file path or of encoded bytes, or `ImageError`."""
    if isinstance(image, str | os.PathLike):
        source, path = str(image), Path(image)
        if not path.is_file():
            raise ImageError("no such file" if not path.exists() else "not a file", source)
        fp: Any = path
    else:
        source, fp = None, io.BytesIO(bytes(image))
    try:
        with warnings.catch_warnings():  # Pillow warns on odd files; the CLI prints one line
            warnings.simplefilter("ignore")
            img = Image.open(fp)
            img.load()
    except Image.DecompressionBombError:
        raise ImageError("the image is too large to decode safely", source) from None
    except UnidentifiedImageError:
        kind = "not an image file" if source else "the bytes are not an image"
        raise ImageError(f"{kind} (unknown format)", source) from None
    except Exception as exc:  # Pillow's decoders raise many types on malformed input
        kind = "not an image file" if source else "the bytes are not an image"
        detail = " ".join(str(exc).split())[:120]
        raise ImageError(f"{kind} ({detail})" if detail else kind, source) from None
    return img


def _from_array(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Grey levels and alpha in [0, 1] of a 2-D grey or 3-D grey/RGB/RGBA numpy array."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or a.size == 0:
        raise ImageError(f"expected a 2-D grey or an HxWx3/4 colour array, got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.float64)
    elif a.dtype == np.uint8:
        a = a / 255.0
    elif a.dtype == np.uint16:
        a = a / 65535.0
    elif np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise ImageError("integer arrays must hold grey levels 0..255")
        a = a / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        if not np.isfinite(a).all() or a.min() < -1e-6 or a.max() > 1 + 1e-6:
            raise ImageError("float arrays must hold finite values in [0, 1]")
        a = np.clip(a, 0.0, 1.0)
    else:
        raise ImageError(f"unsupported array dtype {a.dtype}")
    if a.ndim == 2:
        return a, None
    return _grey(a[..., :3]), (a[..., 3] if a.shape[-1] == 4 else None)


def _border(g: np.ndarray, width: int) -> np.ndarray:
    """The pixels of the frame of `width` pixels around the image, flattened."""
    return np.concatenate(
        [
            g[:width].ravel(),
            g[-width:].ravel(),
            g[:, :width].ravel(),
            g[:, -width:].ravel(),
        ]
    )


def _centre_of_mass(g: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted mean (row, column) index of a non-negative image."""
    rows, cols = np.indices(g.shape)
    mass = float(g.sum())
    return float((g * rows).sum()) / mass, float((g * cols).sum()) / mass


def _looks_mnist(g: np.ndarray) -> bool:
    """True for a 28x28 light-on-dark digit that MNIST's normalisation would leave alone."""
    if g.shape != (SIDE, SIDE) or np.median(_border(g, 2)) > 0.02:
        return False
    ink = g > 0.02
    if not ink.any():
        return False
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    longest = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    cy, cx = _centre_of_mass(g)
    return 18 <= longest <= 21 and abs(cy - CENTRE) <= 1.0 and abs(cx - CENTRE) <= 1.0


def _mnistify(g: np.ndarray) -> np.ndarray:
    """MNIST's normalisation of a light-on-dark grey image: crop, fit 20x20, centre by mass."""
    border = _border(g, max(1, min(g.shape) // 20))
    level = float(np.median(border))
    noise = 1.4826 * float(np.median(np.abs(border - level)))  # robust sigma of the background
    ink = np.clip(g - level, 0.0, None)
    peak = float(ink.max())
    if peak < MIN_CONTRAST or peak <= 6.0 * noise:
        raise ImageError("no digit found: the image is blank")
    floor = max(3.0 * noise, 0.02 * peak)
    ink[ink < floor] = 0.0
    strong = ink >= max(floor, 0.2 * peak)  # the bounding box ignores faint halo and specks
    rows, cols = np.flatnonzero(strong.any(axis=1)), np.flatnonzero(strong.any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    h, w = crop.shape
    longest = max(h, w)
    size = (max(1, round(w * BOX / longest)), max(1, round(h * BOX / longest)))
    if size != (w, h):
        resample = Image.Resampling.BOX if longest > BOX else Image.Resampling.BILINEAR
        crop = np.asarray(Image.fromarray(crop).resize(size, resample), dtype=np.float32)
    patch = np.clip(crop.astype(np.float64), 0.0, None)
    cy, cx = _centre_of_mass(patch)
    ph, pw = patch.shape
    top = int(np.clip(np.floor(CENTRE - cy + 0.5), 0, SIDE - ph))
    left = int(np.clip(np.floor(CENTRE - cx + 0.5), 0, SIDE - pw))
    out = np.zeros((SIDE, SIDE), dtype=np.float64)
    out[top : top + ph, left : left + pw] = patch
    return np.clip(out / out.max(), 0.0, 1.0).astype(np.float32)


def preprocess(image: Any) -> np.ndarray:
    """The image as MNIST would have it: float32 (28, 28) in [0, 1], ink bright on black.

    `image` is a file path, encoded image bytes, a Pillow image or a numpy array (uint8 0..255
    or float 0..1; 2-D grey, or HxWx3 RGB / HxWx4 RGBA). Transparent pixels are composited on
    the colour opposite to the ink; dark-on-light images are inverted; the background level is
    subtracted; the ink's bounding box is scaled so its longer side is 20 px and pasted on a
    28x28 black canvas with its centre of mass at pixel (14, 14); the maximum is stretched to 1.
    A 28x28 input that already looks like MNIST (dark background, 20 px box, centred) is
    returned as is. Raises `ImageError` for unreadable inputs and blank images.
    """
    source = str(image) if isinstance(image, str | os.PathLike) else None
    if isinstance(image, np.ndarray):
        g, alpha = _from_array(image)
    elif isinstance(image, Image.Image | str | os.PathLike | bytes | bytearray | memoryview):
        img = image if isinstance(image, Image.Image) else _open(image)
        try:
            g, alpha = _from_pil(img)
        except Exception as exc:  # exotic modes or truncated data found only on conversion
            raise ImageError(f"cannot convert the image ({exc})", source) from None
    else:
        raise TypeError(
            "preprocess takes a path, image bytes, a PIL image or a numpy array, "
            f"got {type(image).__name__}"
        )
    try:
        if alpha is not None and float(alpha.min()) < 0.99:
            weight = float(alpha.sum())
            if weight < 1e-6:
                raise ImageError("no digit found: the image is blank")
            light_ink = float((alpha * g).sum()) / weight >= 0.5
            g = alpha * g + (1.0 - alpha) * (0.0 if light_ink else 1.0)
        if float(np.median(_border(g, max(1, min(g.shape) // 20)))) > 0.5:
            g = 1.0 - g  # dark ink on a light background
        if _looks_mnist(g):
            return g.astype(np.float32)
        return _mnistify(g)
    except ImageError as exc:
        raise ImageError(exc.reason, source) from None


# -- protocol helpers shared by the sync and async clients -----------------------------------


@dataclass
class Prediction:
    """One classified image: the label, its softmax probability (scores mode only) and context."""

    label: int
    confidence: float | None
    model_version: str
    request_id: str
    latency_ms: float


@dataclass(frozen=True)
class _Model:
    """What both replicas agreed on in /v1/model."""

    version: str
    frac_bits: int
    max_batch: int
    info: dict[str, Any]


def _parse_replicas(replicas: Sequence[str] | str | None) -> tuple[str, str]:
    """The two base URLs (party 0 first) from the argument, $PRIVDIGIT_REPLICAS or the default."""
    if replicas is None:
        replicas = os.environ.get(REPLICAS_ENV) or ",".join(DEFAULT_REPLICAS)
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


def _ssl_verify(verify: bool | str | ssl.SSLContext) -> bool | ssl.SSLContext:
    """httpx's `verify`: a bool, or an SSL context trusting the CA bundle at path `verify`."""
    if isinstance(verify, bool | ssl.SSLContext):
        return verify
    try:
        return ssl.create_default_context(cafile=str(verify))
    except (OSError, ssl.SSLError) as exc:
        raise PrivDigitError(f"cannot load CA certificates from {verify}: {exc}") from None


def _as_batch(x: Any) -> np.ndarray:
    """Images (N,28,28) / (N,1,28,28) / (28,28), float in [0,1] or uint8, as float64 (N,1,28,28)."""
    a = np.asarray(x)
    if a.dtype == np.uint8:
        a = a / 255.0
    elif not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise ImageError(f"expected a numeric array, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3 or a.shape[1:] != (SIDE, SIDE):
        raise ImageError(f"expected images of shape (N, 28, 28) or (N, 1, 28, 28), got {a.shape}")
    if not np.isfinite(a).all() or (a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6)):
        raise ImageError("pixel values must be finite and in [0, 1]")
    return np.clip(a, 0.0, 1.0)[:, None]


def _preprocess_all(images: Sequence[Any]) -> np.ndarray:
    """`preprocess` of every image, stacked as float64 (N, 1, 28, 28)."""
    if isinstance(images, str | bytes | bytearray | os.PathLike | Image.Image):
        raise TypeError("predict_batch takes a sequence of images; use predict() for one")
    out = []
    for i, image in enumerate(images):
        try:
            out.append(preprocess(image))
        except ImageError as exc:
            raise ImageError(exc.reason, exc.source or f"image {i}") from None
    if not out:
        return np.zeros((0, 1, SIDE, SIDE))
    return np.stack(out).astype(np.float64)[:, None]


def _one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(text.split())


def _unreachable(url: str, exc: httpx.TransportError, timeout: float) -> ReplicaUnreachable:
    """The `ReplicaUnreachable` for a transport failure talking to `url`."""
    if isinstance(exc, httpx.TimeoutException):
        return ReplicaUnreachable(url, f"no answer within {timeout:g} s")
    return ReplicaUnreachable(url, _one_line(str(exc)) or type(exc).__name__)


def _json_body(url: str, response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a 2xx answer; `ServiceError` for an error answer, else `BadResponse`."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not response.is_success:
        err = body.get("error") if isinstance(body, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        if not (isinstance(code, str) and isinstance(message, str)):
            raise BadResponse(
                f"replica {url} answered {response.status_code} without a JSON error body"
            )
        raise ServiceError(url, response.status_code, code, _one_line(message))
    if not isinstance(body, dict):
        raise BadResponse(f"replica {url} answered {response.status_code} without a JSON object")
    return body


def _first_error(errors: Sequence[BaseException | None]) -> BaseException | None:
    """The error to report from the two replicas' outcomes: the likeliest root cause first."""
    found = [e for e in errors if e is not None]

    def rank(e: BaseException) -> int:
        if isinstance(e, ReplicaUnreachable):
            return 0
        if isinstance(e, ServiceError) and not e.code.startswith("peer_"):
            return 1
        return 2 if isinstance(e, PrivDigitError) else 3

    return min(found, key=rank) if found else None


def _check_models(urls: tuple[str, str], infos: Sequence[dict[str, Any]]) -> _Model:
    """The model to ask for, after checking the parties, versions and fixed point agree.

    The version is party 0's `serving_version` (the newest it knows both replicas hold; party 0
    picks the model for a request), so a reload on one replica does not fail requests; without
    one, both replicas must report the same `model_version`.
    """
    parties, versions, fracs, batches = [], [], [], []
    for url, info in zip(urls, infos, strict=True):
        fp = info.get("fixed_point")
        frac = fp.get("frac_bits") if isinstance(fp, dict) else None
        ring = fp.get("ring_bits", 64) if isinstance(fp, dict) else None
        party, version, batch = info.get("party"), info.get("model_version"), info.get("max_batch")
        if not (
            isinstance(info.get("serving_version"), str | None)
            and party in (0, 1)
            and isinstance(version, str)
            and version
            and isinstance(frac, int)
            and 0 <= frac <= 30
            and ring == 64
            and isinstance(batch, int)
            and batch >= 1
        ):
            raise BadResponse(f"replica {url} sent a malformed /v1/model description")
        parties.append(party)
        versions.append(version)
        fracs.append(frac)
        batches.append(batch)
    if parties == [1, 0]:
        raise PrivDigitError(
            f"the replica URLs are swapped: {urls[0]} is party 1 and {urls[1]} is party 0; "
            f"give party 0 first: --replicas {urls[1]},{urls[0]}"
        )
    if parties != [0, 1]:
        raise PrivDigitError(
            f"both replicas say they are party {parties[0]}; give party 0's URL, then party 1's"
        )
    serving = infos[0].get("serving_version")
    if not serving and versions[0] != versions[1]:
        raise VersionMismatch(
            f"the replicas hold different models and none in common: {urls[0]} has "
            f"{versions[0]}, {urls[1]} has {versions[1]}; wait for the reload to finish and retry"
        )
    if fracs[0] != fracs[1]:
        raise VersionMismatch(
            f"the replicas use different fixed point: frac_bits {fracs[0]} and {fracs[1]}"
        )
    return _Model(serving or versions[0], fracs[0], min(batches), dict(infos[0]))


def _newer_served(answers: Sequence[dict[str, Any]], model: _Model) -> bool:
    """True when party 0's predict answer says another version than `model` is served now."""
    serving = answers[0].get("serving_version")
    return isinstance(serving, str) and serving != model.version


def _predict_bodies(
    x: np.ndarray, model: _Model, output: str
) -> tuple[str, tuple[dict[str, Any], dict[str, Any]]]:
    """A fresh request id and the two predict bodies carrying fresh shares of images `x`."""
    request_id = secrets.token_urlsafe(18)
    s0, s1 = share_image(encode_fixed(x, model.frac_bits))
    base = {"request_id": request_id, "output": output, "model_version": model.version}
    return request_id, ({**base, "input": encode_tensor(s0)}, {**base, "input": encode_tensor(s1)})


def _share_of(
    url: str, party: int, body: dict[str, Any], request_id: str, output: str, model: _Model, n: int
) -> tuple[np.ndarray, int]:
    """A predict answer's share (N, 10) and frac_bits, after checking it answers our request
    (its sharing is checked by the caller: both replicas must agree)."""
    if body.get("model_version") != model.version:
        raise VersionMismatch(
            f"replica {url} answered with model {body.get('model_version')!r}, "
            f"expected {model.version!r}"
        )
    expected = {"request_id": request_id, "party": party, "output": output}
    for key, value in expected.items():
        if body.get(key) != value:
            raise BadResponse(f"replica {url} answered {key}={body.get(key)!r}, expected {value!r}")
    sharings = LABEL_SHARINGS if output == "label" else ("additive",)
    if body.get("sharing") not in sharings:
        raise BadResponse(
            f"replica {url} answered sharing={body.get('sharing')!r}, expected one of {sharings}"
        )
    frac = body.get("frac_bits")
    if not isinstance(frac, int) or not 0 <= frac <= 62:
        raise BadResponse(f"replica {url} answered frac_bits={frac!r}")
    try:
        share = decode_tensor(body.get("share"))
    except BadResponse as exc:
        raise BadResponse(f"replica {url}: {exc}") from None
    if share.shape != (n, CLASSES):
        raise BadResponse(f"replica {url} answered a share of shape {list(share.shape)}")
    return share, frac


def _predictions(
    urls: tuple[str, str],
    bodies: Sequence[dict[str, Any]],
    request_id: str,
    output: str,
    model: _Model,
    n: int,
    latency_ms: float,
) -> list[Prediction]:
    """The predictions reconstructed from the two replicas' answers to one request."""
    (s0, f0), (s1, f1) = (
        _share_of(urls[p], p, bodies[p], request_id, output, model, n) for p in (0, 1)
    )
    if output == "label":
        sharing = bodies[0]["sharing"]
        if bodies[1]["sharing"] != sharing:
            raise BadResponse(
                f"the replicas answered sharings {sharing} and {bodies[1]['sharing']}"
            )
        labels, conf = reconstruct_label(s0, s1, sharing), [None] * n
    else:
        if f0 != f1:
            raise BadResponse(f"the replicas answered frac_bits {f0} and {f1}")
        logits = reconstruct_scores(s0, s1, f0)
        labels = logits.argmax(axis=1)
        probs = _softmax(logits)[np.arange(n), labels]
        conf = [float(p) for p in probs]
    return [
        Prediction(int(lab), c, model.version, request_id, latency_ms)
        for lab, c in zip(labels, conf, strict=True)
    ]


# -- clients ---------------------------------------------------------------------------------

API_KEY_ENV = "PRIVDIGIT_API_KEY"


def _http_options(
    timeout: float, verify: bool | str | ssl.SSLContext, api_key: str | None, transport: Any
) -> dict[str, Any]:
    """The httpx client options both clients (sync and async) use for each replica."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    headers = {"User-Agent": USER_AGENT, **({"X-API-Key": key} if key else {})}
    return {"timeout": timeout, "verify": _ssl_verify(verify), "transport": transport,
            "headers": headers}  # fmt: skip


class PrivDigitClient:
    """Classifies digits on two replicas (party 0 first); each sees only a random share.

    `replicas` is "URL0,URL1", a sequence of two URLs, or None for $PRIVDIGIT_REPLICAS or
    the local default. `verify` is True, False or a CA bundle path. `scores=True` asks for the
    logits (when the operator enabled them) so predictions carry a confidence. `api_key` (or
    $PRIVDIGIT_API_KEY) goes in X-API-Key where the operator requires one. `transport`
    replaces httpx's network transport (tests).
    """

    def __init__(
        self,
        replicas: Sequence[str] | str | None = None,
        *,
        timeout: float = 30.0,
        verify: bool | str | ssl.SSLContext = True,
        scores: bool = False,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.replicas = _parse_replicas(replicas)
        self.timeout = timeout
        self.scores = scores
        options = _http_options(timeout, verify, api_key, transport)
        self._http = tuple(httpx.Client(base_url=url, **options) for url in self.replicas)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="privdigit")
        self._lock = threading.Lock()
        self._model: _Model | None = None

    def _call(self, party: int, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """GET (no body) or POST `path` on one replica; its JSON answer."""
        url = self.replicas[party]
        try:
            if body is None:
                response = self._http[party].get(path)
            else:
                response = self._http[party].post(path, json=body)
        except httpx.TransportError as exc:
            raise _unreachable(url, exc, self.timeout) from exc
        return _json_body(url, response)

    def _both(
        self, path: str, bodies: Sequence[dict[str, Any] | None] = (None, None)
    ) -> list[dict[str, Any]]:
        """The same call on both replicas at once (party 1 in a worker, party 0 in this thread)."""
        future = self._pool.submit(self._call, 1, path, bodies[1])
        results: list[Any] = [None, None]
        errors: list[BaseException | None] = [None, None]
        try:
            results[0] = self._call(0, path, bodies[0])
        except Exception as exc:
            errors[0] = exc
        try:
            results[1] = future.result()
        except Exception as exc:
            errors[1] = exc
        error = _first_error(errors)
        if error is not None:
            raise error
        return results

    def _get_model(self, refresh: bool = False) -> _Model:
        """Both replicas' model description, checked and cached."""
        with self._lock:
            if self._model is None or refresh:
                self._model = _check_models(self.replicas, self._both("/v1/model"))
            return self._model

    def model_info(self, refresh: bool = False) -> dict[str, Any]:
        """Party 0's /v1/model description, once party 1 is checked to agree with it."""
        return dict(self._get_model(refresh).info)

    def _predict_chunk(self, x: np.ndarray) -> list[Prediction]:
        """One request for images `x` (N,1,28,28); refreshes the model and retries once on 409."""
        output = "scores" if self.scores else "label"
        for attempt in (0, 1):
            model = self._get_model(refresh=attempt == 1)
            request_id, bodies = _predict_bodies(x, model, output)
            start = time.perf_counter()
            try:
                answers = self._both("/v1/predict", bodies)
            except ServiceError as exc:
                if exc.code == "model_version_mismatch" and attempt == 0:
                    continue
                raise
            latency = 1000.0 * (time.perf_counter() - start)
            preds = _predictions(self.replicas, answers, request_id, output, model, len(x), latency)
            if _newer_served(answers, model):
                self._model = None  # a reload finished: fetch /v1/model before the next request
            return preds
        raise AssertionError("unreachable")

    def predict_encoded(self, x: np.ndarray) -> list[Prediction]:
        """Predictions for MNIST-style arrays (N,28,28) or (N,1,28,28) in [0, 1], unprocessed."""
        batch = _as_batch(x)
        out: list[Prediction] = []
        while len(out) < len(batch):
            size = self._get_model().max_batch
            out += self._predict_chunk(batch[len(out) : len(out) + size])
        return out

    def predict_batch(self, images: Sequence[Any]) -> list[Prediction]:
        """Predictions for many images (anything `preprocess` takes), in as few requests as fit."""
        return self.predict_encoded(_preprocess_all(images))

    def predict(self, image: Any) -> Prediction:
        """The prediction for one image (anything `preprocess` takes)."""
        return self.predict_encoded(preprocess(image)[None])[0]

    def close(self) -> None:
        """Close both HTTP connections and the worker threads."""
        for http in self._http:
            http.close()
        self._pool.shutdown(wait=False)

    def __enter__(self) -> PrivDigitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPrivDigitClient:
    """`PrivDigitClient` for asyncio: the same methods as coroutines, both posts gathered."""

    def __init__(
        self,
        replicas: Sequence[str] | str | None = None,
        *,
        timeout: float = 30.0,
        verify: bool | str | ssl.SSLContext = True,
        scores: bool = False,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.replicas = _parse_replicas(replicas)
        self.timeout = timeout
        self.scores = scores
        options = _http_options(timeout, verify, api_key, transport)
        self._http = tuple(httpx.AsyncClient(base_url=url, **options) for url in self.replicas)
        self._lock = asyncio.Lock()
        self._model: _Model | None = None

    async def _call(self, party: int, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """GET (no body) or POST `path` on one replica; its JSON answer."""
        url = self.replicas[party]
        try:
            if body is None:
                response = await self._http[party].get(path)
            else:
                response = await self._http[party].post(path, json=body)
        except httpx.TransportError as exc:
            raise _unreachable(url, exc, self.timeout) from exc
        return _json_body(url, response)

    async def _both(
        self, path: str, bodies: Sequence[dict[str, Any] | None] = (None, None)
    ) -> list[dict[str, Any]]:
        """The same call on both replicas concurrently; both answers, or the likeliest error."""
        results = await asyncio.gather(
            self._call(0, path, bodies[0]), self._call(1, path, bodies[1]), return_exceptions=True
        )
        error = _first_error([r if isinstance(r, BaseException) else None for r in results])
        if error is not None:
            raise error
        return list(results)  # type: ignore[arg-type]

    async def _get_model(self, refresh: bool = False) -> _Model:
        """Both replicas' model description, checked and cached."""
        async with self._lock:
            if self._model is None or refresh:
                self._model = _check_models(self.replicas, await self._both("/v1/model"))
            return self._model

    async def model_info(self, refresh: bool = False) -> dict[str, Any]:
        """Party 0's /v1/model description, once party 1 is checked to agree with it."""
        return dict((await self._get_model(refresh)).info)

    async def _predict_chunk(self, x: np.ndarray) -> list[Prediction]:
        """One request for images `x` (N,1,28,28); refreshes the model and retries once on 409."""
        output = "scores" if self.scores else "label"
        for attempt in (0, 1):
            model = await self._get_model(refresh=attempt == 1)
            request_id, bodies = _predict_bodies(x, model, output)
            start = time.perf_counter()
            try:
                answers = await self._both("/v1/predict", bodies)
            except ServiceError as exc:
                if exc.code == "model_version_mismatch" and attempt == 0:
                    continue
                raise
            latency = 1000.0 * (time.perf_counter() - start)
            preds = _predictions(self.replicas, answers, request_id, output, model, len(x), latency)
            if _newer_served(answers, model):
                self._model = None  # a reload finished: fetch /v1/model before the next request
            return preds
        raise AssertionError("unreachable")

    async def predict_encoded(self, x: np.ndarray) -> list[Prediction]:
        """Predictions for MNIST-style arrays (N,28,28) or (N,1,28,28) in [0, 1], unprocessed."""
        batch = _as_batch(x)
        out: list[Prediction] = []
        while len(out) < len(batch):
            size = (await self._get_model()).max_batch
            out += await self._predict_chunk(batch[len(out) : len(out) + size])
        return out

    async def predict_batch(self, images: Sequence[Any]) -> list[Prediction]:
        """Predictions for many images (anything `preprocess` takes), in as few requests as fit."""
        return await self.predict_encoded(_preprocess_all(images))

    async def predict(self, image: Any) -> Prediction:
        """The prediction for one image (anything `preprocess` takes)."""
        return (await self.predict_encoded(preprocess(image)[None]))[0]

    async def close(self) -> None:
        """Close both HTTP connections."""
        for http in self._http:
            await http.aclose()

    async def __aenter__(self) -> AsyncPrivDigitClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
