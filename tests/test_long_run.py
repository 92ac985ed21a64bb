"""benchmarks/long_run.py's bookkeeping across sessions: which command continues a run whose
checkpoint is gone, and how the segments' k-NN rows line up on one axis."""

from __future__ import annotations

import json

import pytest

from benchmarks import long_run


def _record(first_epoch: int, epochs: int, knn_epochs: list[int], hours: float, earlier: list | None = None) -> dict:
    return {"name": "r18_sgd_64", "first_epoch": first_epoch, "epochs_this_segment": epochs, "planned_epochs": 150,
            "segment": "seg", "cpu_hours_this_segment": hours, "earlier_segments": earlier or [],
            "knn": [{"epoch": e, "top1": 50.0, "top1_se": 2.7, "loo_top1": 55.0, "loo_top1_se": 1.2} for e in knn_epochs]}


@pytest.fixture
def progress(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOSERVE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(long_run, "PROGRESS", tmp_path / "progress")
    (tmp_path / "progress").mkdir()
    (tmp_path / "runs" / "r18_sgd_64").mkdir(parents=True)
    (tmp_path / "progress" / "r18_sgd_64.safetensors").write_bytes(b"weights")
    return tmp_path / "progress"


def test_a_lost_checkpoint_continues_at_the_records_epoch(progress):
    record = _record(58, 4, [59, 61], 0.2)  # a segment that began at 58 and got to 62
    record["teacher_steps_into_next_epoch"] = 17  # stopped 17 steps into epoch 63
    (progress / "r18_sgd_64.json").write_text(json.dumps(record))
    cmd, how = long_run.train_command("r18_sgd_64", None)
    assert cmd[cmd.index("--pretrained") + 1] == str(progress / "r18_sgd_64.safetensors")
    assert cmd[cmd.index("--start-epoch") + 1] == "62" and "--resume" not in cmd
    assert how["first_epoch"] == 62 and how["teacher_had_steps_of_first_epoch"] == 17
    assert json.loads((long_run.run_dir("r18_sgd_64") / "continued_from.json").read_text()) == record


def test_a_record_from_before_first_epoch_counts_from_zero(progress):
    record = _record(0, 58, [57], 4.6)
    del record["first_epoch"]
    (progress / "r18_sgd_64.json").write_text(json.dumps(record))
    cmd, _ = long_run.train_command("r18_sgd_64", None)
    assert cmd[cmd.index("--start-epoch") + 1] == "58"


def test_a_finished_run_is_not_continued(progress):
    (progress / "r18_sgd_64.json").write_text(json.dumps(_record(100, 50, [149], 3.0)))
    with pytest.raises(SystemExit, match="complete .150 of 150 epochs"):
        long_run.train_command("r18_sgd_64", None)
    assert not (long_run.run_dir("r18_sgd_64") / "continued_from.json").exists()


def test_a_replanned_run_begins_where_its_parent_ended(progress):
    """r18_sgd_64_300 has neither checkpoint nor packaged weights of its own: it starts from
    r18_sgd_64's packaged teacher at that record's epoch, in its own 300-epoch plan, and its
    record chain begins with the parent's segments."""
    parent = _record(58, 92, [147, 149], 3.7, earlier=[_record(0, 58, [57], 4.6)])
    (progress / "r18_sgd_64.json").write_text(json.dumps(parent))
    long_run.run_dir("r18_sgd_64_300").mkdir()
    cmd, how = long_run.train_command("r18_sgd_64_300", None)
    assert cmd[cmd.index("--pretrained") + 1] == str(progress / "r18_sgd_64.safetensors")
    assert cmd[cmd.index("--start-epoch") + 1] == "150" and cmd[cmd.index("--epochs") + 1] == "300"
    assert how["first_epoch"] == 150 and "r18_sgd_64's" in how["how"]
    earlier = long_run._earlier(long_run.run_dir("r18_sgd_64_300"))
    assert [e["epochs_this_segment"] for e in earlier] == [58, 92]
    # once it has packaged weights of its own, it continues from those, not the parent's
    (progress / "r18_sgd_64_300.safetensors").write_bytes(b"weights")
    (progress / "r18_sgd_64_300.json").write_text(json.dumps(_record(150, 10, [159], 0.4, earlier=earlier)))
    cmd, _ = long_run.train_command("r18_sgd_64_300", None)
    assert cmd[cmd.index("--pretrained") + 1] == str(progress / "r18_sgd_64_300.safetensors")
    assert cmd[cmd.index("--start-epoch") + 1] == "160"


def test_curve_points_put_every_segment_on_one_axis():
    first = _record(0, 58, [1, 57], 4.6)
    first["knn"][1]["hours"] = 4.5  # a row with its own hours keeps them
    current = _record(58, 4, [59, 61], 0.2, earlier=[first])
    points, epochs, hours = long_run.curve_points(current)
    assert [p["epoch"] for p in points] == [2, 58, 60, 62]
    assert (epochs, hours) == (62, pytest.approx(4.8))
    assert points[0]["hours_estimated"] and points[0]["hours"] == pytest.approx(4.6 * 2 / 58, abs=1e-3)
    assert points[1]["hours"] == 4.5 and not points[1]["hours_estimated"]
    assert points[2]["hours"] == pytest.approx(4.6 + 0.2 * 2 / 4, abs=1e-3)


def test_a_packaged_teacher_is_served_by_the_demo_as_it_is(progress, tmp_path):
    """`long_run package` writes what `dinoserve demo --base` reads: the demo evaluates the
    long run's teacher, exports it and serves it without training."""
    from click.testing import CliRunner

    from benchmarks.synthetic import make_image_folder
    from dinoserve.cli import cli
    from dinoserve.training import make_config, train

    data = tmp_path / "shapes"
    make_image_folder(data / "train", per_class=4, size=48, seed=1)
    make_image_folder(data / "val", per_class=2, size=48, seed=2)
    out = long_run.run_dir("r18_sgd_64")
    train(make_config("cpu_small", data=str(data / "train"), out=str(out), arch="resnet18", global_crop_size=32,
                      local_crop_size=16, local_crops=2, out_dim=64, hidden_dim=64, bottleneck_dim=32, batch_size=6,
                      epochs=1, precision="fp32", progress=False, knn_data=str(data), knn_every=1))
    (out / "segments.jsonl").write_text(json.dumps({"how": "started from scratch", "started_utc": "now"}) + "\n")
    target = long_run.package("r18_sgd_64")
    record = json.loads((progress / "r18_sgd_64.json").read_text())
    assert record["arch"] == "resnet18" and record["image_size"] == 32 and record["knn_top1"] is not None

    r = CliRunner().invoke(cli, ["demo", "--data", str(data), "--no-app", "--out", str(tmp_path / "demo"),
                                 "--repo", str(tmp_path / "repo"), "--base", str(target), "--minutes", "0"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["served"] == str(target) and set(summary["knn_top1"]) == {"shipped", "raw pixels"}
    assert (tmp_path / "repo" / "dino_demo" / "1" / "model.onnx").is_file()


def test_a_segment_stopped_before_its_first_epoch_keeps_the_packaged_pair(progress):
    """Stopped mid-epoch right after a restart: nothing new to keep, and the record's k-NN
    figures must not be replaced by a record of no epochs."""
    record = _record(58, 4, [59, 61], 0.2)
    (progress / "r18_sgd_64.json").write_text(json.dumps(record))
    out = long_run.run_dir("r18_sgd_64")
    (out / "checkpoint.pth").write_bytes(b"saved mid-epoch")
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"event": "start", "time": 1.0}, {"event": "step", "time": 2.0, "step": 10, "epoch": 62})))
    assert long_run.package("r18_sgd_64") is None
    assert json.loads((progress / "r18_sgd_64.json").read_text()) == record
    assert (progress / "r18_sgd_64.safetensors").read_bytes() == b"weights"
