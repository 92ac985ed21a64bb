"""The paper's three teacher choices side by side on the same small budget.

``ema``    momentum teacher (EMA of the student's parameters, cosine momentum to 1);
``epoch``  the teacher is the student of the previous epoch, frozen for an epoch;
``copy``   the teacher is the student after every step (the paper: does not converge).

Each runs ``dinoserve.training.train`` with the cpu_small preset, the same seed, images (a fixed
random subset of openclipart knn_train + pool) and number of epochs; the teacher backbone
is k-NN evaluated after every epoch on the openclipart protocol (bank knn_train, queries
knn_val). Loss and teacher-entropy curves come from each run's log.jsonl.
Results: results/teacher_update.{json,png}.

    nice -n 10 .venv/bin/python -m benchmarks.teacher_update --epochs 6 --images 1024
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import tempfile
import time
from pathlib import Path

from benchmarks.harness import OPENCLIPART_CSV, machine, plot_path, write_json
from dinoserve.training import make_config, train
from dinoserve.filelist import read_file_list

NAME = "teacher_update"
MODES = ("ema", "epoch", "copy")
log = logging.getLogger(NAME)


def _subset_csv(n: int, folder: Path, source: str | None, root: str | None) -> Path:
    """A file list of ``n`` random images (absolute paths) of ``source`` (default: openclipart
    knn_train + pool, never knn_val)."""
    if source is None:
        entries = read_file_list(OPENCLIPART_CSV, splits=["knn_train", "pool"])
    else:
        entries = read_file_list(source, root=root)
    random.Random(0).shuffle(entries)
    path = folder / "subset.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "category", "split"])
        for e in entries[:n]:
            w.writerow([str(e.path), "", "train"])
    return path


def run(mode: str, data: Path, out: Path, epochs: int, extra: dict) -> dict:
    t0 = time.time()
    cfg = make_config("cpu_small", data=str(data), out=str(out), epochs=epochs, teacher_update=mode,
                      knn_data=str(OPENCLIPART_CSV), knn_every=1, log_every=1, progress=False, **extra)
    result = train(cfg)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "step"]
    knn = [r for r in rows if r["event"] == "knn"]
    return {
        "mode": mode, "wall_s": round(time.time() - t0, 1), "epochs": epochs,
        "steps": result.steps, "img_per_s": result.images_per_second,
        "epoch_loss": result.epoch_losses,
        "knn_top1": [r["top1"] for r in knn], "knn_top5": [r["top5"] for r in knn],
        "final_knn_top1": knn[-1]["top1"] if knn else None,
        "step_loss": [round(r["loss"], 4) for r in steps],
        "teacher_entropy": [round(r["teacher_entropy"], 4) for r in steps],
        "teacher_mean_entropy": [round(r["teacher_mean_entropy"], 4) for r in steps],
        "warnings": [r["message"] for r in rows if r["event"] == "warning"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--images", type=int, default=1024, help="training images (random knn_train + pool subset)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--recipe", default="{}", help="JSON overrides of the cpu_small preset, the same for every mode")
    ap.add_argument("--data", default=None, help="file list to train on (default: the original openclipart files)")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args(argv)
    recipe = {"arch": args.arch, **json.loads(args.recipe)}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    runs = []
    with tempfile.TemporaryDirectory(prefix="dino_teacher_") as tmp:
        data = _subset_csv(args.images, Path(tmp), args.data, args.data_root)
        for mode in args.modes:
            r = run(mode, data, Path(tmp) / mode, args.epochs, recipe)
            r["load_avg_1min"] = machine()["load_avg_1_5_15"][0]
            runs.append(r)
            log.info("%s: k-NN top-1 per epoch %s, epoch losses %s (%.0f s)", mode,
                     [round(v, 1) for v in r["knn_top1"]], [round(v, 3) for v in r["epoch_loss"]], r["wall_s"])
    write_json(NAME, {"preset": "cpu_small", "recipe": recipe, "data": args.data or str(OPENCLIPART_CSV),
                      "images": args.images, "epochs": args.epochs,
                      "knn_protocol": "openclipart knn_train -> knn_val, k=20, T=0.07, eval at the training size",
                      "runs": runs, "machine": machine()})
    _plot(runs)


def _plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        a.plot(range(1, len(r["step_loss"]) + 1), r["step_loss"], label=r["mode"], lw=1)
        b.plot(range(1, len(r["knn_top1"]) + 1), r["knn_top1"], marker="o", label=r["mode"])
    a.set_xlabel("step")
    a.set_ylabel("DINO loss")
    a.set_title("loss")
    b.set_xlabel("epoch")
    b.set_ylabel("k-NN top-1 (%)")
    b.set_title("openclipart k-NN (teacher backbone)")
    for ax in (a, b):
        ax.legend()
    fig.tight_layout()
    fig.savefig(plot_path(NAME), dpi=110)


if __name__ == "__main__":
    main()
