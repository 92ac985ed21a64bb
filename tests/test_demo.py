"""`dinoserve demo --no-app`: the whole pipeline on a small labelled folder, then reuse."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from conftest import make_image_folder
from dinoserve.cli import cli


def test_demo_runs_every_step_then_reuses_them(tmp_path, monkeypatch):
    data = tmp_path / "shapes"
    make_image_folder(data / "train", per_class=6, size=48, seed=1)
    make_image_folder(data / "val", per_class=2, size=48, seed=2)
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--data", str(data), "--no-app", "--minutes", "0.15", "--image-size", "32",
            "--out", str(tmp_path / "run"), "--repo", str(tmp_path / "repo")]

    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output.strip().splitlines()[-1])
    assert summary["reused"] == []
    # every artefact exists and is usable
    assert (tmp_path / "run" / "train" / "checkpoint.pth").is_file()
    assert (tmp_path / "repo" / "dino_demo" / "1" / "model.onnx").is_file()
    assert (tmp_path / "repo" / "dino_demo" / "config.pbtxt").is_file()
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert 0 <= summary["knn_top1"] <= 100 and 0 <= summary["raw_pixels_top1"] <= 100
    assert len(result["examples"]) == 3 and all(len(e["hits"]) == 3 for e in result["examples"])

    from dinoserve.client import Client
    from dinoserve.index import EmbeddingIndex

    index = EmbeddingIndex.load(summary["index"])
    assert len(index) == 24  # train + val images are all searchable
    client = Client(repo=tmp_path / "repo", model="dino_demo")
    query = sorted((data / "val" / "circle").glob("*.png"))[0]
    top = client.search([query], index=index, k=1)[0][0]
    assert top.path.endswith(query.name) and np.isclose(top.score, 1.0, atol=1e-4)

    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    again = json.loads(second.output.strip().splitlines()[-1])
    assert again["reused"] == ["train", "export", "index"]
    assert again["knn_top1"] == summary["knn_top1"]
    assert not (tmp_path / "repo" / "dino_demo" / "2").exists()  # no second export


def test_demo_without_openclipart_or_data_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("dinoserve.demo.OPENCLIPART_ROOT", tmp_path / "missing")
    result = CliRunner().invoke(cli, ["demo", "--no-app", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "apt-get install -y openclipart-png" in result.output and "--data" in result.output
