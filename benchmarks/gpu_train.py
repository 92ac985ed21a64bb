"""DINO training on a CUDA GPU: throughput per precision, then a short real run.

Runs ``dinoserve.training.train`` itself (DataLoader workers decoding real images, teacher, loss, EMA,
AMP), so the numbers are what a user gets, not a kernel microbenchmark:

1. img/s for the ``cpu_small`` recipe (resnet18, 64/32 px) and the reference ``vit_s16``
   recipe (ViT-S/16, 224/96 px, 8 local crops) in fp32, bf16 and fp16 (with grad scaler);
2. a time-boxed run of a larger-crop resnet18 recipe, whose teacher backbone comes back as
   fp16 safetensors (split in two files to fit the transfer limit) for k-NN evaluation on
   the CPU machine with the full-resolution protocol:

    python -m benchmarks.gpu_train --data IMAGES --out OUT [--minutes 4]
    python -m benchmarks.gpu_train --merge OUT   # on the CPU machine: halves -> one file

Output: OUT/gpu_train.json, OUT/train_log.jsonl, OUT/teacher_a.safetensors, OUT/teacher_b.safetensors.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dinoserve.training import make_config, train

#: The recipe of the time-boxed run: cpu_small with crops and budget a GPU can afford.
GPU_RECIPE = dict(arch="resnet18", global_crop_size=96, local_crop_size=48, local_crops=6,
                  batch_size=256, momentum_teacher=0.996, warmup_epochs=5)


def last_rate(log: Path) -> float:
    """img/s of the last step row of a run's log.jsonl (warm: workers and kernels started)."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in rows if r.get("kind", r.get("event")) == "step" or "img_per_s" in r]
    return float(steps[-1]["img_per_s"]) if steps else float("nan")


def throughput(data: str, device: str, steps: int, workers: int) -> list[dict]:
    runs = [("cpu_small", 256, p) for p in ("fp32", "bf16", "fp16")]
    runs += [("vit_s16", 64, p) for p in ("bf16", "fp16")]
    rows = []
    for preset, batch, precision in runs:
        if device == "cpu" and precision != "fp32":
            continue
        with tempfile.TemporaryDirectory() as tmp:
            start = time.monotonic()
            try:
                result = train(make_config(preset, data=data, out=tmp, device=device, precision=precision,
                                       batch_size=batch, max_steps=steps, epochs=100, num_workers=workers,
                                       log_every=max(1, steps // 4), progress=False, save_every=0))
            except Exception as e:  # record and go on: one failing precision must not hide the others
                row = dict(preset=preset, batch=batch, precision=precision, error=repr(e)[:500])
                print(json.dumps(row), flush=True)
                rows.append(row)
                continue
            row = dict(preset=preset, batch=batch, precision=precision, steps=result.steps,
                       img_per_s_warm=last_rate(Path(tmp) / "log.jsonl"),
                       img_per_s_overall=result.images_per_second, wall_s=round(time.monotonic() - start, 1),
                       final_loss=result.final_loss)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def timed_run(data: str, out: Path, device: str, minutes: float, rate: float, workers: int) -> dict:
    n_images = sum(1 for p in Path(data).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    epochs = max(1, int(minutes * 60 * rate / n_images))
    run_dir = out / "run"
    cfg = make_config("cpu_small", data=data, out=str(run_dir), device=device, epochs=epochs,
                      time_limit=minutes, num_workers=workers, progress=False, log_every=20, **GPU_RECIPE)
    result = train(cfg)
    save_teacher_halves(run_dir / "checkpoint.pth", out, prefix="teacher")
    shutil.copy(run_dir / "log.jsonl", out / "train_log.jsonl")
    return dict(recipe=GPU_RECIPE, epochs_planned=epochs, images=n_images, **result.to_dict())


def save_teacher_halves(checkpoint: Path, out: Path, prefix: str) -> None:
    """The teacher backbone as fp16 safetensors in two files of about equal size: a
    resnet18 is 22 MB in fp16 and one file may bring back at most 16 MiB."""
    from safetensors.torch import save_file

    from dinoserve.training.checkpoint import teacher_in_fp16

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    teacher = {k[len("backbone."):]: v for k, v in teacher_in_fp16(ckpt).items()}
    total, running, first = sum(v.nbytes for v in teacher.values()), 0, {}
    for k in sorted(teacher):
        if running < total / 2:
            first[k] = teacher[k]
            running += teacher[k].nbytes
    save_file(first, out / f"{prefix}_a.safetensors")
    save_file({k: v for k, v in teacher.items() if k not in first}, out / f"{prefix}_b.safetensors")


def merge(out: Path, prefix: str = "teacher") -> Path:
    """Join the two fp16 halves into one fp32 backbone file (keys as the timm model's)."""
    from safetensors.torch import load_file, save_file

    sd = {**load_file(out / f"{prefix}_a.safetensors"), **load_file(out / f"{prefix}_b.safetensors")}
    target = out / f"gpu_{prefix}_resnet18.safetensors"
    save_file({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}, target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--merge", type=Path, help="join the teacher halves in this folder and exit")
    args = ap.parse_args()
    if args.merge:
        print(merge(args.merge))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(device=torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(),
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    report["throughput"] = throughput(args.data, args.device, args.steps, args.workers)
    (args.out / "gpu_train.json").write_text(json.dumps(report, indent=2))
    ok = [r for r in report["throughput"] if r["preset"] == "cpu_small" and "error" not in r]
    rate = (ok[-1]["img_per_s_warm"] if ok else 1000.0) / 2.25  # 96/48 px crops cost ~2.25x the 64/32 px ones
    report["timed_run"] = timed_run(args.data, args.out, args.device, args.minutes, rate, args.workers)
    (args.out / "gpu_train.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["timed_run"], default=str)[:2000])


if __name__ == "__main__":
    main()
