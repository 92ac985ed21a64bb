"""DINOv2 (with and without registers), DINOv3 ViTs (RoPE, registers, with and without qkv
bias) and DINOv3 ConvNeXts: load strictly from .safetensors, export with `dinoserve export`,
match PyTorch on real images at two sizes (embedding, attention, patch tokens), serve
through the Client in-process and through a real tritonserver.

Every model is timm's architecture with random weights and fewer blocks (no download):
one export per family, shared by the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from dinoserve.cli import cli
from dinoserve.client import Client
from dinoserve.images import normalize, preprocess_batch, walk_images
from dinoserve.models import backbone_card, create_backbone, forward_outputs, load_backbone
from dinoserve.ort_session import open_session
from dinoserve.registry import generation_of, list_models, not_exportable
from dinoserve.repository import read_model_config
from dinoserve.rope import dinov3_rope_table

#: name -> (timm arch, tiny kwargs, export size, registers, position, patch size)
FAMILIES = {
    "dinov2": ("vit_small_patch14_dinov2", {"depth": 1, "img_size": 28}, 28, 0, "learned", 14),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {"depth": 2, "img_size": 28}, 28, 4, "learned", 14),
    "dinov3": ("vit_small_patch16_dinov3", {"depth": 2}, 32, 4, "rope", 16),
    "dinov3_qkvb": ("vit_small_patch16_dinov3_qkvb", {"depth": 1}, 32, 4, "rope", 16),
    "convnext": ("convnext_tiny", {"depths": (1, 1, 1, 1)}, 64, 0, "", 32),
}
TOL = 1e-4  # max abs diff per unit of the reference's magnitude, as export checks


def _tiny(name: str) -> torch.nn.Module:
    arch, kwargs, *_ = FAMILIES[name]
    torch.manual_seed(0)
    model = create_backbone(arch, **kwargs).eval()
    if backbone_card(model).family == "vit":  # random init leaves layer scale at 1e-5: make blocks matter
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "gamma" in n:
                    p.fill_(0.5)
    return model


def _weights_file(root: Path, name: str) -> Path:
    path = root / f"{name}.safetensors"
    if not path.exists():
        save_file(_tiny(name).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, image_folder):
    """Each family exported by the CLI with --patch-tokens into one repository, verified on
    the image folder: ``{name: (export JSON, weights path)}`` and the repository."""
    root = tmp_path_factory.mktemp("generations")
    repo = root / "model_repository"
    out = {}
    for name, (arch, kwargs, size, *_rest) in FAMILIES.items():
        weights = _weights_file(root, name)
        args = ["export", "--onnx", "-w", str(weights), "--arch", arch, "--name", name, "--repo", str(repo),
                "--image-size", str(size), "--patch-tokens", "--verify-images", str(image_folder)]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        out[name] = (json.loads(res.stdout.strip().splitlines()[-1]), weights)
    return repo, out


def _reference(name: str, weights: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    model = load_backbone(weights, FAMILIES[name][0])
    card = backbone_card(model)
    x = torch.from_numpy(normalize(batch, card.mean, card.std))
    return {k: v.numpy() for k, v in forward_outputs(model, x, patch_tokens=True).items()}


def _close(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape
    diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
    assert diff <= TOL * max(1.0, float(np.max(np.abs(ref)))), diff
    return diff


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_matches_pytorch_at_two_sizes(exported, image_folder, name):
    repo, runs = exported
    info, weights = runs[name]
    arch, _, size, regs, position, patch = FAMILIES[name]
    assert info["max_abs_diff"] <= TOL and len(info["sizes_checked"]) == 2 and info["patch_tokens"]
    session = open_session(Path(info["onnx"]))
    images = walk_images(image_folder)[:5]
    for s in (size, size + 2 * patch):  # the trained-size grid and a bigger one
        batch, _, _ = preprocess_batch(images, s, 0.875)
        ref = _reference(name, weights, batch)
        got = dict(zip(ref, session.run(list(ref), {"images": batch})))
        for key in ref:
            _close(got[key], ref[key])
        grid = (s // patch) ** 2
        assert ref["patch_tokens"].shape == (5, grid, 384 if "vit" in arch else 768)
        if "attention" in ref:  # over the patches only: CLS and registers left out
            assert ref["attention"].shape == (5, 6, s // patch, s // patch)
            assert np.all(ref["attention"].sum(axis=(2, 3)) < 1.0)
    card = read_model_config(repo / name).card
    assert (card.arch, card.num_registers, card.position, card.patch_size) == (arch, regs, position, patch)
    ops = [n.op_type for n in __import__("onnx").load(info["onnx"]).graph.node]
    if card.family == "vit":  # one Attention operator per block but the tapped last one
        assert ops.count("Attention") == FAMILIES[name][1]["depth"] - 1 and ops.count("Softmax") == 1
    # RoPE is computed in the graph from the input's grid (once, for every block), not a constant
    assert ops.count("Sin") == ops.count("Cos") == (1 if position == "rope" else 0)
    assert card.mean == (0.485, 0.456, 0.406) and card.interpolation == "bicubic"


def test_attention_leaves_out_cls_and_registers(exported):
    """The map's mass plus the CLS row's attention to CLS and registers is the whole softmax row."""
    _, runs = exported
    model = load_backbone(runs["dinov2_reg4"][1], "vit_small_patch14_reg4_dinov2")
    attn = model.blocks[-1].attn
    full = []
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda _m, _i, o: full.append(o))
    x = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        model(x)
    handle.remove()
    maps = forward_outputs(model, x)["attention"]
    probs = full[0][:, :, 0]  # [B, heads, 1 + 4 + 12] for a 3 x 4 grid
    assert probs.shape[-1] == 1 + 4 + 12 and maps.shape == (2, 6, 3, 4)
    torch.testing.assert_close(maps.flatten(2), probs[:, :, 5:])
    torch.testing.assert_close(maps.sum((2, 3)) + probs[:, :, :5].sum(-1), torch.ones(2, 6))


def test_rope_table_is_timms_bit_for_bit():
    model = create_backbone("vit_small_patch16_dinov3", depth=1)
    for h, w in [(1, 1), (2, 3), (14, 14), (16, 16), (7, 20)]:
        assert torch.equal(dinov3_rope_table(model.rope, h, w), model.rope.get_embed(shape=(h, w)))


def test_register_model_matches_timm_at_its_own_grid():
    """The reference position resampling keeps timm's forward where no resampling is needed."""
    import timm

    ours = _tiny("dinov2_reg4")
    theirs = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, depth=2, img_size=28).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_client_reads_patch_tokens_in_process(exported, image_folder):
    repo, runs = exported
    images = walk_images(image_folder)[:3]
    for name in ("dinov3", "convnext"):
        client = Client(repo=repo, model=name)
        emb, tokens = client.embed(images, patch_tokens=True)
        batch, _, _ = preprocess_batch(images, client.info.image_size, client.info.crop_pct)
        ref = _reference(name, runs[name][1], batch)
        _close(tokens, ref["patch_tokens"])
        ref_emb = ref["embedding"] / np.linalg.norm(ref["embedding"], axis=1, keepdims=True)
        np.testing.assert_allclose(emb, ref_emb, atol=1e-5)


def test_client_patch_tokens_need_the_output(tmp_path):
    from dinoserve.errors import ModelError
    from dinoserve.export import export_onnx

    export_onnx(model=_tiny("dinov2"), name="plain", repo=tmp_path, image_size=28)
    with pytest.raises(ModelError, match="--patch-tokens"):
        Client(repo=tmp_path, model="plain").embed(np.zeros((28, 28, 3), np.uint8), patch_tokens=True)


def test_triton_serves_the_same_patch_tokens(exported, image_folder, tmp_path):
    from dinoserve.errors import ServerError
    from dinoserve.triton import TritonServer, find_tritonserver

    try:
        find_tritonserver()
    except ServerError as e:
        pytest.skip(f"no tritonserver available: {e}")
    repo, _ = exported
    images = walk_images(image_folder)[:4]
    with TritonServer(repo, startup_timeout=300) as server:
        for name, (_, _, _, regs, *_rest) in FAMILIES.items():
            local = Client(repo=repo, model=name)
            remote = Client(server.http_url if name != "dinov3" else server.grpc_url, model=name)
            assert remote.info.num_registers == regs and remote.info.has_patch_tokens
            e1, t1 = local.embed(images, patch_tokens=True)
            e2, t2 = remote.embed(images, patch_tokens=True)
            np.testing.assert_allclose(e2, e1, atol=1e-6)
            np.testing.assert_allclose(t2, t1, atol=1e-5)
            if remote.info.has_attention:
                np.testing.assert_allclose(remote.attention(images), local.attention(images), atol=1e-6)
            assert float(np.abs(t2).max()) > 0  # real values, not the empty tensors of numpy 2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fp16_export(tmp_path, name):
    """Verified against float32 PyTorch at two sizes with export's fp16 tolerance."""
    from dinoserve.export import export_onnx

    _, _, size, *_ = FAMILIES[name]
    res = export_onnx(model=_tiny(name), name=name, repo=tmp_path, image_size=size, fp16=True, patch_tokens=True)
    assert res.card.precision == "fp16" and len(res.sizes_checked) == 2 and res.max_abs_diff > 0
    session = open_session(res.onnx_path)
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"] * len(session.get_outputs())


# One of each graph kind (a learned table with registers, RoPE with query/value biases, a CNN):
# plain DINOv2 and DINOv3 have the same operators as these, and int8 exports are the slow ones.
@pytest.mark.parametrize("name", ["dinov2_reg4", "dinov3_qkvb", "convnext"])
def test_int8_export_through_the_gate(tmp_path, image_folder, name):
    from dinoserve.export import export_onnx

    _, _, size, *_ = FAMILIES[name]
    res = export_onnx(model=_tiny(name), name="q", repo=tmp_path, image_size=size, int8=True,
                      calibration=str(image_folder), min_agreement=0.5)
    assert res.card.precision == "int8" and res.int8.passed and res.int8.mean_cosine >= 0.99
    ops = {n.op_type for n in __import__("onnx").load(str(res.onnx_path)).graph.node}
    assert "QuantizeLinear" in ops  # really quantised, not the fp32 graph under another name


# --- bad input ---------------------------------------------------------------------------------


def _export(args: list[str]):
    return CliRunner().invoke(cli, ["export", "--onnx", *args])


def test_size_the_architecture_cannot_take_names_the_sizes(tmp_path):
    weights = _weights_file(tmp_path, "dinov2")
    res = _export(["-w", str(weights), "--arch", "vit_small_patch14_dinov2", "--name", "x",
                   "--repo", str(tmp_path / "r"), "--image-size", "225"])
    assert res.exit_code == 1
    line = res.output.strip().splitlines()[-1]
    assert "--image-size 225" in line and "multiples of its patch size 14" in line and "224 or 238" in line
    weights = _weights_file(tmp_path, "convnext")
    res = _export(["-w", str(weights), "--arch", "convnext_tiny", "--name", "x", "--repo", str(tmp_path / "r"),
                   "--image-size", "16"])
    assert res.exit_code == 1 and "32 px or more" in res.output
    assert not (tmp_path / "r").exists()


def test_weights_of_another_generation_name_both(tmp_path):
    weights = _weights_file(tmp_path, "dinov2")
    res = _export(["-w", str(weights), "--arch", "vit_small_patch16_dinov3", "--name", "x",
                   "--repo", str(tmp_path / "r")])
    assert res.exit_code == 1
    assert "DINOv2 ViT weights" in res.output and "vit_small_patch16_dinov3 is a DINOv3 ViT" in res.output
    assert "--arch vit_small_patch14_dinov2" in res.output  # what the file is, detected from its keys
    weights = _weights_file(tmp_path, "convnext")
    res = _export(["-w", str(weights), "--arch", "vit_small_patch14_dinov2", "--name", "x",
                   "--repo", str(tmp_path / "r")])
    assert res.exit_code == 1 and "DINOv3 ConvNeXt weights" in res.output and "DINOv2 ViT" in res.output


def test_register_count_mismatch_is_refused_by_name(tmp_path):
    weights = _weights_file(tmp_path, "dinov2_reg4")
    res = _export(["-w", str(weights), "--arch", "vit_small_patch14_dinov2", "--name", "x",
                   "--repo", str(tmp_path / "r")])
    assert res.exit_code == 1
    assert "4 register tokens, vit_small_patch14_dinov2 has 0" in res.output
    assert "vit_small_patch14_reg4_dinov2" in res.output


@pytest.mark.parametrize("name", list(FAMILIES))
def test_architecture_is_read_from_the_weights(tmp_path, name):
    arch, kwargs, *_ = FAMILIES[name]
    model = load_backbone(_weights_file(tmp_path, name))  # no arch: the keys say it
    assert backbone_card(model).arch == arch
    assert all(backbone_card(model).model_kwargs.get(k) == v for k, v in kwargs.items() if k != "img_size")


# --- listing -----------------------------------------------------------------------------------


def test_models_dino_lists_the_generations_and_what_cannot_be_exported():
    names = list_models("dino")
    for arch, *_ in FAMILIES.values():
        assert arch in names
    assert {"dino_vits16", "vit_base_patch14_reg4_dinov2", "vit_large_patch16_dinov3_qkvb"} <= set(names)
    assert "convnext_atto" not in names and "resnet50" not in names
    gib = 2**30
    assert not_exportable("vit_7b_patch16_dinov3", memory=24 * gib) and not not_exportable("vit_large_patch16_dinov3")
    # ViT-g (4.5 GB of weights) keeps them in model.onnx.data and needs ~16 GB to export.
    assert not not_exportable("vit_giant_patch14_reg4_dinov2", memory=24 * gib)
    assert "about 15 GiB" in not_exportable("vit_giant_patch14_reg4_dinov2", memory=8 * gib)
    assert not not_exportable("vit_7b_patch16_dinov3", memory=128 * gib)
    assert generation_of("convnext_small") == "DINOv3 ConvNeXt" and generation_of("dino_vits8") == "DINO ViT"
    res = CliRunner().invoke(cli, ["models", "dino"])
    assert res.exit_code == 0
    seven_b = [line for line in res.output.splitlines() if line.startswith("vit_7b_patch16_dinov3")]
    assert seven_b and ("not exportable here" in seven_b[0]) == bool(not_exportable("vit_7b_patch16_dinov3"))
    giant = [line for line in res.output.splitlines() if line.startswith("vit_giant_patch14_reg4_dinov2 ")]
    assert giant and "1.1B parameters: weights exported to model.onnx.data" in giant[0]
    assert "vit_large_patch16_dinov3" in res.output.splitlines()  # one file: the bare name, no note
    rows = [json.loads(line) for line in CliRunner().invoke(cli, ["models", "dinov3", "--json"]).output.splitlines()]
    assert {r["name"] for r in rows} >= {"vit_small_patch16_dinov3", "convnext_tiny"}
    assert all(r["generation"] in ("DINOv3 ViT", "DINOv3 ConvNeXt") for r in rows)


def test_too_large_model_is_refused_before_any_work(tmp_path):
    if not not_exportable("vit_7b_patch16_dinov3"):
        pytest.skip("this machine has the memory to export a 7B model")
    res = _export(["-w", str(tmp_path / "none.safetensors"), "--arch", "vit_7b_patch16_dinov3", "--name", "x",
                   "--repo", str(tmp_path / "r")])
    assert res.exit_code == 1 and "not exportable here" in res.output


# --- the app's Attention tab -------------------------------------------------------------------


def test_app_attention_leaves_registers_out_and_convnext_has_none(exported, image_folder, tmp_path):
    import gradio as gr
    from types import SimpleNamespace

    from dinoserve.app.handlers import Handlers

    repo, _ = exported
    image = str(walk_images(image_folder)[0])
    client = Client(repo=repo, model="dinov2_reg4")
    h = Handlers(client, SimpleNamespace(paths=[image]), client.info, tmp_path)
    heads, _, _, summary = h.attention(image, 0.6)
    raw = client.attention([image])[0]
    assert summary["registers"] == 4 and summary["grid"] == [2, 2] and len(heads) == 6
    np.testing.assert_allclose(summary["raw_sums"], raw.sum(axis=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(summary["attention"]).sum(axis=(1, 2)), 1.0, atol=1e-5)
    convnext = Client(repo=repo, model="convnext")
    h = Handlers(convnext, SimpleNamespace(paths=[image]), convnext.info, tmp_path)
    with pytest.raises(gr.Error, match="ConvNeXt.*no attention"):
        h.attention(image, 0.6)


# --- the official checkpoints' layouts ---------------------------------------------------------


def _official(name: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` (timm's names) written the way facebookresearch/dinov2 / dinov3 save it."""
    import re

    torch.manual_seed(1)
    out = {}
    for k, v in sd.items():
        if name == "dinov2_reg4":
            k = k.replace("reg_token", "register_tokens")
        elif name == "dinov3_qkvb":
            k = k.replace("reg_token", "storage_tokens").replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        elif name == "convnext":
            k = k.replace("stem.", "downsample_layers.0.").replace("head.norm.", "norm.")
            k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
            k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
            k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        out[k] = v.clone()
    if name == "dinov2_reg4":  # the reference's table has a CLS entry, added to the CLS token
        cls_pos = torch.randn(1, 1, sd["cls_token"].shape[-1])
        out["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
        out["cls_token"] = sd["cls_token"] - cls_pos
        out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    if name == "dinov3_qkvb":
        for i in range(len([k for k in sd if k.endswith("attn.q_bias")])):
            q, v = out.pop(f"blocks.{i}.attn.q_bias"), out.pop(f"blocks.{i}.attn.v_bias")
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
            out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones_like(q), torch.zeros_like(q), torch.ones_like(q)])
        out["rope_embed.periods"] = torch.ones(16, dtype=torch.bfloat16)
        out["mask_token"] = torch.zeros(1, 384)
    return out


@pytest.mark.parametrize("name", ["dinov2_reg4", "dinov3_qkvb", "convnext"])
def test_official_layout_loads_and_equals_timms(tmp_path, name):
    model = _tiny(name)
    if name == "dinov3_qkvb":
        with torch.no_grad():  # non-zero query/value biases, so the split is checked
            for n, p in model.named_parameters():
                if n.endswith(("q_bias", "v_bias")):
                    p.normal_()
    official = _official(name, model.state_dict())
    assert set(official) != set(model.state_dict())
    torch.save(official, tmp_path / "official_pretrain.pth")
    loaded = load_backbone(tmp_path / "official_pretrain.pth")  # the architecture read from the keys
    assert backbone_card(loaded).arch == FAMILIES[name][0]
    side = 4 * FAMILIES[name][5] if name != "convnext" else 64
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        # (DINOv2-reg: adding the CLS position back to the token rounds in float32)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)


def test_dino_v1_vit_has_patch_tokens_and_resnet_refuses_them(tmp_path, image_folder):
    from dinoserve.errors import ExportError
    from dinoserve.export import export_onnx

    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16_224", depth=1, img_size=32).eval()
    res = export_onnx(model=vit, name="v1", repo=tmp_path, image_size=32, patch_tokens=True)
    batch, _, _ = preprocess_batch(walk_images(image_folder)[:2], 48, 0.875)
    got = open_session(res.onnx_path).run(["patch_tokens"], {"images": batch})[0]
    x = torch.from_numpy(normalize(batch, backbone_card(vit).mean, backbone_card(vit).std))
    _close(got, forward_outputs(vit, x, patch_tokens=True)["patch_tokens"].numpy())
    assert got.shape == (2, 9, 192)
    with pytest.raises(ExportError, match="--patch-tokens: resnet18 is a resnet without patch tokens"):
        export_onnx(model=create_backbone("resnet18"), name="r", repo=tmp_path, patch_tokens=True)


def test_app_patch_features_pca_through_a_real_gradio_server(exported, image_folder, tmp_path, monkeypatch):
    """ConvNeXt: no attention, but its patch features in the Attention tab, over gradio_client;
    the red channel is the projection on the top principal component (found here by eigh)."""
    import socket

    from gradio_client import Client as GradioClient
    from gradio_client import handle_file
    from PIL import Image

    from dinoserve import app
    from dinoserve.index import build_index

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    repo, _ = exported
    client = Client(repo=repo, model="convnext")
    build_index(image_folder, tmp_path / "x.index", client, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.launch(client, tmp_path / "x.index", port=port, prevent_thread_lock=True, quiet=True)
    gc = GradioClient(demo.local_url, verbose=False, download_files=str(tmp_path / "downloads"))
    try:
        query = walk_images(image_folder)[4]
        picture, numbers = gc.predict(handle_file(str(query)), api_name="/patch_features")
        with pytest.raises(Exception, match="ConvNeXt.*no attention"):
            gc.predict(handle_file(str(query)), 0.6, api_name="/attention")
    finally:
        gc.close()
        demo.close()
    assert numbers["grid"] == [2, 2] and numbers["registers_left_out"] == 0
    ratio = numbers["explained_variance"]
    assert ratio == sorted(ratio, reverse=True) and 0 < sum(ratio) <= 1 + 1e-6
    img = np.asarray(Image.open(picture).convert("RGB"))
    assert img.shape[0] == img.shape[1] >= client.info.image_size
    _, tokens = client.embed([query], patch_tokens=True)
    x = tokens[0].astype(np.float64) - tokens[0].mean(0)
    top = np.linalg.eigh(x.T @ x)[1][:, -1]
    proj = x @ top
    side = numbers["grid"][0]
    step = img.shape[0] // side
    red = img[step // 2::step, step // 2::step, 0][:side, :side].reshape(-1).astype(np.float64)
    assert abs(np.corrcoef(red, proj)[0, 1]) > 0.99


@pytest.mark.parametrize("name", ["dinov2_reg4", "dinov3"])
def test_dino_training_starts_from_the_generation_and_keeps_registers_and_rope(tmp_path, image_folder, name):
    """`dinoserve train --pretrained` from DINOv2-reg / DINOv3 weights: the networks are the
    same architecture (registers, RoPE) and start from exactly those values."""
    from dinoserve.models import read_checkpoint
    from dinoserve.training import make_config, train

    arch, kwargs, size, registers, position, patch = FAMILIES[name]
    weights = _weights_file(tmp_path, name)
    out = tmp_path / "run"
    train(make_config(arch=arch, pretrained=str(weights), depth=kwargs["depth"], global_crop_size=size,
                      local_crop_size=patch, local_crops=2, out_dim=64, hidden_dim=32, bottleneck_dim=16,
                      batch_size=4, epochs=1, max_steps=1, lr=0.0, momentum_teacher=1.0, drop_path_rate=0.0,
                      progress=False, precision="fp32", data=str(image_folder), out=str(out)))
    teacher = load_backbone(str(out / "checkpoint.pth"))
    card = backbone_card(teacher)
    assert (card.arch, card.num_registers, card.position, card.patch_size) == (arch, registers, position, patch)
    saved = read_checkpoint(out / "checkpoint.pth")["teacher"]
    for k, v in _tiny(name).state_dict().items():  # lr 0, momentum 1: still the pretrained values
        torch.testing.assert_close(saved[f"backbone.{k}"], v, rtol=0, atol=0)
