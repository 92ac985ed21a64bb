"""Shared test set-up: offline hubs, small generated images.

Tests run on 2 CPU cores: tiny models, small images, few steps.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_NUM_THREADS", "2")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "stripes")


def draw_shape(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A small synthetic picture of one of three classes, with random colours and placement."""
    bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    fg = tuple(int(c) for c in rng.integers(0, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    if kind == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif kind == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    else:
        step = int(rng.integers(4, 9))
        for x in range(0, size, 2 * step):
            d.rectangle((x, 0, x + step - 1, size), fill=fg)
    return img


def make_image_folder(root: Path, per_class: int = 8, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``per_class`` images of each shape under ``root/<shape>/``; return the paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for kind in SHAPES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            p = root / kind / f"{kind}_{i:03d}.png"
            draw_shape(kind, rng, size).save(p)
            paths.append(p)
    return paths


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 small PNGs in three class folders (circle, square, stripes). Do not modify."""
    root = tmp_path_factory.mktemp("images")
    make_image_folder(root)
    return root
