"""Models over ONNX's 2 GB single-file limit: weights in ``model.onnx.data`` beside
``model.onnx``, exported, verified, quantised and served like any other model.

A tiny DINOv2 ViT with registers stands in for ViT-g: the layout is forced with
``--external-data``, or chosen by size with the threshold lowered (what a 1.1B model meets).
benchmarks/export_large.py measures the real ViT-g.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from dinoserve import onnx_files
from dinoserve.cli import cli
from dinoserve.client import Client
from dinoserve.errors import ModelFileError
from dinoserve.export import export_onnx, weight_bytes
from dinoserve.images import normalize, preprocess_batch, walk_images
from dinoserve.models import backbone_card, create_backbone, forward_outputs

ARCH = "vit_small_patch14_reg4_dinov2"
SIZE = 28


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_backbone(ARCH, depth=2, img_size=SIZE).eval()
    with torch.no_grad():  # random init leaves layer scale at 1e-5: make the blocks matter
        for n, p in model.named_parameters():
            if "gamma" in n:
                p.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def external(tmp_path_factory, image_folder):
    """The tiny model exported by the CLI with --external-data: (repo, export JSON, model)."""
    root = tmp_path_factory.mktemp("external")
    model = _tiny()
    weights = root / "tiny.safetensors"
    save_file(model.state_dict(), str(weights))
    repo = root / "model_repository"
    res = CliRunner().invoke(cli, ["export", "--onnx", "-w", str(weights), "--arch", ARCH, "--name", "big",
                                   "--repo", str(repo), "--image-size", str(SIZE), "--external-data",
                                   "--verify-images", str(image_folder)])
    assert res.exit_code == 0, res.output
    return repo, json.loads(res.stdout.strip().splitlines()[-1]), model


def _torch_embeddings(model: torch.nn.Module, images: list[Path]) -> np.ndarray:
    card = backbone_card(model)
    batch, _, _ = preprocess_batch(images, SIZE, card.crop_pct)
    with torch.no_grad():
        return forward_outputs(model, torch.from_numpy(normalize(batch, card.mean, card.std)))["embedding"].numpy()


def test_weights_live_beside_the_graph_and_embeddings_match_pytorch(external, image_folder):
    repo, out, model = external
    files = [Path(p) for p in out["files"]]
    assert [p.name for p in files] == ["model.onnx", "model.onnx.data"]
    assert files[0].parent == repo / "big" / "1" and all(p.is_file() for p in files)
    # The weights are in the data file, not in the graph.
    assert files[1].stat().st_size >= 0.9 * weight_bytes(model) > 4 * files[0].stat().st_size
    assert onnx_files.model_files(files[0]) == files
    images = walk_images(image_folder)[:6]
    got = Client(repo=repo, model="big").embed(images)  # L2-normalised, as the client returns them
    ref = _torch_embeddings(model, images)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_openvino_reads_the_same_two_files(external, image_folder):
    pytest.importorskip("openvino")
    repo, _, _ = external
    images = walk_images(image_folder)[:4]
    ov = Client(repo=repo, model="big", runtime="openvino").embed(images)
    np.testing.assert_allclose(ov, Client(repo=repo, model="big").embed(images), atol=1e-4)


def test_triton_serves_the_two_files_unchanged(external, image_folder):
    from dinoserve.errors import ServerError
    from dinoserve.triton import TritonServer, find_tritonserver

    try:
        find_tritonserver()
    except ServerError as e:
        pytest.skip(f"no tritonserver available: {e}")
    repo, _, _ = external
    images = walk_images(image_folder)[:4]
    with TritonServer(repo, startup_timeout=300) as server:
        remote = Client(server.http_url, model="big").embed(images)
    np.testing.assert_allclose(remote, Client(repo=repo, model="big").embed(images), atol=1e-6)


def test_a_missing_weights_file_is_named(external, tmp_path):
    repo, _, _ = external
    copy = tmp_path / "model_repository"
    shutil.copytree(repo, copy)
    (copy / "big" / "1" / "model.onnx.data").unlink()
    with pytest.raises(ModelFileError, match=r"weights file .*model\.onnx\.data is missing.*re-export"):
        Client(repo=copy, model="big").embed(np.zeros((SIZE, SIZE, 3), np.uint8))


def test_layout_is_chosen_by_size_and_int8_follows_it(tmp_path, image_folder, monkeypatch):
    model = _tiny()
    fp32 = weight_bytes(model)
    # Under the threshold: one file, as every model below ~450M parameters.
    res = export_onnx(model=model, name="m", repo=tmp_path / "a", image_size=SIZE)
    assert [p.name for p in res.files] == ["model.onnx"]
    # Over it (a ViT-g meets 1.8 GB): the weights go outside.
    monkeypatch.setattr(onnx_files, "SINGLE_FILE_MAX_BYTES", fp32 - 1)
    res = export_onnx(model=model, name="m", repo=tmp_path / "b", image_size=SIZE)
    assert [p.name for p in res.files] == ["model.onnx", "model.onnx.data"]
    # int8 of an external graph: its weights are a quarter of fp32's, so one file again, and
    # the fp32 data file is gone from the version folder.
    res = export_onnx(model=model, name="m", repo=tmp_path / "c", image_size=SIZE, int8=True,
                      calibration=str(image_folder), min_agreement=0.5)
    assert [p.name for p in res.files] == ["model.onnx"] and res.int8.passed
    assert sorted(p.name for p in res.files[0].parent.iterdir()) == ["model.onnx"]
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(res.files[0])).graph.node}
    # An int8 graph still over the threshold keeps its weights outside, under export's name.
    monkeypatch.setattr(onnx_files, "SINGLE_FILE_MAX_BYTES", 0)
    res = export_onnx(model=model, name="m", repo=tmp_path / "d", image_size=SIZE, int8=True,
                      calibration=str(image_folder), min_agreement=0.5)
    assert [p.name for p in res.files] == ["model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in res.files[0].parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    images = walk_images(image_folder)[:4]
    q = Client(repo=tmp_path / "d", model="m").embed(images)
    ref = Client(repo=tmp_path / "b", model="m").embed(images)
    assert float(np.mean(np.sum(q * ref, axis=1))) > 0.99  # really the int8 copy of this model


def test_an_export_the_memory_cannot_hold_is_refused_before_any_work(tmp_path, monkeypatch):
    from dinoserve import registry
    from dinoserve.errors import ExportError

    model = _tiny()
    fp32 = weight_bytes(model)
    # Between what an fp32 export needs (3.5 x the weights) and what an int8 one needs (6.5 x).
    monkeypatch.setattr(registry, "machine_memory", lambda: 5 * fp32)
    with pytest.raises(ExportError, match=r"an int8 export of .* needs about .* \(6.5 x\).*without --int8"):
        export_onnx(model=model, name="m", repo=tmp_path / "r", image_size=SIZE, int8=True, calibration=str(tmp_path))
    assert not (tmp_path / "r").exists()
    res = export_onnx(model=model, name="m", repo=tmp_path / "r", image_size=SIZE)  # fp32 fits
    assert res.files and res.card.precision == "fp32"
    monkeypatch.setattr(registry, "machine_memory", lambda: 2 * fp32)
    with pytest.raises(ExportError, match=r"export of .* needs about .* \(3.5 x\)"):
        export_onnx(model=model, name="m", repo=tmp_path / "r", image_size=SIZE)
    assert registry.memory_shortfall(10**9, memory=4 * 10**9) == ""
    assert "28 GiB" in registry.memory_shortfall(4_545_935_360, int8=True, memory=24 * 2**30)  # ViT-g int8
