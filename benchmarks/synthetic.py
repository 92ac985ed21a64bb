"""Generated inputs shared by the tests and the benchmarks: small pictures of three shape
classes, a decompression-bomb PNG, and a tiny exported Triton model repository.

Everything is deterministic (fixed seeds), so a test and a benchmark that build the same
thing get the same bytes and the same weights.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "stripes")

#: The two tiny backbones of :func:`build_tiny_repo`: model name -> (timm arch, timm kwargs, image size).
TINY_MODELS: dict[str, tuple[str, dict, int]] = {
    "vit_tiny": ("vit_tiny_patch16_224", {"depth": 2, "img_size": 32}, 32),
    "resnet_tiny": ("resnet18", {}, 64),
}


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


def bomb_png(width: int, height: int) -> bytes:
    """A real 1-bit PNG of width x height, all zeros: tiny on disk, huge decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    raw = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def build_tiny_backbone(name: str):
    """The PyTorch backbone exported as ``<repo>/<name>`` by :func:`build_tiny_repo` (same
    seed, so the same weights); ``name`` is a key of :data:`TINY_MODELS`. Use it to compare
    served or embedded outputs with PyTorch."""
    import torch

    from dinoserve.models import create_backbone

    arch, kwargs, _ = TINY_MODELS[name]
    torch.manual_seed(0)
    return create_backbone(arch, **kwargs).eval()


def build_tiny_repo(root: Path) -> Path:
    """Export and verify the :data:`TINY_MODELS` into ``root/model_repository`` (their
    weights under ``root/weights``); return the repository's path."""
    from safetensors.torch import save_file

    from dinoserve.export import export_onnx
    from dinoserve.models import load_weights

    weights, repo = root / "weights", root / "model_repository"
    weights.mkdir(parents=True)
    for name, (_, _, size) in TINY_MODELS.items():
        model = build_tiny_backbone(name)
        path = weights / f"{name}.safetensors"
        save_file(model.state_dict(), str(path))
        load_weights(model, path)  # records the source and sha256 the config carries
        export_onnx(model=model, name=name, repo=repo, image_size=size)
    return repo
