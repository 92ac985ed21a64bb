"""Shared test set-up: offline hubs, and pytest fixtures over :mod:`benchmarks.synthetic`
(small generated images, a tiny exported model repository).

Tests run on 2 CPU cores: tiny models, small images, few steps.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# decoded-image stores of test runs stay out of the user's cache
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="dinoserve-test-cache-"))

from pathlib import Path

import pytest

from benchmarks.synthetic import build_tiny_repo, make_image_folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 small PNGs in three class folders (circle, square, stripes). Do not modify."""
    root = tmp_path_factory.mktemp("images")
    make_image_folder(root)
    return root


# ======================================================================================
# Export and serving fixtures, shared by the client,
# index and app tests: a small real model repository and a real tritonserver on it.
# ======================================================================================

@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Triton model repository (absolute path) with two exported, verified models.

    - ``vit_tiny``: vit_tiny_patch16_224, depth 2, trained size 32 px (``image_size`` 32),
      3 heads, 192-d embedding; outputs ``embedding`` and ``attention``; H and W dynamic
      (multiples of 16).
    - ``resnet_tiny``: resnet18 at 64 px, 512-d embedding; output ``embedding`` only.

    Random init with a fixed seed (rebuild the PyTorch model with
    ``benchmarks.synthetic.build_tiny_backbone(name)``); each has version 1 and its weights'
    sha256 in ``config.pbtxt``. The weights files are in ``tiny_repo.parent / "weights"``. Read-only:
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


@pytest.fixture(scope="session")
def int8_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped resnet18 at 64 px as ONNX: ``fp32.onnx`` and ``<scheme>.onnx`` for each int8
    scheme, calibrated on 48 generated pictures (``calibration.npy``), for
    :mod:`benchmarks.int8_probe` to run on other CPUs' kernels."""
    import numpy as np

    from dinoserve.cpu import INT8_SCHEMES
    from dinoserve.export import export_onnx
    from dinoserve.models import load_backbone
    from dinoserve.quantize import calibration_batch, quantize_int8
    from dinoserve.shipped import SHIPPED_WEIGHTS

    work = tmp_path_factory.mktemp("int8_graphs")
    make_image_folder(work / "images", per_class=16, seed=5)
    batch, _ = calibration_batch(work / "images", 64)
    np.save(work / "calibration.npy", batch)
    res = export_onnx(model=load_backbone(SHIPPED_WEIGHTS), name="m", repo=work / "repo", image_size=64)
    (work / "fp32.onnx").write_bytes(res.onnx_path.read_bytes())
    for scheme in INT8_SCHEMES:
        quantize_int8(work / "fp32.onnx", work / f"{scheme}.onnx", batch, family="resnet", scheme=scheme)
    return work
