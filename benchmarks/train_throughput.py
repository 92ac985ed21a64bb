"""Training throughput at the cpu_small preset: what a DINO step costs over a bare step.

For each architecture (resnet18, vit_tiny_patch16_224) and precision (fp32, and bf16 where
the CPU supports it), three measurements on the same cpu_small crops (2 x 64 px global +
4 x 32 px local, batch 64):

``bare``   the student alone (backbone + DINO head, the network being trained): forward on
           all crops, a trivial loss, backward, AdamW step. Crops are held in memory.
``step``   the trainer's own ``dino_step`` on the same in-memory crops: teacher forward on the
           global crops, student forward, DINO loss with centering, backward, per-parameter
           clipping, last-layer freeze, optimizer step, center update, teacher EMA and the
           teacher-entropy statistics it logs.
``train``  ``dinoserve.training.train`` itself (cpu_small, DataLoader workers decoding openclipart
           images), timed between log lines after warm-up steps: everything a user gets.

Each figure is a median over steps (``bare`` and ``step`` run in turns), because the
machine is shared and other processes come and go.

Ratios ``step / bare`` and ``train / bare`` (time per image) say what the teacher, loss and
EMA cost, and what data loading adds on top. Results: results/train_throughput.{json,png}.

    nice -n 10 .venv/bin/python -m benchmarks.train_throughput [--steps 8] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import OPENCLIPART_CSV, machine, median_seconds_in_turns, plot_path, write_json
from dinoserve.images import load_image
from dinoserve.filelist import read_file_list
from dinoserve.training import make_config, train
from dinoserve.training.augment import MultiCropAugment
from dinoserve.training.config import apply_overrides
from dinoserve.training.distributed import DistInfo
from dinoserve.training.engine import dino_step, make_run
from dinoserve.training.optim import set_lr_and_weight_decay
from dinoserve.training.precision import autocast, cpu_supports_bf16

NAME = "train_throughput"
ARCHS = ("resnet18", "vit_tiny_patch16_224")
log = logging.getLogger(NAME)


def _crops(cfg, n_batches: int) -> list[list[torch.Tensor]]:
    """``n_batches`` batches of cpu_small multi-crop views of real openclipart images."""
    entries = read_file_list(OPENCLIPART_CSV, splits="pool")
    rng = random.Random(0)
    rng.shuffle(entries)
    aug = MultiCropAugment(cfg.global_crop_size, cfg.global_crop_scale, cfg.local_crops,
                           cfg.local_crop_size, cfg.local_crop_scale)
    views = []
    for e in entries:
        if len(views) == n_batches * cfg.batch_size:
            break
        try:
            img = load_image(e.path)
        except Exception:  # noqa: BLE001 - skip unreadable images, as training does
            continue
        img.thumbnail((256, 256))
        views.append(aug(img, rng))
    return [[torch.stack([v[i] for v in views[b * cfg.batch_size:(b + 1) * cfg.batch_size]])
             for i in range(len(views[0]))] for b in range(n_batches)]


def measure_in_memory(cfg, precision: str, batches, warmup: int, steps: int) -> dict[str, float]:
    """Median seconds per ``bare`` step and per ``dino_step`` (the trainer's own) on the
    run's networks and optimizer, taking turns."""
    cfg = apply_overrides(cfg, {"precision": precision, "device": "cpu", "seed": 0})
    run = make_run(cfg, DistInfo())  # the networks, loss and optimizer training builds
    student, device = run.nets.student, run.info.device
    run.nets.student.train()
    run.nets.teacher.train()
    set_lr_and_weight_decay(run.optimizer, 1e-4, cfg.weight_decay)

    def bare(crops):
        with autocast(run.precision, device):
            out = student(crops)
        loss = out.float().logsumexp(dim=-1).mean()
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()

    t = median_seconds_in_turns({"bare": lambda i: bare(batches[i % len(batches)]),
                                 "step": lambda i: dino_step(run, batches[i % len(batches)], 1, 0.996)},
                                steps, warmup=warmup)
    return {"bare_s_per_step": t["bare"], "step_s_per_step": t["step"]}


def measure_train(cfg_kwargs: dict, precision: str, warmup: int, steps: int, data: dict) -> float:
    """Median seconds per step of ``dinoserve.training.train``: the gaps between the log lines of
    steps ``warmup`` ... ``warmup + steps``."""
    with tempfile.TemporaryDirectory(prefix="dino_tp_") as out:
        train(make_config("cpu_small", out=out, precision=precision, max_steps=warmup + steps, log_every=1,
                          progress=False, **data, **cfg_kwargs))
        rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in rows if r["event"] == "step"}
    return statistics.median([times[i + 1] - times[i] for i in range(warmup, warmup + steps)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--data", choices=["original", "shrunk"], default="shrunk",
                    help="train() on the original openclipart files (decoding clip art of up to 89 "
                         "megapixels per image) or on the 128-px copy made by knn_openclipart.py")
    ap.add_argument("--shrunk-dir", default="/tmp/dinoserve_knn_bench/cache")
    args = ap.parse_args(argv)
    if args.data == "shrunk":
        data = {"data": f"{args.shrunk_dir}/train_list.csv", "data_root": args.shrunk_dir}
    else:
        data = {"data": str(OPENCLIPART_CSV), "split": ("pool",)}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("training").setLevel(logging.WARNING)

    precisions = ["fp32"] + (["bf16"] if cpu_supports_bf16() else [])
    base = make_config("cpu_small")
    batches = _crops(base, 3)
    rows = []
    for arch in args.archs:
        cfg = make_config("cpu_small", arch=arch)
        for precision in precisions:
            t0 = time.time()
            r = measure_in_memory(cfg, precision, batches, args.warmup, args.steps)
            r["train_s_per_step"] = measure_train({"arch": arch}, precision, args.warmup, args.steps, data)
            bs = cfg.batch_size
            row = {"arch": arch, "precision": precision, "batch_size": bs,
                   **{k.replace("_s_per_step", "_img_per_s"): bs / v for k, v in r.items()},
                   "step_over_bare": r["step_s_per_step"] / r["bare_s_per_step"],
                   "train_over_bare": r["train_s_per_step"] / r["bare_s_per_step"],
                   "load_avg_1min": machine()["load_avg_1_5_15"][0], "wall_s": round(time.time() - t0, 1)}
            rows.append(row)
            log.info("%s %s: bare %.1f img/s, DINO step %.1f img/s (x%.2f), train() %.1f img/s (x%.2f)",
                     arch, precision, row["bare_img_per_s"], row["step_img_per_s"], row["step_over_bare"],
                     row["train_img_per_s"], row["train_over_bare"])
    for row in rows:
        if row["precision"] == "bf16":
            fp32 = next(r for r in rows if r["arch"] == row["arch"] and r["precision"] == "fp32")
            row["train_speedup_vs_fp32"] = row["train_img_per_s"] / fp32["train_img_per_s"]
    crops = {"global": f"2 x {base.global_crop_size} px", "local": f"{base.local_crops} x {base.local_crop_size} px"}
    result = {"preset": "cpu_small", "crops": crops, "steps": args.steps, "warmup": args.warmup,
              "train_data": args.data,
              "rows": rows, "machine": machine()}
    write_json(NAME, result)
    _plot(rows)
    print(json.dumps(rows, indent=1))


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['arch'].split('_patch')[0]}\n{r['precision']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.27
    for i, (key, name) in enumerate([("bare_img_per_s", "bare student step"), ("step_img_per_s", "DINO step (in memory)"),
                                     ("train_img_per_s", "training.train (with data loading)")]):
        ax.bar([j + (i - 1) * w for j in x], [r[key] for r in rows], w, label=name)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("images / s")
    ax.set_title("cpu_small training throughput (2 shared CPU cores)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_path(NAME), dpi=110)


if __name__ == "__main__":
    main()
