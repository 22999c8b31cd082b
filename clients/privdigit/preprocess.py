"""Image preprocessing: any digit image becomes an MNIST-style 28x28 input, as MNIST was made.

Crop the ink, scale its bounding box into 20x20, centre it by mass on a 28x28 canvas (`preprocess`);
also the checks that turn ready-made arrays into a batch (`as_batch`, `preprocess_all`).
`web/js/preprocess.js` does the same in the page (`tests/test_web_e2e.py` compares them).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clients.privdigit.errors import ImageError

SIDE = 28  # MNIST canvas
BOX = 20  # MNIST fits the digit's bounding box into 20x20 ...
CENTRE = 14.0  # ... and moves its centre of mass to pixel (14, 14)
MAX_SOURCE_SIDE = 1024  # larger images are reduced first (the result is 20 px anyway)
MIN_CONTRAST = 0.05  # ink at most this far from the background: the image is blank


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


def as_batch(x: Any) -> np.ndarray:
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


def preprocess_all(images: Sequence[Any]) -> np.ndarray:
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
