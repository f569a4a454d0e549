"""A synthetic, learnable image-folder data set (for tests, benchmarks and a first try of
`train` without patient data): classes told apart by a pattern's orientation or presence,
at random period, phase, tint and position, with noise.

    horizontal  bright/dark bands across the image
    vertical    bands down the image
    spot        one bright disc on a noisy background

All three are unchanged in kind by a horizontal flip (the side network's augmentation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("horizontal", "spot", "vertical")  # sorted, as ImageFolder orders them


def make_image(kind: str, rng: np.random.Generator, height: int = 80, width: int = 96, noise: float = 0.12) -> np.ndarray:
    """uint8 [height, width, 3]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    period = rng.uniform(0.22, 0.4) * min(height, width)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "horizontal":
        value = 0.5 + 0.35 * np.sin(2 * np.pi * y / period + phase)
    elif kind == "vertical":
        value = 0.5 + 0.35 * np.sin(2 * np.pi * x / period + phase)
    elif kind == "spot":
        r = rng.uniform(0.12, 0.2) * min(height, width)
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        value = 0.3 + 0.55 * (((y - cy) ** 2 + (x - cx) ** 2) < r * r)
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    value = value + rng.normal(0.0, noise, size=value.shape)
    tint = rng.uniform(0.7, 1.0, size=3)
    rgb = np.clip(value[..., None] * tint[None, None, :], 0.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8)


def write_dataset(folder: str | Path, per_class: int, seed: int, fmt: str = "png", **kwargs) -> list[Path]:
    """Writes folder/<class>/<class>-NNN.<fmt> for the three classes; returns the files."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    paths = []
    for cls in CLASSES:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / cls / f"{cls}-{i:03d}.{fmt}"
            Image.fromarray(make_image(cls, rng, **kwargs), "RGB").save(path)
            paths.append(path)
    return paths
