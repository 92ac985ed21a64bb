"""End-to-end DINO training runs on tiny models and a dozen generated images.

Real runs, real checkpoints: 2 epochs, exact resume (epoch boundary and mid-epoch),
SIGKILL mid-epoch, a non-finite loss, weights from --pretrained, odd images, the CLI.
"""

from __future__ import annotations

import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from benchmarks.synthetic import make_image_folder
from dinoserve.cli import cli
from dinoserve.errors import NonFiniteLossError
from dinoserve.models import file_sha256, load_backbone, read_checkpoint
from dinoserve.training import config_from_checkpoint, make_config, train

REPO = Path(__file__).resolve().parents[1]

#: a 2-block vit_tiny with 8-px patches at 32/16 px and a 128-prototype head: 3 steps per
#: epoch on 12 images.
TINY = dict(arch="vit_tiny_patch16_224", depth=2, patch_size=8, global_crop_size=32, local_crop_size=16, local_crops=2, out_dim=128,
            hidden_dim=64, bottleneck_dim=32, batch_size=4, num_workers=0, epochs=2, lr=0.05,
            warmup_epochs=0, log_every=1, progress=False, precision="fp32",
            momentum_teacher=0.9, drop_path_rate=0.1, seed=1)


@pytest.fixture(scope="module")
def twelve(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("twelve")
    make_image_folder(root, per_class=4, size=48, seed=5)
    return root


@pytest.fixture(scope="module")
def reference_run(twelve, tmp_path_factory):
    """Two uninterrupted epochs: the run every resume must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(make_config(**TINY, data=str(twelve), out=str(out)))
    return result, out


def step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["event"] == "step"}


def test_two_epochs_finite_decreasing_and_loadable(reference_run):
    result, out = reference_run
    assert result.epochs_done == 2 and result.steps == 6 and not result.stopped_early
    assert all(math.isfinite(x) for x in result.epoch_losses) and len(result.epoch_losses) == 2
    assert result.epoch_losses[1] < result.epoch_losses[0]
    assert result.skipped["count"] == 0

    ckpt = read_checkpoint(result.checkpoint)  # weights_only=True
    assert {"student", "teacher", "optimizer", "epoch", "args", "dino_loss", "scaler", "meta"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and isinstance(ckpt["args"], dict) and ckpt["args"]["arch"] == "vit_tiny_patch16_224"
    for key in ("student", "teacher"):
        assert {k.split(".")[0] for k in ckpt[key]} == {"backbone", "head"}
    assert "head.last_layer.weight_g" in ckpt["teacher"]
    assert ckpt["dino_loss"]["center"].shape == (1, 128) and ckpt["dino_loss"]["center"].abs().sum() > 0
    assert ckpt["meta"]["arch"] == "vit_tiny_patch16_224" and ckpt["meta"]["out_dim"] == 128
    assert ckpt["meta"]["embed_dim"] == 192 and ckpt["meta"]["image_size"] == 32 and ckpt["meta"]["patch_size"] == 8

    teacher = load_backbone(result.checkpoint)  # the teacher by default
    torch.testing.assert_close(teacher.patch_embed.proj.weight, ckpt["teacher"]["backbone.patch_embed.proj.weight"])
    student = load_backbone(result.checkpoint, checkpoint_key="student")
    assert not torch.equal(student.patch_embed.proj.weight, teacher.patch_embed.proj.weight)
    with torch.no_grad():
        assert teacher.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 192)


@pytest.mark.parametrize("stop_after", [3, 4], ids=["epoch-boundary", "mid-epoch"])
def test_resume_reproduces_the_uninterrupted_run(reference_run, twelve, tmp_path, stop_after):
    _, ref_out = reference_run
    out = tmp_path / "run"
    first = train(make_config(**TINY, data=str(twelve), out=str(out), max_steps=stop_after))
    assert first.stopped_early and first.steps == stop_after
    ckpt = read_checkpoint(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["progress"]["epoch_step"]) == divmod(stop_after, 3)

    second = train(config_from_checkpoint(str(out)))
    assert second.steps == 6 and second.epochs_done == 2
    ref, got = step_losses(ref_out), step_losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for s in range(stop_after + 1, 7):
        assert got[s] == pytest.approx(ref[s], abs=1e-4), f"step {s}"
    final_ref = read_checkpoint(ref_out / "checkpoint.pth")
    final = read_checkpoint(out / "checkpoint.pth")
    torch.testing.assert_close(final["dino_loss"]["center"], final_ref["dino_loss"]["center"], atol=1e-5, rtol=1e-4)
    for key in ("backbone.patch_embed.proj.weight", "head.mlp.0.weight"):
        torch.testing.assert_close(final["teacher"][key], final_ref["teacher"][key], atol=1e-4, rtol=1e-3)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(reference_run, tmp_path):
    _, ref_out = reference_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    before = file_sha256(out / "checkpoint.pth")
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train(config_from_checkpoint(str(out), epochs=4, lr=1e30, clip_grad=0.0))
    assert file_sha256(out / "checkpoint.pth") == before
    load_backbone(out / "checkpoint.pth")


def test_pretrained_starts_student_and_teacher_from_weights(reference_run, twelve, tmp_path):
    result, _ = reference_run
    source = load_backbone(result.checkpoint)
    out = tmp_path / "run"
    # lr 0 and momentum 1: nothing moves, so the saved teacher parameters are the source's
    cfg = make_config(**{**TINY, "lr": 0.0, "min_lr": 0.0, "momentum_teacher": 1.0}, data=str(twelve), out=str(out),
                      pretrained=result.checkpoint, max_steps=1)
    train(cfg)
    ckpt = read_checkpoint(out / "checkpoint.pth")
    for name, p in source.named_parameters():
        assert torch.equal(ckpt["teacher"][f"backbone.{name}"], p), name
        assert torch.equal(ckpt["student"][f"backbone.{name}"], p), name


VIT_KILL = dict(arch="vit_tiny_patch16_224", depth=2, patch_size=8, global_crop_size=32, local_crop_size=16,
                local_crops=2, out_dim=128, hidden_dim=64, bottleneck_dim=32, batch_size=4, num_workers=0,
                epochs=50, warmup_epochs=0, log_every=1, progress=False, save_every=1)


def test_sigkill_mid_epoch_leaves_loadable_resumable_checkpoint(twelve, tmp_path):
    out = tmp_path / "run"
    code = f"from training import make_config, train; train(make_config(**{VIT_KILL!r}, data={str(twelve)!r}, out={str(out)!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the 5th step: past an epoch boundary, mid-epoch
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            log = out / "log.jsonl"
            if log.exists() and sum('"event": "step"' in line for line in log.read_text().splitlines()) >= 5:
                break
            time.sleep(0.2)
        else:
            pytest.fail("training did not reach step 5 in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    ckpt = read_checkpoint(out / "checkpoint.pth")
    done = ckpt["progress"]["step"]
    assert done >= 4
    model = load_backbone(out / "checkpoint.pth")
    assert model.dino_card.family == "vit" and model.dino_card.patch_size == 8
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 32, 32))).all()
    resumed = train(config_from_checkpoint(str(out), max_steps=done + 2, num_workers=0))
    assert resumed.steps == done + 2 and math.isfinite(resumed.final_loss)


def test_torchrun_two_cpu_processes(twelve, tmp_path):
    out = tmp_path / "ddp"
    args = ["-d", str(twelve), "-o", str(out), "-a", "resnet18", "--global-crop-size", "32", "--local-crop-size", "16",
            "--local-crops", "2", "--out-dim", "128", "--hidden-dim", "64", "--bottleneck-dim", "32", "-b", "3",
            "-e", "1", "--num-workers", "0", "--warmup-epochs", "0", "--log-every", "1", "-q",
            "--precision", "fp32"]  # bf16 on 3-image batches at 1x1 feature maps can overflow; not what this tests
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "dinoserve", "train", *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 2  # each rank returns its summary
    assert {s["steps"] for s in summaries} == {2}  # 12 images / 2 ranks / batch 3
    ckpt = read_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and ckpt["progress"]["world_size"] == 2 and len(ckpt["progress"]["rng"]) == 2
    assert {k.split(".")[0] for k in ckpt["student"]} == {"backbone", "head"}  # no "module." prefix
    assert ckpt["meta"]["arch"] == "resnet18"
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "start" for r in rows) == 1 and rows[0]["world_size"] == 2  # rank 0 only
    assert len([r for r in rows if r["event"] == "step"]) == 2
    load_backbone(out / "checkpoint.pth")


def _odd_images(root: Path) -> set[str]:
    """12 good PNGs, a CMYK JPEG and a 16-bit PNG (both usable), plus four that must be
    skipped: corrupt, truncated, empty, and a 20000 x 20000 decompression bomb. Returns the
    bad paths."""
    make_image_folder(root / "good", per_class=4, size=48, seed=2)
    odd = root / "odd"
    odd.mkdir()
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(odd / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 28)).save(odd / "sixteen.png")
    assert Image.open(odd / "sixteen.png").mode.startswith("I")
    (odd / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    full = (root / "good" / "circle" / "circle_000.png").read_bytes()
    (odd / "truncated.png").write_bytes(full[: len(full) // 2])
    (odd / "empty.jpg").write_bytes(b"")
    Image.new("1", (20000, 20000)).save(odd / "bomb.png")  # ~50 KB on disk, 400 megapixels
    assert (odd / "bomb.png").stat().st_size < 200_000
    return {str(odd / n) for n in ("corrupt.png", "truncated.png", "empty.jpg", "bomb.png")}


def test_cli_trains_through_odd_images_and_reports_skips(tmp_path):
    bad = _odd_images(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "-d", str(tmp_path / "data"), "-o", str(out), "--preset", "cpu_small", "-e", "1", "-b", "6",
            "--global-crop-size", "32", "--local-crop-size", "16", "--local-crops", "2", "--out-dim", "128",
            "--hidden-dim", "64", "--bottleneck-dim", "32", "--num-workers", "2",
            "-a", "vit_tiny_patch16_224", "--depth", "2", "--patch-size", "8", "--warmup-epochs", "0", "--log-every", "1", "-q"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    # 14 readable images (12 good, CMYK, 16-bit) in batches of 6: 2 steps
    assert summary["steps"] == 2 and summary["epochs_done"] == 1 and math.isfinite(summary["final_loss"])
    assert summary["skipped"]["count"] == 4 and summary["skipped"]["files"] == 4
    assert {e["path"] for e in summary["skipped"]["examples"]} == bad
    reasons = " ".join(e["reason"] for e in summary["skipped"]["examples"])
    assert "decompression" in reasons and "empty" in reasons
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["path"] for r in rows if r["event"] == "skip"} == bad
    assert [r["skipped"]["count"] for r in rows if r["event"] == "start"] == [4]  # said once, not per epoch


def test_cli_help_lists_every_option_and_errors_are_clean(tmp_path):
    import dataclasses

    from dinoserve.training.config import TrainConfig

    r = CliRunner().invoke(cli, ["train", "--help"])
    assert r.exit_code == 0
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in r.output, f.name
    r = CliRunner().invoke(cli, ["train", "-d", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o"), "-a", "resnet18"])
    assert r.exit_code == 1 and "no such folder" in r.output
    r = CliRunner().invoke(cli, ["train", "-o", str(tmp_path / "o"), "--resume"])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = CliRunner().invoke(cli, ["train", "-d", str(tmp_path), "--patch-size", "8", "-a", "resnet18"])
    assert r.exit_code == 1 and "ViT options" in r.output


def test_knn_during_training_and_epoch_teacher(twelve, tmp_path):
    knn = tmp_path / "knn"
    make_image_folder(knn / "train", per_class=4, size=48, seed=11)
    make_image_folder(knn / "val", per_class=2, size=48, seed=12)
    out = tmp_path / "run"
    result = train(make_config(**{**TINY, "epochs": 1}, data=str(twelve), out=str(out), knn_data=str(knn),
                               knn_k=5, teacher_update="epoch", fit="pad"))
    assert len(result.knn) == 1 and 0.0 <= result.knn[0]["top1"] <= 100.0
    # --fit travels with the weights: what export, the client and the index fit images by
    assert read_checkpoint(out / "checkpoint.pth")["meta"]["fit"] == "pad"
    assert load_backbone(str(out / "checkpoint.pth")).dino_card.fit == "pad"
    assert result.knn[0]["top5"] == 100.0  # 3 classes: the right one is always in the top 5
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["top1"] for r in rows if r["event"] == "knn"] == [result.knn[0]["top1"]]
    # the low-noise protocol is logged beside the fixed split: 6 queries there, all 18 images here
    assert 0.0 <= result.knn[0]["loo_top1"] <= 100.0 and {"top1_se", "loo_top1_se"} <= set(result.knn[0])
    # 'epoch' teacher: frozen during the epoch, so it still equals the initial student, which
    # is also what an EMA teacher with momentum 1 keeps after one step of a same-seed run
    frozen = tmp_path / "frozen"
    train(make_config(**{**TINY, "epochs": 1, "momentum_teacher": 1.0}, data=str(twelve), out=str(frozen), max_steps=1))
    epoch_teacher = read_checkpoint(out / "checkpoint.pth")
    init_teacher = read_checkpoint(frozen / "checkpoint.pth")["teacher"]
    for k, v in init_teacher.items():
        assert torch.equal(epoch_teacher["teacher"][k], v), k
    assert not torch.equal(epoch_teacher["student"]["backbone.patch_embed.proj.weight"],
                           init_teacher["backbone.patch_embed.proj.weight"])


def test_no_readable_image_fails_and_names_what_was_skipped(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (data / "b.jpg").write_bytes(b"")
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "-d", str(data), "-o", str(out), "-p", "cpu_small", "-q"])
    assert r.exit_code == 1
    assert "none of its 2 image(s) could be read" in r.output and "a.png" in r.output and "b.jpg" in r.output
    assert not (out / "checkpoint.pth").exists()  # no checkpoint of an untrained model


def test_resume_removes_the_temp_file_of_a_run_killed_while_saving(twelve, tmp_path):
    out = tmp_path / "run"
    train(make_config(**TINY, data=str(twelve), out=str(out), max_steps=1))
    stale = out / ".checkpoint.pth.k1ll3d.tmp"  # what atomic_write leaves when killed mid-write
    stale.write_bytes(b"\0" * 1024)
    result = train(config_from_checkpoint(str(out), max_steps=2))
    assert result.steps == 2 and not stale.exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_plan_to_time_limit_plans_the_schedules_from_measured_speed(twelve, tmp_path):
    out = tmp_path / "run"
    result = train(make_config(**{**TINY, "epochs": 1, "warmup_epochs": 1}, data=str(twelve), out=str(out),
                               time_limit=0.5, plan_to_time_limit=True))  # 3 steps fit even at load 12
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    plans = [r for r in rows if r["event"] == "plan"]
    assert len(plans) == 1 and plans[0]["step"] == 3 and plans[0]["epochs"] >= 1  # the 1-epoch plan's last step
    planned = plans[0]["epochs"]
    assert read_checkpoint(result.checkpoint)["args"]["epochs"] == planned  # --resume continues this plan
    steps = [r for r in rows if r["event"] == "step"]
    if result.steps == planned * 3 and planned > 1:  # finished, and past the 1-epoch warmup:
        assert steps[-1]["lr"] < steps[2]["lr"]  # the cosine reached its end (on a loaded machine
        # one epoch is all that fits, all of it warmup, and the last step has the peak rate)
    assert result.epochs_done <= planned


def test_resume_accepts_the_original_command_line_and_names_real_conflicts(twelve, tmp_path):
    out = tmp_path / "run"
    common = ["-d", str(twelve), "-o", str(out), "-p", "cpu_small", "-a", "vit_tiny_patch16_224", "--depth", "2",
              "--patch-size", "8", "--global-crop-size", "32", "--local-crop-size", "16", "--local-crops", "2",
              "--out-dim", "128", "--hidden-dim", "64", "--bottleneck-dim", "32", "-b", "4", "--precision", "fp32", "-q"]
    r = CliRunner().invoke(cli, ["train", *common, "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["train", *common, "--max-steps", "2", "--resume"])  # same line + --resume
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["steps"] == 2
    r = CliRunner().invoke(cli, ["train", *common, "--out-dim", "256", "-b", "3", "--lr", "0.5", "--resume"])
    assert r.exit_code == 1
    assert "--out-dim 256 (the run has 128)" in r.output and "--batch-size 3 (the run has 4)" in r.output
    assert "--lr" not in r.output  # a new learning rate is how a run is rescued, not a conflict


def test_packaged_teacher_of_an_interrupted_run_loads_and_continues(twelve, tmp_path):
    """What a long run leaves when its checkpoint is lost: the packaged teacher serves as it
    was trained and starts the next run (--pretrained) from exactly its values."""
    from dinoserve.training.checkpoint import package_teacher

    out = tmp_path / "run"
    train(make_config(**TINY, data=str(twelve), out=str(out), max_steps=2))  # stopped mid-run
    target = tmp_path / "progress" / "teacher.safetensors"
    facts = package_teacher(out / "checkpoint.pth", target, with_head=True)
    assert (facts["epoch"], facts["step"], facts["epoch_step"]) == (0, 2, 2)  # 2 of epoch 1's 3 steps
    saved = read_checkpoint(out / "checkpoint.pth")["teacher"]
    teacher = {k[len("backbone."):]: v for k, v in saved.items() if k.startswith("backbone.")}
    head = {k: v for k, v in saved.items() if k.startswith("head.")}
    assert head
    packaged = load_backbone(str(target))  # the card travels in the file: no --arch needed
    assert packaged.dino_card.patch_size == 8 and packaged.dino_card.image_size == 32
    for k, v in packaged.state_dict().items():
        torch.testing.assert_close(v, teacher[k].half().float(), rtol=0, atol=0)

    nxt = tmp_path / "next"
    cfg = make_config(**{**TINY, "lr": 0.0, "momentum_teacher": 1.0}, data=str(twelve), out=str(nxt),
                      pretrained=str(target), max_steps=1)
    train(cfg)  # lr 0 and momentum 1: both networks keep the packaged values through a step
    continued = read_checkpoint(nxt / "checkpoint.pth")
    for k, v in packaged.state_dict().items():
        if v.is_floating_point() and "num_batches" not in k:
            torch.testing.assert_close(continued["teacher"][f"backbone.{k}"], v, rtol=0, atol=0)
    for k, v in head.items():  # the head went along, so the next run does not begin with a random one
        torch.testing.assert_close(continued["teacher"][k], v.half().float(), rtol=0, atol=0)

    # a packaging step that fails (here: a damaged checkpoint) leaves the packaged file as it was
    before = file_sha256(target)
    (out / "checkpoint.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        package_teacher(out / "checkpoint.pth", target)
    assert file_sha256(target) == before and not list(target.parent.glob(".*.tmp"))


def test_start_epoch_continues_the_plan_where_the_packaged_teacher_left_it(twelve, reference_run, tmp_path):
    """A lost checkpoint's run goes on from its packaged teacher at the plan's next epoch:
    the steps, learning rate, weight decay and momentum are those of the uninterrupted run."""
    from dinoserve.training.checkpoint import package_teacher

    first = tmp_path / "first"
    train(make_config(**TINY, data=str(twelve), out=str(first), max_steps=3))  # epoch 0 of 2, then lost
    target = tmp_path / "teacher.safetensors"
    package_teacher(first / "checkpoint.pth", target, with_head=True)
    nxt = tmp_path / "next"
    result = train(make_config(**TINY, data=str(twelve), out=str(nxt), pretrained=str(target), start_epoch=1))
    assert result.epochs_done == 2 and result.steps == 6

    def schedule(out: Path) -> dict[int, tuple]:
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return {r["step"]: (r["epoch"], r["lr"], r["wd"], r["momentum"]) for r in rows if r["event"] == "step"}

    continued, reference = schedule(nxt), schedule(reference_run[1])
    assert sorted(continued) == [k for k in sorted(reference) if reference[k][0] == 1]
    assert continued == {k: reference[k] for k in continued}


@pytest.mark.parametrize("options, message", [
    (dict(start_epoch=2), "must be below --epochs (2)"),
    (dict(start_epoch=1, pretrained=None), "pass them with --pretrained"),
])
def test_start_epoch_refuses_what_cannot_continue(twelve, tmp_path, options, message):
    from dinoserve.errors import ConfigError

    cfg = dict(TINY, data=str(twelve), out=str(tmp_path / "run"), pretrained=str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(make_config(**{**cfg, **options}))
