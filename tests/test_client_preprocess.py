"""Client preprocessing (clients/privdigit/preprocess.py): any digit image becomes MNIST-style."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clients.privdigit import ImageError, preprocess


def draw_digit(kind: str, size: tuple[int, int], *, ink: int = 0, bg: int = 255) -> Image.Image:
    """A thick synthetic digit ("0", "1" or "7") in mode L on a `size` (width, height) canvas."""
    w, h = size
    img = Image.new("L", size, bg)
    draw = ImageDraw.Draw(img)
    stroke = max(2, round(0.08 * min(w, h)))
    if kind == "1":
        draw.line([(0.45 * w, 0.3 * h), (0.55 * w, 0.15 * h), (0.55 * w, 0.85 * h)], ink, stroke)
    elif kind == "7":
        draw.line([(0.25 * w, 0.2 * h), (0.75 * w, 0.2 * h), (0.4 * w, 0.85 * h)], ink, stroke)
    else:
        draw.ellipse([0.3 * w, 0.15 * h, 0.7 * w, 0.85 * h], outline=ink, width=stroke)
    return img


def ink_box_side(y: np.ndarray, threshold: float = 0.05) -> int:
    """The longer side of the bounding box of the pixels above `threshold`."""
    rows, cols = np.flatnonzero((y > threshold).any(1)), np.flatnonzero((y > threshold).any(0))
    return int(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))


def centre_of_mass(y: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted (row, column) mean in pixel-index coordinates, as MNIST centres."""
    rows, cols = np.indices(y.shape)
    return float((y * rows).sum() / y.sum()), float((y * cols).sum() / y.sum())


def assert_mnist_like(y: np.ndarray) -> None:
    """28x28 float32 in [0, 1], max ~1, 20 px box, centred by mass, black background."""
    assert y.shape == (28, 28) and y.dtype == np.float32
    assert y.min() >= 0.0 and 0.99 <= y.max() <= 1.0
    assert 19 <= ink_box_side(y) <= 21
    cy, cx = centre_of_mass(y)
    assert abs(cy - 14) <= 1.0 and abs(cx - 14) <= 1.0
    frame = np.concatenate([y[:2].ravel(), y[-2:].ravel(), y[:, :2].ravel(), y[:, -2:].ravel()])
    assert np.median(frame) < 0.02 and frame.mean() < 0.05, "the background should be black"


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    """`img` encoded in `fmt`."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# -- synthetic digits ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["0", "1", "7"])
@pytest.mark.parametrize("size", [(200, 300), (50, 40), (640, 480), (24, 18), (3000, 2000)])
@pytest.mark.parametrize("dark_on_light", [True, False])
def test_synthetic_digit_is_mnist_like(
    kind: str, size: tuple[int, int], dark_on_light: bool
) -> None:
    ink, bg = (0, 255) if dark_on_light else (255, 0)
    img = draw_digit(kind, size, ink=ink, bg=bg)
    assert_mnist_like(preprocess(img))


@pytest.mark.parametrize("kind", ["0", "1", "7"])
def test_polarity_does_not_matter(kind: str) -> None:
    dark = preprocess(draw_digit(kind, (200, 300), ink=0, bg=255))
    light = preprocess(draw_digit(kind, (200, 300), ink=255, bg=0))
    assert np.abs(dark - light).mean() < 0.01


def test_grey_background_and_grey_ink() -> None:
    """A pencil digit on grey paper: the background level is removed, the ink stretched to 1."""
    y = preprocess(draw_digit("7", (300, 300), ink=90, bg=200))
    assert_mnist_like(y)
    reference = preprocess(draw_digit("7", (300, 300)))
    assert np.abs(y - reference).mean() < 0.01


def _rgba(kind: str, ink: tuple[int, int, int]) -> Image.Image:
    """The digit in colour `ink` on a fully transparent background (whose RGB is black)."""
    mask = draw_digit(kind, (160, 200), ink=255, bg=0)
    img = Image.new("RGBA", mask.size, (0, 0, 0, 0))
    img.paste(Image.new("RGBA", mask.size, (*ink, 255)), mask=mask)
    return img


def _palette_transparent(kind: str) -> Image.Image:
    """Palette image: index 1 is black ink, index 0 a transparent black background."""
    img = Image.fromarray(
        (np.asarray(draw_digit(kind, (160, 200), ink=255, bg=0)) > 127).astype(np.uint8)
    )
    img = img.convert("P")
    img.putpalette([0, 0, 0, 0, 0, 0])
    img.info["transparency"] = 0
    return img


MODES = {
    "L": lambda: draw_digit("7", (200, 300)),
    "RGB blue ink": lambda: Image.merge(
        "RGB", [draw_digit("7", (200, 300), ink=v, bg=255) for v in (20, 40, 200)]
    ),
    "RGBA black ink on transparent": lambda: _rgba("7", (0, 0, 0)),
    "RGBA white ink on transparent": lambda: _rgba("7", (255, 255, 255)),
    "LA": lambda: _rgba("7", (0, 0, 0)).convert("LA"),
    "P palette": lambda: draw_digit("7", (200, 300)).convert("RGB").convert("P"),
    "P with transparency": lambda: _palette_transparent("7"),
    "1 bit": lambda: draw_digit("7", (200, 300)).convert("1"),
    "I;16": lambda: Image.fromarray(np.asarray(draw_digit("7", (200, 300)), np.uint16) * 257),
    "JPEG bytes": lambda: png_bytes(draw_digit("7", (200, 300)).convert("RGB"), "JPEG", quality=70),
    "PNG bytes": lambda: png_bytes(draw_digit("7", (200, 300))),
    "GIF bytes": lambda: png_bytes(draw_digit("7", (200, 300)), "GIF"),
    "uint8 array": lambda: np.asarray(draw_digit("7", (200, 300))),
    "float array": lambda: np.asarray(draw_digit("7", (200, 300))) / 255.0,
    "RGB array": lambda: np.asarray(draw_digit("7", (200, 300)).convert("RGB")),
    "RGBA array": lambda: np.asarray(_rgba("7", (0, 0, 0))),
    "bool array": lambda: np.asarray(draw_digit("7", (200, 300), ink=255, bg=0)) > 127,
}


@pytest.mark.parametrize("mode", MODES)
def test_modes_and_sources(mode: str) -> None:
    y = preprocess(MODES[mode]())
    assert_mnist_like(y)
    # Every source of the same drawing lands on (nearly) the same MNIST-style array.
    reference = preprocess(draw_digit("7", (200, 300)))
    if "RGBA" not in mode and "LA" not in mode and "transparency" not in mode:
        assert np.abs(y - reference).mean() < 0.03


def test_path_input(tmp_path: Path) -> None:
    path = tmp_path / "digit.png"
    draw_digit("1", (120, 160)).save(path)
    assert_mnist_like(preprocess(path))
    assert_mnist_like(preprocess(str(path)))


# -- real MNIST digits -----------------------------------------------------------------------


def test_mnist_array_passes_through(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = mnist
    for x in images[:100]:
        assert np.array_equal(preprocess(x), (x / 255.0).astype(np.float32))
        assert np.array_equal(preprocess(x / 255.0), (x / 255.0).astype(np.float32))


def test_mnist_properties_match_the_checks(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    """The checks `assert_mnist_like` applies hold for MNIST itself (box 20, mass at 14)."""
    images, _ = mnist
    for x in images[:200]:
        assert_mnist_like((x / 255.0).astype(np.float32))


def test_mnist_enlarged_inverted_png_round_trips(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    """MNIST digits at 4x, dark on light, as PNG: preprocessing recovers the original.

    Measured on these 300 digits: mean absolute difference ~0.001 per pixel, worst digit ~0.06
    (a faint edge pixel decides the bounding box differently).
    """
    images, _ = mnist
    diffs = []
    for x in images[:300]:
        big = Image.fromarray(255 - x).resize((112, 112), Image.Resampling.NEAREST)
        diffs.append(np.abs(preprocess(png_bytes(big)) - x / 255.0).mean())
    assert np.mean(diffs) < 0.005
    assert np.max(diffs) < 0.1


def test_mnist_resampled_jpeg_stays_close(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    """Smoothly resized to 100x100, dark on light, JPEG q85: still close (measured ~0.028)."""
    images, _ = mnist
    diffs = []
    for x in images[:100]:
        img = Image.fromarray(255 - x).resize((100, 100), Image.Resampling.LANCZOS)
        y = preprocess(png_bytes(img.convert("RGB"), "JPEG", quality=85))
        assert_mnist_like(y)
        diffs.append(np.abs(y - x / 255.0).mean())
    assert np.mean(diffs) < 0.05


def test_mnist_off_centre_on_a_large_canvas(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = mnist
    diffs = []
    for x in images[:100]:
        canvas = Image.new("L", (300, 200), 255)
        canvas.paste(Image.fromarray(255 - x).resize((84, 84), Image.Resampling.BILINEAR), (10, 90))
        diffs.append(np.abs(preprocess(canvas) - x / 255.0).mean())
    assert np.mean(diffs) < 0.05


def test_off_centre_28x28_array_is_recentred(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = mnist
    x = images[0]
    shifted = np.zeros_like(x)
    shifted[:, :25] = x[:, 3:]  # 3 px to the left: not MNIST-like any more
    y = preprocess(shifted)
    assert_mnist_like(y)
    assert np.abs(y - x / 255.0).mean() < 0.01


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (100, 100), 255),
        Image.new("L", (100, 100), 0),
        Image.new("L", (28, 28), 128),
        Image.new("RGBA", (50, 50), (0, 0, 0, 0)),
        np.zeros((28, 28), np.uint8),
        np.full((40, 30), 0.5),
    ],
    ids=["white", "black", "grey 28", "transparent", "zeros 28", "grey float"],
)
def test_blank_image(image: object) -> None:
    with pytest.raises(ImageError, match="no digit found: the image is blank"):
        preprocess(image)


def test_faint_noise_is_blank() -> None:
    rng = np.random.default_rng(0)
    noisy = np.clip(200 + rng.normal(0, 2, (120, 90)), 0, 255).astype(np.uint8)
    with pytest.raises(ImageError, match="blank"):
        preprocess(noisy)


def test_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not an image"):
        preprocess(b"this is not an image")
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(ImageError, match=r"notes\.png: not an image file") as info:
        preprocess(path)
    assert info.value.source == str(path) and "notes.png" not in info.value.reason
    with pytest.raises(ImageError, match="no such file"):
        preprocess(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not a file"):
        preprocess(tmp_path)
    truncated = png_bytes(draw_digit("7", (200, 300)))[:300]
    with pytest.raises(ImageError):
        preprocess(truncated)


@pytest.mark.parametrize(
    "array",
    [
        np.full((28, 28), np.nan),
        np.full((28, 28), 2.0),
        np.full((28, 28), -1, np.int64),
        np.zeros((28, 28, 5), np.uint8),
        np.zeros(784, np.uint8),
        np.zeros((0, 28), np.uint8),
        np.array([["a", "b"], ["c", "d"]]),
    ],
    ids=["nan", "float above 1", "negative int", "5 channels", "1-D", "empty", "strings"],
)
def test_bad_arrays(array: np.ndarray) -> None:
    with pytest.raises(ImageError):
        preprocess(array)


def test_unsupported_type() -> None:
    with pytest.raises(TypeError):
        preprocess([[0, 1], [1, 0]])
