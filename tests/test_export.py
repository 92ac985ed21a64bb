"""ONNX export into a Triton repository: graph contract, parity with PyTorch, weight
sources, versions, config.pbtxt, and failures that leave the repository unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from benchmarks.synthetic import TINY_MODELS, build_tiny_backbone
from safetensors.torch import save_file

from dinoserve.cli import cli
from dinoserve.errors import ExportError, IncompatibleWeightsError, UnknownModelError
from dinoserve.export import export_onnx, sample_images
from dinoserve.images import normalize, preprocess_batch
from dinoserve.models import forward_with_attention, reference_pos_embed, traceable_reference_pos_embed
from dinoserve.repository import list_models, model_onnx_path, read_model_config

ONNX_TYPES = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def torch_outputs(model: torch.nn.Module, batch: np.ndarray) -> list[np.ndarray]:
    x = torch.from_numpy(normalize(batch))
    if backbone_family(model) == "vit":
        f, a = forward_with_attention(model, x)
        return [f.numpy(), a.numpy()]
    with torch.no_grad():
        return [model(x).numpy()]


def backbone_family(model) -> str:
    return model.dino_card.family


def images_at(n: int, h: int, w: int) -> np.ndarray:
    """``n`` real (decoded, preprocessed) pictures cropped to ``h x w``."""
    big, _, _ = preprocess_batch(sample_images(n, seed=3), max(h, w))
    return np.ascontiguousarray(big[:, :, :h, :w])


# --- the traceable position-embedding resize ------------------------------------------------


@pytest.mark.parametrize("h,w", [(14, 14), (7, 7), (10, 6), (20, 30), (1, 1), (14, 15)])
def test_traceable_pos_embed_matches_reference_formula(h, w):
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 14 * 14, 32)
    ref = reference_pos_embed(pe, h, w)  # eager: the reference's F.interpolate by scale factors
    got = traceable_reference_pos_embed(pe, h, w)
    assert got.shape == ref.shape == (1, 1 + h * w, 32)
    if (h, w) == (14, 14):
        assert torch.equal(got, pe)  # the trained grid is the table itself, exactly
    # PyTorch's float32 bicubic kernel rounds at ~1e-6 of these unit-scale values.
    assert (got - ref).abs().max().item() < 2e-5
    ref64 = reference_pos_embed(pe.double(), h, w)
    assert (got.double() - ref64).abs().max().item() < 2e-6


# --- the exported graph and its config ----------------------------------------------------


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_config_matches_onnx_graph(tiny_repo, name):
    config = read_model_config(tiny_repo / name)
    graph = onnx.load(str(model_onnx_path(tiny_repo, name))).graph
    arch, _, size = TINY_MODELS[name]
    assert config.name == name and config.backend == "onnxruntime" and config.max_batch_size == 64
    assert [i.name for i in graph.input] == [t.name for t in config.inputs] == ["images"]
    expected_outputs = ["embedding", "attention"] if name == "vit_tiny" else ["embedding"]
    assert [o.name for o in graph.output] == [t.name for t in config.outputs] == expected_outputs
    for value, tensor in zip([*graph.input, *graph.output], [*config.inputs, *config.outputs]):
        dims = value.type.tensor_type.shape.dim
        assert ONNX_TYPES[value.type.tensor_type.elem_type] == tensor.data_type
        assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch
        onnx_dims = tuple(d.dim_value if d.dim_value else -1 for d in dims[1:])
        assert onnx_dims == tensor.dims
    if name == "vit_tiny":
        assert config.inputs[0].dims == (3, -1, -1)
        assert config.outputs[1].dims == (3, -1, -1)
    else:
        assert config.inputs[0].dims == (3, 64, 64)
    model = build_tiny_backbone(name)
    weights = tiny_repo.parent / "weights" / f"{name}.safetensors"
    # The config carries the backbone's card, with the export's image size and the weights' hash.
    assert config.card == model.dino_card.replace(
        image_size=size, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(), model_kwargs={})
    assert config.card.arch == arch and config.card.crop_pct == 0.875 and config.card.precision == "fp32"
    assert config.card.mean == (0.485, 0.456, 0.406) and config.card.std == (0.229, 0.224, 0.225)
    text = (tiny_repo / name / "config.pbtxt").read_text()
    assert "dynamic_batching" in text and "KIND_CPU" in text


@pytest.mark.parametrize("name,batch,size", [
    ("vit_tiny", 1, (32, 32)), ("vit_tiny", 7, (32, 32)), ("vit_tiny", 7, (48, 64)),
    ("resnet_tiny", 1, (64, 64)), ("resnet_tiny", 7, (64, 64)),
])
def test_onnxruntime_equals_pytorch(tiny_repo, name, batch, size):
    session = ort.InferenceSession(str(model_onnx_path(tiny_repo, name)), providers=["CPUExecutionProvider"])
    images = images_at(batch, *size)
    got = session.run(None, {"images": images})
    ref = torch_outputs(build_tiny_backbone(name), images)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.dtype == np.float32 and g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=0)
    if name == "vit_tiny":
        h, w = size
        assert got[1].shape == (batch, 3, h // 16, w // 16)
        np.testing.assert_allclose(got[1].sum(axis=(2, 3)), 1.0 - ref_cls_self(build_tiny_backbone(name), images), atol=1e-4)


def ref_cls_self(model, images: np.ndarray) -> np.ndarray:
    """The CLS token's attention to itself: the part of each softmax row not on patches."""
    captured = []
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    hook = attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        model(torch.from_numpy(normalize(images)))
    hook.remove()
    return captured[-1][:, :, 0, 0].numpy()


# --- weight sources, versions, precision -----------------------------------------------------


def _resnet_sources(tmp_path: Path) -> dict[str, tuple[Path, str | None]]:
    sd = build_tiny_backbone("resnet_tiny").state_dict()
    official = tmp_path / "dino_full.pth"  # facebookresearch/dino layout: teacher with prefixes
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in sd.items()}, "epoch": 3}, official)
    ours = tmp_path / "checkpoint.pth"  # dinoserve training checkpoint layout
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()},
                "student": {f"backbone.{k}": v for k, v in sd.items()},
                "meta": {"arch": "resnet18", "model_kwargs": {}}}, ours)
    st = tmp_path / "backbone.safetensors"
    save_file(sd, str(st))
    # A timm tag resolved from a local Hugging Face cache (the offline path of timm:<arch>.<tag>).
    snapshot_dir = tmp_path / "hf" / "models--timm--resnet18.mine" / "snapshots" / ("0" * 40)
    snapshot_dir.mkdir(parents=True)
    save_file(sd, str(snapshot_dir / "model.safetensors"))
    (tmp_path / "hf" / "models--timm--resnet18.mine" / "refs").mkdir()
    (tmp_path / "hf" / "models--timm--resnet18.mine" / "refs" / "main").write_text("0" * 40)
    return {"dino-full": (official, None), "dinoserve": (ours, None), "safetensors": (st, "resnet18"),
            "timm-tag": ("timm:resnet18.mine", None)}


def test_export_from_every_weight_source(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "repo"
    images = images_at(3, 64, 64)
    ref = torch_outputs(build_tiny_backbone("resnet_tiny"), images)[0]
    for i, (source, (path, arch)) in enumerate(_resnet_sources(tmp_path).items(), start=1):
        res = export_onnx(path, arch=arch, name="r18", repo=repo, image_size=64, max_batch=8)
        assert res.version == i, source  # each export is the next version
        assert res.onnx_path == repo / "r18" / str(i) / "model.onnx" and res.onnx_path.is_file()
        assert 0 <= res.max_abs_diff < 1e-4
        got = ort.InferenceSession(str(res.onnx_path)).run(None, {"images": images})[0]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=source)
    assert read_model_config(repo / "r18").max_batch_size == 8
    assert sorted(p.name for p in repo.iterdir()) == ["r18"]  # no staging folders left
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert read_model_config(repo / "r18").card.weights_sha256 == hashlib.sha256(
        next((tmp_path / "hf").rglob("model.safetensors")).read_bytes()).hexdigest()  # the last export's


def test_export_fp16_keeps_float32_io(tmp_path):
    res = export_onnx(model=build_tiny_backbone("resnet_tiny"), name="half", repo=tmp_path / "repo",
                      image_size=64, fp16=True)
    session = ort.InferenceSession(str(res.onnx_path))
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert session.get_outputs()[0].type == "tensor(float)"
    images = images_at(2, 64, 64)
    ref = torch_outputs(build_tiny_backbone("resnet_tiny"), images)[0]
    got = session.run(None, {"images": images})[0]
    # Half precision: close to the float32 model, but not bit-for-bit.
    assert 0 < np.abs(got - ref).max() < 5e-2 * max(1.0, np.abs(ref).max())
    assert read_model_config(res.model_dir).card.precision == "fp16" == res.card.precision


# --- failures leave the repository unchanged ------------------------------------------------


@pytest.fixture
def repo_copy(tiny_repo, tmp_path) -> Path:
    repo = tmp_path / "model_repository"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    return repo


def test_repository_files_are_readable_as_a_plain_write_leaves_them(tiny_repo):
    """A Triton server running as another user must read config.pbtxt and the graph: every
    file of the repository has the umask's permissions, not a temp file's 0600."""
    umask = os.umask(0o022)
    os.umask(umask)
    files = [p for p in tiny_repo.rglob("*") if p.is_file()]
    assert any(p.name == "config.pbtxt" for p in files) and any(p.suffix == ".onnx" for p in files)
    assert {p.relative_to(tiny_repo): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(tiny_repo): oct(0o666 & ~umask) for p in files}


def test_unknown_arch_is_a_clear_error(tiny_repo, repo_copy):
    before = snapshot(repo_copy.parent)
    weights = tiny_repo.parent / "weights" / "resnet_tiny.safetensors"
    with pytest.raises(UnknownModelError, match="resnet_nonexistent"):
        export_onnx(weights, arch="resnet_nonexistent", name="x", repo=repo_copy)
    assert snapshot(repo_copy.parent) == before


def test_weights_that_do_not_fit_are_a_clear_error(tiny_repo, repo_copy):
    before = snapshot(repo_copy.parent)
    resnet_weights = tiny_repo.parent / "weights" / "resnet_tiny.safetensors"
    with pytest.raises(IncompatibleWeightsError, match="do not fit vit_tiny_patch16_224"):
        export_onnx(resnet_weights, arch="vit_tiny_patch16_224", name="vit_tiny", repo=repo_copy)
    assert snapshot(repo_copy.parent) == before


def test_failed_verification_leaves_repository_unchanged(repo_copy):
    before = snapshot(repo_copy.parent)
    with pytest.raises(ExportError, match="verification failed.*repository is unchanged"):
        export_onnx(model=build_tiny_backbone("resnet_tiny"), name="resnet_tiny", repo=repo_copy, image_size=64,
                    tolerance=1e-15)
    assert snapshot(repo_copy.parent) == before  # no version 2, no staging folder, same config


def test_failed_export_into_a_new_folder_leaves_nothing(tmp_path):
    with pytest.raises(ExportError, match="verification failed"):
        export_onnx(model=build_tiny_backbone("resnet_tiny"), name="r", repo=tmp_path / "a" / "b" / "repo",
                    image_size=64, tolerance=1e-15)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_repository_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        export_onnx(model=build_tiny_backbone("resnet_tiny"), name="x", repo=blocker / "repo")
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not (ro / "probe").exists():
            try:
                (ro / "probe").write_text("")
                writable = True  # root ignores permissions: nothing to test here
            except PermissionError:
                writable = False
            if not writable:
                with pytest.raises(ExportError, match="not writable"):
                    export_onnx(model=build_tiny_backbone("resnet_tiny"), name="x", repo=ro / "repo")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("name", ["", "../escape", ".hidden", "a b"])
def test_bad_model_name(tmp_path, name):
    with pytest.raises(ExportError, match="not a valid Triton model folder name"):
        export_onnx(model=build_tiny_backbone("resnet_tiny"), name=name, repo=tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_trt_fp16_needs_gpu_and_renders_accelerator():
    from dinoserve.pbtxt import parse_pbtxt
    from dinoserve.repository import render_config

    with pytest.raises(ExportError, match="--device gpu"):
        export_onnx(model=build_tiny_backbone("resnet_tiny"), name="x", trt_fp16=True)
    card = build_tiny_backbone("vit_tiny").dino_card
    raw = parse_pbtxt(render_config("m", card, max_batch=4, device="gpu", trt_fp16=True))
    assert raw["instance_group"] == [{"kind": "KIND_GPU", "count": 1}]
    accel = raw["optimization"]["execution_accelerators"]["gpu_execution_accelerator"][0]
    assert accel["name"] == "tensorrt"
    assert {"key": "precision_mode", "value": "FP16"} in accel["parameters"]


# --- CLI ------------------------------------------------------------------------------------


def test_cli_export_prints_json_and_writes_version(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    weights = tiny_repo.parent / "weights" / "resnet_tiny.safetensors"  # arch read from the keys
    result = CliRunner().invoke(cli, ["export", "--onnx", "--weights", str(weights), "--name", "r",
                                      "--repo", str(repo), "--image-size", "64", "--max-batch", "4"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["version"] == 1 and out["arch"] == "resnet18" and out["embed_dim"] == 512
    assert out["max_abs_diff"] < 1e-4 and "max abs difference" in result.stderr
    assert list_models(repo) == ["r"] and Path(out["onnx"]).is_file()
    assert read_model_config(repo / "r").max_batch_size == 4


def test_cli_export_bad_input_exit_1(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "--onnx", "--weights", str(tmp_path / "missing.pth"), "--name", "r",
                                 "--repo", str(tmp_path / "repo")])
    assert result.exit_code == 1 and "missing.pth" in result.output and "no such file" in result.output
    result = runner.invoke(cli, ["export", "--weights", "x", "--name", "r"])
    assert result.exit_code == 2 and "--onnx" in result.output
    assert not (tmp_path / "repo").exists()


# --- config.pbtxt both ways, and reading repositories (no torch needed there) --------------------


def test_parse_pbtxt_reads_triton_configs():
    from dinoserve.pbtxt import ConfigParseError, parse_pbtxt
    from dinoserve.repository import config_from_dict

    text = """
    # NVIDIA-style spelling: no colons before messages, repeated blocks, comments
    name: "m"  platform: "onnxruntime_onnx"
    max_batch_size: 8
    input [ { name: "images" data_type: TYPE_UINT8 dims: [ 3, -1, -1 ] } ]
    output { name: "embedding" data_type: TYPE_FP32 dims: [ 384 ] }
    output { name: "attention" data_type: TYPE_FP32 dims: [ 6, -1, -1 ] }
    instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0 ] } ]
    parameters { key: "image_size" value { string_value: "224" } }
    parameters { key: "mean" value { string_value: "0.5,0.5,0.5" } }
    parameters { key: "note" value { string_value: "a \\"quoted\\" word" } }
    """
    config = config_from_dict(parse_pbtxt(text))
    assert config.name == "m" and config.max_batch_size == 8 and config.platform == "onnxruntime_onnx"
    assert [(t.name, t.dims) for t in config.outputs] == [("embedding", (384,)), ("attention", (6, -1, -1))]
    assert config.inputs[0].numpy_dtype == "uint8" and config.has_attention
    assert config.card.image_size == 224 and config.card.mean == (0.5, 0.5, 0.5) and config.card.embed_dim == 384
    assert config.parameters["note"] == 'a "quoted" word'
    assert config.raw["instance_group"] == [{"count": 2, "kind": "KIND_GPU", "gpus": [0]}]
    with pytest.raises(ConfigParseError, match="config.pbtxt"):
        parse_pbtxt('name: "m" input [ { name: "x" ')


def test_pbtxt_writes_back_what_it_read(tiny_repo):
    from dinoserve.pbtxt import format_pbtxt, parse_pbtxt

    text = """name: "m" platform: "onnxruntime_onnx" max_batch_size: 8
    input [ { name: "images" data_type: TYPE_UINT8 dims: [ 3, -1, -1 ] } ]
    instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] } ]
    optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" } ] } }
    parameters { key: "note" value { string_value: "a \\"quoted\\" word\\nand a line" } }
    version_policy { latest { num_versions: 2 } } ensemble_scheduling { step [ ] }
    """
    raw = parse_pbtxt(text)
    assert parse_pbtxt(format_pbtxt(raw)) == raw
    exported = (tiny_repo / "vit_tiny" / "config.pbtxt").read_text()
    assert format_pbtxt(parse_pbtxt(exported)) == exported  # export writes through the same writer


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_python_backend_variant_keeps_the_model_and_runs_on_cpu(tmp_path, device):
    from dinoserve.pbtxt import parse_pbtxt
    from dinoserve.repository import config_from_dict, write_model_config
    from dinoserve.triton_python_backend import python_backend_config

    card = build_tiny_backbone("vit_tiny").dino_card.replace(image_size=32, weights_sha256="ab" * 32)
    write_model_config(tmp_path, "m", card, max_batch=4, device=device, trt_fp16=device == "gpu")
    original = read_model_config(tmp_path)
    raw = parse_pbtxt(python_backend_config(tmp_path, intra_op_threads=3))
    variant = config_from_dict(raw)
    assert variant.backend == "python" and variant.platform == "" and "optimization" not in raw
    assert raw["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]
    assert variant.parameters["runner_device"] == {"cpu": "cpu", "gpu": "auto"}[device] and variant.parameters["runner_intra_op_threads"] == "3"
    # Clients cannot tell the difference: same name, tensors, batching and card.
    assert (variant.name, variant.inputs, variant.outputs, variant.max_batch_size) == (
        original.name, original.inputs, original.outputs, original.max_batch_size)
    assert raw["dynamic_batching"] == original.raw["dynamic_batching"]
    assert variant.card == original.card
    # Written over an already prepared variant, the runner parameters are not repeated.
    (tmp_path / "config.pbtxt").write_text(python_backend_config(tmp_path, intra_op_threads=3))
    again = parse_pbtxt(python_backend_config(tmp_path, intra_op_threads=1))["parameters"]
    assert [p["key"] for p in again].count("runner_intra_op_threads") == 1


def test_repository_lookups_name_what_exists(tiny_repo, tmp_path):
    from dinoserve.errors import ModelNotFoundError
    from dinoserve.repository import latest_version

    assert latest_version(tiny_repo / "vit_tiny") == 1 and latest_version(tmp_path) is None
    assert model_onnx_path(tiny_repo, "vit_tiny", 1) == tiny_repo / "vit_tiny" / "1" / "model.onnx"
    with pytest.raises(ModelNotFoundError, match="no model 'vit_huge'.*available: resnet_tiny, vit_tiny"):
        model_onnx_path(tiny_repo, "vit_huge")
    with pytest.raises(ModelNotFoundError, match=r"versions of 'vit_tiny': \[1\]"):
        model_onnx_path(tiny_repo, "vit_tiny", 7)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        model_onnx_path(tmp_path / "nowhere", "x")
