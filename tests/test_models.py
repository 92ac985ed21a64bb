"""Backbones and weights: every source round-trips, loads are strict, bad files are clear
errors, official math is matched, and each backbone carries its model card."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file

from dinoserve.cli import cli
from dinoserve.errors import (
    IncompatibleWeightsError,
    UnknownModelError,
    UnreadableWeightsError,
    UnsafeCheckpointError,
    WeightsError,
    WeightsNotFoundError,
)
from dinoserve.models import (
    ModelCard,
    create_backbone,
    extract_backbone_state_dict,
    forward_with_attention,
    list_models,
    load_backbone,
    load_weights,
    normalize_tensor,
    read_weights,
)

VIT = dict(depth=2, img_size=64)  # vit_tiny_patch16_224 made tiny: 4x4 patch grid


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_backbone("vit_tiny_patch16_224", **VIT).eval()
    with torch.no_grad():  # timm initialises pos_embed tiny; make interpolation visible
        m.pos_embed.normal_(0, 1.0)
    return m


def tiny_resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_backbone("resnet18").eval()
    with torch.no_grad():  # give BN running stats non-default values so they are tested too
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (a.eval()(x) - b.eval()(x)).abs().max().item()


def head_like(dim: int) -> dict[str, torch.Tensor]:
    return {"head.mlp.0.weight": torch.randn(8, dim), "head.last_layer.weight_v": torch.randn(16, 8)}


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_vit, tiny_resnet], ids=["vit", "resnet"])
def test_every_source_round_trips(make, tmp_path):
    model = make(seed=1)
    sd = model.state_dict()
    arch = model.dino_card.arch
    kwargs = model.dino_card.model_kwargs
    x = torch.randn(2, 3, 64, 64)
    dim = model.dino_card.embed_dim
    backbone = {f"backbone.{k}": v for k, v in sd.items()}
    decoy = {k: torch.zeros_like(v) for k, v in sd.items()}  # what the *other* key holds

    files = {
        "backbone.pth": sd,
        "model.safetensors": {k: v.contiguous() for k, v in sd.items()},
        # dinoserve training checkpoint
        "dinoserve.pth": {"teacher": {**backbone, **head_like(dim)},
                          "student": {f"backbone.{k}": v for k, v in decoy.items()},
                          "meta": model.dino_card.to_dict(), "epoch": 2, "args": {"lr": 0.1}},
        # facebookresearch/dino full checkpoint: DDP-wrapped student, plain teacher
        "dino_full.pth": {"student": {f"module.{k}": v for k, v in {**backbone, **head_like(dim)}.items()},
                          "teacher": {f"backbone.{k}": v for k, v in decoy.items()},
                          "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=16),
                          "epoch": 3, "dino_loss": {"center": torch.zeros(1, 16)}},
    }
    for name, obj in files.items():
        if name.endswith(".safetensors"):
            save_file(obj, tmp_path / name)
        else:
            torch.save(obj, tmp_path / name)

    for name, key in [("backbone.pth", "teacher"), ("model.safetensors", "teacher"),
                      ("dinoserve.pth", "teacher"), ("dino_full.pth", "student")]:
        fresh = create_backbone(arch, **kwargs)
        info = load_weights(fresh, tmp_path / name, checkpoint_key=key)
        assert same_outputs(model, fresh, x) < 1e-6, name
        assert len(info.sha256) == 64 and fresh.dino_card.weights_sha256 == info.sha256  # the card names them
        # and with the architecture worked out from the file alone
        inferred = load_backbone(tmp_path / name, checkpoint_key=key)
        assert inferred.dino_card.arch == arch or name != "dinoserve.pth"
        assert same_outputs(model, inferred, x) < 1e-6, name


def test_official_resnet_full_checkpoint_with_module_prefix_on_both(tmp_path):
    model = tiny_resnet(seed=2)
    sd = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"teacher": sd, "student": sd, "args": argparse.Namespace(arch="resnet18")}, tmp_path / "c.pth")
    loaded = load_backbone(tmp_path / "c.pth")
    assert loaded.dino_card.arch == "resnet18"
    assert same_outputs(model, loaded, torch.randn(1, 3, 64, 64)) < 1e-6


def test_timm_tag_loads_from_local_hf_cache_offline(tmp_path, monkeypatch):
    model = tiny_vit(seed=3)
    cache = tmp_path / "hub"
    snap = cache / "models--timm--vit_tiny_patch16_224.dino" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snap / "model.safetensors")
    (cache / "models--timm--vit_tiny_patch16_224.dino" / "refs").mkdir()
    (cache / "models--timm--vit_tiny_patch16_224.dino" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    loaded = create_backbone("vit_tiny_patch16_224", weights="timm:vit_tiny_patch16_224.dino", **VIT)
    assert same_outputs(model, loaded, torch.randn(1, 3, 64, 64)) < 1e-6


def test_timm_tag_offline_and_uncached_fails_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=r"huggingface.co/timm/vit_small_patch16_224.dino.*--weights"):
        load_backbone("timm:vit_small_patch16_224.dino")
    with pytest.raises(WeightsNotFoundError, match="dino_resnet50_pretrain.pth"):
        create_backbone("dino_resnet50", pretrained=True)


def test_weight_source_is_resolved_before_the_model_is_built(tmp_path, monkeypatch):
    import timm

    built = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a) or pytest.fail("model built"))
    with pytest.raises(WeightsNotFoundError, match="missing.pth: no such file"):
        create_backbone("resnet18", weights=tmp_path / "missing.pth")
    assert built == []


def test_weights_are_read_once_into_one_record(tmp_path, monkeypatch):
    model = tiny_vit(seed=8)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "student": {}, "meta": model.dino_card.to_dict()}, tmp_path / "checkpoint.pth")
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(1) or real_load(*a, **k))
    w = read_weights(tmp_path / "checkpoint.pth")
    assert (w.format, w.arch, w.arch_kwargs["depth"], w.image_size) == ("dinoserve", "vit_tiny_patch16_224", 2, 64)
    loaded = load_backbone(w)  # builds from the record: no second read
    assert reads == [1] and loaded.dino_card.weights_sha256 == w.sha256
    assert same_outputs(model, loaded, torch.randn(1, 3, 64, 64)) < 1e-6


# --- strictness and bad files ----------------------------------------------------------------


def test_wrong_arch_missing_keys_and_non_checkpoints_are_clear_errors(tmp_path):
    torch.save(tiny_resnet().state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(IncompatibleWeightsError, match=r"do not fit vit_tiny_patch16_224.*missing keys: blocks.0.*looks like resnet18"):
        create_backbone("vit_tiny_patch16_224", weights=tmp_path / "resnet.pth", **VIT)

    sd = tiny_vit().state_dict()
    del sd["norm.weight"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(IncompatibleWeightsError, match=r"missing keys: norm.weight.*unexpected keys: extra.weight"):
        create_backbone("vit_tiny_patch16_224", weights=tmp_path / "partial.pth", **VIT)

    with pytest.raises(IncompatibleWeightsError, match="shape mismatch: pos_embed"):
        create_backbone("vit_tiny_patch16_224", weights=_saved(tmp_path, tiny_vit()), depth=2, img_size=32)

    with pytest.raises(WeightsNotFoundError, match="missing.pth: no such file"):
        load_backbone(tmp_path / "missing.pth")
    torch.save({"teacher": {"backbone.x": torch.zeros(1)}}, tmp_path / "t.pth")
    with pytest.raises(WeightsError, match="no 'student' entry"):
        load_backbone(tmp_path / "t.pth", arch="resnet18", checkpoint_key="student")


def _saved(tmp_path, model) -> str:
    path = tmp_path / "vit64.pth"
    torch.save(model.state_dict(), path)
    return str(path)


class Payload:
    """Unpickling this would run a shell command; weights_only must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safetensors_whose_header_length_starts_like_a_pickle_is_read(tmp_path):
    """A safetensors header of 128 + 256 n bytes makes the file's first byte 0x80, the byte a
    legacy torch pickle starts with: such a file is still read as safetensors."""
    model = create_backbone("resnet18")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "model.safetensors"
    for pad in range(512):  # the metadata's length moves the header length through every residue
        save_file(sd, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    w = read_weights(path)
    assert w.arch == "resnet18"
    torch.testing.assert_close(w.state_dict["conv1.weight"], sd["conv1.weight"], rtol=0, atol=0)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": tiny_resnet().state_dict(), "evil": Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="evil.pth: refused.*no unsafe fallback"):
        load_backbone(tmp_path / "evil.pth", arch="resnet18")
    assert not marker.exists()


def test_unknown_names_suggest_close_matches():
    with pytest.raises(UnknownModelError, match="Did you mean: vit_small_patch16_224"):
        create_backbone("vit_smal_patch16_224")
    with pytest.raises(UnknownModelError, match="dino_vits16"):
        create_backbone("efficientnet_b0")
    assert "dino_vits16" in list_models("dino_*") and "resnet50" in list_models("resnet5*")


def test_extract_prefers_backbone_and_drops_the_head():
    sd, fmt = extract_backbone_state_dict(
        {"teacher": {"module.backbone.a": torch.ones(1), "module.head.b": torch.ones(1)}, "args": {}})
    assert fmt == "dino-full" and list(sd) == ["a"]
    sd, fmt = extract_backbone_state_dict({"state_dict": {"module.a": torch.ones(1)}})
    assert fmt == "backbone" and list(sd) == ["a"]


# --- the reference implementation's math -------------------------------------------------------


def reference_vit_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, patch: int, heads: int) -> torch.Tensor:
    """facebookresearch/dino's ViT forward written out from its equations, on raw tensors."""
    B, _, H, W = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], dim=1)
    pos = sd["pos_embed"]
    n, dim = pos.shape[1] - 1, pos.shape[2]
    if not (t.shape[1] - 1 == n and H == W):
        h0, w0 = H // patch + 0.1, W // patch + 0.1
        grid = pos[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    t = t + pos
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(t, (dim,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(B, -1, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape(B, -1, dim)
        t = t + F.linear(y, p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(t, (dim,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        t = t + y
    return F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


@pytest.mark.parametrize("size", [(64, 64), (80, 80), (96, 64), (48, 112)])
def test_official_vit_weights_reproduce_the_reference_outputs(size, tmp_path):
    model = tiny_vit(seed=4)
    torch.save(model.state_dict(), tmp_path / "dino_deittiny16_pretrain.pth")  # backbone-only layout
    loaded = load_backbone(tmp_path / "dino_deittiny16_pretrain.pth")
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = loaded(x)
        ref = reference_vit_forward(model.state_dict(), x, patch=16, heads=3)
    assert (ours - ref).abs().max().item() < 1e-5
    if size != (64, 64):  # timm's own resampling really is different, so the test can fail
        import timm

        plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, **VIT).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (plain(x) - ref).abs().max().item() > 1e-4


def test_attention_rows_are_softmax_over_patches():
    model = tiny_vit(seed=5)
    feats, attn = forward_with_attention(model, torch.randn(2, 3, 64, 96))
    assert feats.shape == (2, 192) and attn.shape == (2, 3, 4, 6)
    total = attn.sum(dim=(-1, -2))  # CLS->patch mass; the rest is CLS->CLS
    assert ((total > 0) & (total < 1)).all()
    with torch.no_grad():
        assert (model(torch.randn(1, 3, 64, 96)) - model(torch.randn(1, 3, 64, 96))).abs().max() > 0
    with pytest.raises(UnknownModelError, match="ViT models only"):
        forward_with_attention(tiny_resnet(), torch.randn(1, 3, 32, 32))


def test_normalize_tensor_is_the_torch_side_of_the_client_normalisation():
    import numpy as np

    from dinoserve.images import normalize

    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 7), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = normalize_tensor(torch.from_numpy(pixels).float().div_(255), mean, std)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 5, 7)
    np.testing.assert_allclose(x.numpy(), normalize(pixels, mean, std), rtol=0, atol=1e-6)


def test_backbone_carries_its_card():
    vit, resnet = tiny_vit().dino_card, tiny_resnet().dino_card
    assert isinstance(vit, ModelCard) and vit == ModelCard.from_dict(vit.to_dict())
    assert (vit.arch, vit.family, vit.image_size, vit.patch_size, vit.num_heads, vit.embed_dim) == (
        "vit_tiny_patch16_224", "vit", 64, 16, 3, 192)
    assert vit.model_kwargs == {"depth": 2, "img_size": 64} and vit.weights_sha256 == ""
    assert (resnet.family, resnet.patch_size, resnet.num_heads, resnet.embed_dim) == ("resnet", 0, 0, 512)


# --- bad weight files: one line naming the file and what to do, through the API and the CLI ---------

BAD_FILES = {
    "empty.pth": (b"", "empty file (0 bytes)"),
    "notes.pth": (b"this is not a checkpoint\n", "a text file (it starts 'this is not a checkpoint')"),
    "notes": (b"this is not a checkpoint\n", "a text file"),
    "noise.pth": (bytes(range(7, 200)), "neither a torch.save file nor a .safetensors file"),
    "cut.pth": (None, "truncated or damaged"),  # the first KB of a real checkpoint
}


def _bad_file(tmp_path, name: str):
    data, expected = BAD_FILES[name]
    if data is None:
        torch.save(tiny_resnet().state_dict(), tmp_path / "whole.pth")
        data = (tmp_path / "whole.pth").read_bytes()[:1024]
    (tmp_path / name).write_bytes(data)
    return tmp_path / name, expected


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_weight_files_are_one_line_errors(tmp_path, name):
    path, expected = _bad_file(tmp_path, name)
    for call in (lambda: load_backbone(path), lambda: load_backbone(path, arch="resnet18"),
                 lambda: create_backbone("resnet18", weights=path), lambda: read_weights(path)):
        with pytest.raises(UnreadableWeightsError) as err:
            call()
        message = str(err.value)
        assert message.startswith(f"{path}: ") and expected in message and "\n" not in message
        assert "pass a file written by torch.save" in message  # what to do


@pytest.mark.parametrize("name", ["empty.pth", "notes.pth", "notes"])
def test_cli_export_and_train_name_a_bad_weights_file(tmp_path, name, image_folder):
    path, expected = _bad_file(tmp_path, name)
    runs = {
        "export": ["export", "--onnx", "--weights", str(path), "--name", "m", "--repo", str(tmp_path / "repo")],
        "train": ["train", "--preset", "cpu_small", "--data", str(image_folder), "--pretrained", str(path),
                  "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8", "--quiet"],
    }
    for command, args in runs.items():
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, (command, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), command
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and str(path) in lines[0] and expected in lines[0], (command, result.output)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("name", ["empty.pth", "notes.pth"])
def test_cli_resume_from_a_bad_checkpoint_names_it(tmp_path, name):
    data, expected = BAD_FILES[name]
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(data)
    result = CliRunner().invoke(cli, ["train", "--out", str(run), "--resume", "--quiet"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(run / "checkpoint.pth") in lines[0] and expected in lines[0], result.output
    assert "start a new run" in lines[0]
    assert (run / "checkpoint.pth").read_bytes() == data  # left as it was


# --- CLI: dinoserve models ---------------------------------------------------------------------------


def test_models_command_lists_aliases_as_json():
    result = CliRunner().invoke(cli, ["models", "--json", "dino_vits16"])
    assert result.exit_code == 0 and '"knn_top1": 74.5' in result.output


def test_models_command_matches_a_plain_word_anywhere():
    result = CliRunner().invoke(cli, ["models", "dino"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert {"dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "dino_resnet50"} <= set(names)
    result = CliRunner().invoke(cli, ["models", "--json", "small_patch16"])
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert "vit_small_patch16_224" in {r["name"] for r in rows} and all("small_patch16" in r["name"] for r in rows)
    result = CliRunner().invoke(cli, ["models", "dino_vit?8"])  # wildcards keep their meaning
    assert result.exit_code == 0 and [line.split()[0] for line in result.output.splitlines()] == ["dino_vits8", "dino_vitb8"]
    assert list_models("resnet5") == [n for n in list_models("*resnet5*")]


# --- checkpoints: what training writes loads with its build settings ----------------------------------


def test_resnet_checkpoint_keeps_its_training_image_size(tmp_path):
    model = tiny_resnet(seed=6)
    meta = {**model.dino_card.to_dict(), "image_size": 64}  # what a 64-px training run records
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"teacher": sd, "student": sd, "meta": meta}, tmp_path / "checkpoint.pth")
    loaded = load_backbone(tmp_path / "checkpoint.pth")
    assert loaded.dino_card.image_size == 64  # export and k-NN default to it, not timm's 224
    assert same_outputs(model, loaded, torch.randn(1, 3, 64, 64)) < 1e-6


def test_given_arch_takes_the_files_own_build_settings(tmp_path):
    model = tiny_vit(seed=7)  # depth 2, 64 px: not the architecture's defaults
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"teacher": sd, "student": sd, "meta": model.dino_card.to_dict()}, tmp_path / "checkpoint.pth")
    loaded = load_backbone(tmp_path / "checkpoint.pth", arch="vit_tiny_patch16_224")
    assert loaded.dino_card.image_size == 64 and len(loaded.blocks) == 2
    assert same_outputs(model, loaded, torch.randn(1, 3, 64, 64)) < 1e-6
    with pytest.raises(IncompatibleWeightsError, match="vit_small_patch16_224"):
        load_backbone(tmp_path / "checkpoint.pth", arch="vit_small_patch16_224")
