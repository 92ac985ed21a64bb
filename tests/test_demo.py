"""`dinoserve demo --no-app`: fine-tune a shipped model (or train from scratch) on a small
labelled folder, compare, export, index, search; then reuse every step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks.synthetic import make_image_folder
from dinoserve.cli import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("shapes")
    make_image_folder(data / "train", per_class=6, size=48, seed=1)
    make_image_folder(data / "val", per_class=2, size=48, seed=2)
    return data


@pytest.fixture(scope="module")
def base_model(shapes, tmp_path_factory) -> Path:
    """A tiny model packaged exactly as the shipped one is (benchmarks/ship_model.py):
    the teacher backbone as fp16 safetensors, and its record."""
    out = tmp_path_factory.mktemp("base")
    run = out / "run"
    args = ["-p", "cpu_small", "-a", "vit_tiny_patch16_224", "--depth", "2", "--patch-size", "8",
            "--global-crop-size", "32", "--local-crop-size", "16", "--local-crops", "2", "--out-dim", "64",
            "--hidden-dim", "64", "--bottleneck-dim", "32", "-b", "6", "--max-steps", "2", "--precision", "fp32"]
    r = CliRunner().invoke(cli, ["train", "-d", str(shapes / "train"), "-o", str(run), "-q", *args])
    assert r.exit_code == 0, r.output
    from benchmarks.ship_model import write_weights
    from dinoserve.models import file_sha256

    target = out / "base.safetensors"
    facts = write_weights(run / "checkpoint.pth", target)
    record = {"file_sha256": file_sha256(target), "arch": "vit_tiny_patch16_224", "image_size": 32,
              "knn_top1": 50.0, "train_args": facts["args"]}
    target.with_suffix(".json").write_text(json.dumps(record))
    return target


def _demo(tmp_path, shapes, *extra):
    args = ["demo", "--data", str(shapes), "--no-app", "--out", str(tmp_path / "run"), "--repo", str(tmp_path / "repo"),
            *extra]
    r = CliRunner().invoke(cli, args)
    return r, (json.loads(r.output.strip().splitlines()[-1]) if r.exit_code == 0 else None)


def test_demo_fine_tunes_the_base_model_compares_and_reuses(tmp_path, shapes, base_model):
    first, summary = _demo(tmp_path, shapes, "--base", str(base_model), "--minutes", "0.1")
    assert first.exit_code == 0, first.output
    assert "fine-tuning the shipped model base.safetensors" in first.output
    assert set(summary["knn_top1"]) == {"shipped", "fine-tuned", "raw pixels"}
    assert all(0 <= v <= 100 for v in summary["knn_top1"].values())
    assert set(summary["knn_loo_top1"]) == set(summary["knn_top1"])  # the low-noise protocol beside it
    assert all(0 <= v <= 100 for v in summary["knn_loo_top1"].values())
    assert "leave-one-out" in first.output and "±" in first.output
    tuned, shipped = summary["knn_top1"]["fine-tuned"], summary["knn_top1"]["shipped"]
    # the gate: the fine-tuned model is served only when it is not worse
    expected = str(tmp_path / "run" / "train" / "checkpoint.pth") if tuned >= shipped else str(base_model)
    assert summary["served"] == expected
    assert (tmp_path / "repo" / "dino_demo" / "1" / "model.onnx").is_file()
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert len(result["examples"]) == 3 and all(len(e["hits"]) == 3 for e in result["examples"])

    from dinoserve.client import Client
    from dinoserve.index import EmbeddingIndex

    index = EmbeddingIndex.load(summary["index"])
    assert len(index) == 24  # train + val images are all searchable
    with Client(repo=tmp_path / "repo", model="dino_demo") as client:
        query = sorted((shapes / "val" / "circle").glob("*.png"))[0]
        top = client.search([query], index=index, k=1)[0][0]
    assert top.path.endswith(query.name) and np.isclose(top.score, 1.0, atol=1e-4)

    second, again = _demo(tmp_path, shapes, "--base", str(base_model), "--minutes", "0.1")
    assert second.exit_code == 0, second.output
    assert again["reused"] == ["train", "export", "index"] and again["knn_top1"] == summary["knn_top1"]
    assert again["knn_loo_top1"] == summary["knn_loo_top1"]
    assert not (tmp_path / "repo" / "dino_demo" / "2").exists()  # no second export


def test_demo_serves_the_shipped_model_when_fine_tuning_makes_it_worse():
    from dinoserve.shipped import Candidate, choose

    shipped, tuned = Candidate("shipped", "s.safetensors", None, 48, 61.0), Candidate("fine-tuned", "c.pth", None, 48, 58.5)
    served, why = choose([shipped, tuned])
    assert served is shipped and "61.0 % to 58.5 %" in why
    served, _ = choose([shipped, Candidate("fine-tuned", "c.pth", None, 48, 61.0)])
    assert served.label == "fine-tuned"


def test_demo_from_scratch_does_not_touch_the_shipped_model(tmp_path, shapes):
    r, summary = _demo(tmp_path, shapes, "--from-scratch", "--minutes", "0.1", "--image-size", "32",
                       "--base", str(tmp_path / "nowhere.safetensors"))
    assert r.exit_code == 0, r.output
    assert set(summary["knn_top1"]) == {"from scratch", "raw pixels"}
    assert summary["served"].endswith("checkpoint.pth") and "shipped" not in r.output


def test_demo_with_weights_evaluates_and_serves_them_as_they_were_trained(tmp_path, shapes):
    """A checkpoint trained with --fit pad is compared, and served, padded at its own size."""
    run = tmp_path / "padded"
    args = ["-p", "cpu_small", "-a", "resnet18", "--global-crop-size", "32", "--local-crop-size", "16",
            "--local-crops", "2", "--out-dim", "64", "--hidden-dim", "64", "--bottleneck-dim", "32", "-b", "6",
            "--max-steps", "1", "--precision", "fp32", "--fit", "pad"]
    r = CliRunner().invoke(cli, ["train", "-d", str(shapes / "train"), "-o", str(run), "-q", *args])
    assert r.exit_code == 0, r.output
    r, summary = _demo(tmp_path, shapes, "--weights", str(run / "checkpoint.pth"))
    assert r.exit_code == 0, r.output
    assert "(32 px, pad)" in r.output
    config = (tmp_path / "repo" / "dino_demo" / "config.pbtxt").read_text()
    assert "pad" in config


def test_demo_names_a_missing_or_damaged_base_model_and_the_way_out(tmp_path, shapes, base_model):
    r, _ = _demo(tmp_path, shapes, "--base", str(tmp_path / "gone.safetensors"))
    assert r.exit_code == 1 and "gone.safetensors" in r.output and "--from-scratch" in r.output
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(base_model.read_bytes()[:1000])
    damaged.with_suffix(".json").write_text(base_model.with_suffix(".json").read_text())
    r, _ = _demo(tmp_path, shapes, "--base", str(damaged))
    assert r.exit_code == 1 and "damaged.safetensors" in r.output and "--from-scratch" in r.output
    assert len(r.output.strip().splitlines()) <= 2  # one line, not a traceback


def test_the_shipped_model_is_the_default_and_is_whole():
    from dinoserve.models import backbone_card, load_backbone
    from dinoserve.shipped import SHIPPED_WEIGHTS, shipped_record

    assert SHIPPED_WEIGHTS.parent == REPO / "weights"
    help_text = "".join(CliRunner().invoke(cli, ["demo", "--help"]).output.split())  # click breaks long words
    assert f"default:theshippedweights/{SHIPPED_WEIGHTS.name}" in help_text
    if not SHIPPED_WEIGHTS.is_file():
        pytest.skip(f"{SHIPPED_WEIGHTS} is not in this checkout")
    record = shipped_record(SHIPPED_WEIGHTS)
    assert SHIPPED_WEIGHTS.stat().st_size <= 25 * 1024 * 1024
    model = load_backbone(str(SHIPPED_WEIGHTS), record["arch"])
    assert backbone_card(model).arch == record["arch"] and record["knn_top1"] > 0


def test_demo_without_openclipart_or_data_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("dinoserve.commands.demo_pipeline.OPENCLIPART_ROOT", tmp_path / "missing")
    result = CliRunner().invoke(cli, ["demo", "--no-app", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "apt-get install -y openclipart-png" in result.output and "--data" in result.output


def test_training_minutes_skip_fine_tuning_only_on_the_shipped_models_own_images(tmp_path):
    from dinoserve.commands.demo_pipeline import DEFAULT_MINUTES, DemoConfig, training_minutes

    minutes, why = training_minutes(DemoConfig())  # openclipart with the shipped model
    assert minutes == 0 and "trained on these very images" in why and "--minutes 6 fine-tunes" in why
    assert training_minutes(DemoConfig(minutes=2.5)) == (2.5, "")  # the user's word wins
    assert training_minutes(DemoConfig(data=str(tmp_path))) == (DEFAULT_MINUTES, "")  # their own images
    assert training_minutes(DemoConfig(from_scratch=True)) == (DEFAULT_MINUTES, "")
    assert training_minutes(DemoConfig(shipped=str(tmp_path / "other.safetensors"))) == (DEFAULT_MINUTES, "")
