"""A small generated image set, so ``retrain run`` with no data shows a whole run, and tests
have real JPEGs in class folders without shipping any.

Three classes of drawn shapes (circle, square, triangle) in random colours, sizes and places
on noisy backgrounds: easy for a pretrained network, not trivial for a blank one.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from retrain.tasks import storage

SHAPES = ("circle", "square", "triangle")
SAMPLE_NAME = "sample-shapes"


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = rng.integers(0, 256, 3)
    noise = rng.normal(0, 18, (size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    colour = tuple(int(v) for v in (background + rng.integers(90, 166, 3)) % 256)
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def make_shapes_dataset(
    url: str, per_class: int = 24, size: int = 128, seed: int = 0, classes: tuple[str, ...] = SHAPES
) -> str:
    """Write ``url/<class>/<class>_NNN.jpg`` and return ``url``."""
    rng = np.random.default_rng(seed)
    for shape in classes:
        for i in range(per_class):
            buffer = io.BytesIO()
            draw_shape(shape, size, rng).save(buffer, format="JPEG", quality=90)
            storage.write_bytes(storage.join(url, shape, f"{shape}_{i:03d}.jpg"), buffer.getvalue())
    return url


def ensure_sample_dataset(store: str) -> str:
    """The sample set in the store, generated on first use."""
    url = storage.join(store, "datasets", SAMPLE_NAME, "v1")
    marker = storage.join(url, ".complete")
    if not storage.exists(marker):
        make_shapes_dataset(url)
        storage.write_bytes(marker, b"")
    return url
