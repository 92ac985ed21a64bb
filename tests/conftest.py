"""Shared test set-up: offline hubs, small generated images.

Tests run on 2 CPU cores: tiny models, small images, few steps.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# decoded-image stores of test runs stay out of the user's cache
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="dinoserve-test-cache-"))

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


# ======================================================================================
# Export and serving fixtures (owner: export/Triton, issue 4). Shared by the client,
# index and app tests: a small real model repository and a real tritonserver on it.
# ======================================================================================

#: The two tiny backbones of ``tiny_repo``: model name -> (timm arch, timm kwargs, image size).
TINY_MODELS: dict[str, tuple[str, dict, int]] = {
    "vit_tiny": ("vit_tiny_patch16_224", {"depth": 2, "img_size": 32}, 32),
    "resnet_tiny": ("resnet18", {}, 64),
}


def build_tiny_backbone(name: str):
    """The PyTorch backbone exported as ``tiny_repo/<name>`` (same seed, so the same weights).

    ``name`` is ``"vit_tiny"`` or ``"resnet_tiny"``. Use it to compare served or embedded
    outputs with PyTorch: ``from conftest import build_tiny_backbone, TINY_MODELS``.
    """
    import torch

    from dinoserve.models import create_backbone

    arch, kwargs, _ = TINY_MODELS[name]
    torch.manual_seed(0)
    return create_backbone(arch, **kwargs).eval()


def build_tiny_repo(root: Path) -> Path:
    """Export and verify the :data:`TINY_MODELS` into ``root/model_repository`` (their
    weights under ``root/weights``); what :func:`tiny_repo` and benchmarks/reliability.py use."""
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


def bomb_png(width: int, height: int) -> bytes:
    """A real 1-bit PNG of width x height, all zeros: tiny on disk, huge decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    raw = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Triton model repository (absolute path) with two exported, verified models.

    - ``vit_tiny``: vit_tiny_patch16_224, depth 2, trained size 32 px (``image_size`` 32),
      3 heads, 192-d embedding; outputs ``embedding`` and ``attention``; H and W dynamic
      (multiples of 16).
    - ``resnet_tiny``: resnet18 at 64 px, 512-d embedding; output ``embedding`` only.

    Random init with a fixed seed (rebuild the PyTorch model with
    ``build_tiny_backbone(name)``); each has version 1 and its weights' sha256 in
    ``config.pbtxt``. The weights files are in ``tiny_repo.parent / "weights"``. Read-only:
    tests that export more models or write into a repository must use their own copy.
    Costs about 15 s once per test process.
    """
    return build_tiny_repo(tmp_path_factory.mktemp("tiny_repo"))


@pytest.fixture(scope="session")
def triton_server(tiny_repo: Path):
    """A real ``tritonserver`` on ``tiny_repo``, on 127.0.0.1 with free ports.

    Yields a started :class:`dinoserve.triton.TritonServer`; use ``triton_server.http_url``
    (``http://127.0.0.1:PORT``), ``.grpc_url`` (``grpc://127.0.0.1:PORT``) and
    ``.metrics_url``. Both models are ready when it is yielded. Stopped at session end.
    Skipped with the reason when no tritonserver binary can be found.
    """
    from dinoserve.errors import ServerError
    from dinoserve.triton import TritonServer, find_tritonserver

    try:
        find_tritonserver()
    except ServerError as e:
        pytest.skip(f"no tritonserver available: {e}")
    with TritonServer(tiny_repo, startup_timeout=300) as server:  # generous: CI machines are shared
        yield server
