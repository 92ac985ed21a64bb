"""k-NN top-1 against wall-clock time for DINO recipes trained from scratch on openclipart.

Each recipe runs ``dinoserve.training.train`` itself (the decoded-image store, batched
tensor crops, the real loss, teacher and schedules) on knn_train + pool for ``--minutes``,
with k-NN (bank knn_train, queries knn_val, k 20, T 0.07) after every epoch, so a curve
shows when a recipe learns, not only where it ends. At the end the teacher is evaluated at
each ``--eval-sizes`` next to raw pixels at the same size, the baseline it must beat.

Results merge into ``results/recipe_curves.json`` (one entry per recipe, with the machine
and its CPU features) and ``results/recipe_curves.png``. Recipes are compared by their
curves; on a shared machine compare epochs and steps as well as minutes (the JSON has
both, and the load average)::

    nice -n 5 .venv/bin/python -m benchmarks.recipe_curves cpu_small vit_tiny_p8 --minutes 15
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from benchmarks.harness import OPENCLIPART_CSV, RESULTS, machine, plot_path, write_json

NAME = "recipe_curves"

#: Recipes: a preset plus overrides. Each says what it tests.
RECIPES: dict[str, dict] = {
    # the shipped CPU preset as it stands
    "cpu_small": dict(preset="cpu_small"),
    # a ViT with 8-px patches at 48/24 px: 6x6 global tokens, about resnet18's cost at 64/32
    "vit_tiny_p8": dict(preset="cpu_small", arch="vit_tiny_patch16_224", patch_size=8, global_crop_size=48,
                        local_crop_size=24, drop_path_rate=0.0),
    # the author's advice for a loss that stays near ln K (dino issue 43): a sharper teacher
    "cpu_small_tt02": dict(preset="cpu_small", teacher_temp=0.02, warmup_teacher_temp=0.02),
    # lightly's small-data ResNet recipe: SGD with momentum, weight decay 5e-4, constant teacher momentum 0.99
    "cpu_small_sgd": dict(preset="cpu_small", optimizer="sgd", lr=0.06, weight_decay=5e-4,
                          weight_decay_end=5e-4, momentum_constant=True, out_dim=2048),
    # clip art sits on white: "pad" keeps the whole object (border trimmed) where "crop" cuts
    # it, and raw pixels gain 7 points from it (53.6 -> 60.3 % at 64 px)
    "cpu_small_pad": dict(preset="cpu_small", fit="pad"),
    # fewer prototypes: with ~6.5k images and ~250 steps per run, 1024 prototypes leave the
    # teacher near uniform (entropy 5.5 of ln 1024 = 6.9); 256 have more images each
    "cpu_small_k256": dict(preset="cpu_small", out_dim=256),
    # no local crops: on clip art a 5-25 % crop is often a flat patch of one colour that
    # cannot predict the whole image's prototype; two global crops also make a step ~2.5x cheaper
    "cpu_small_nolocal": dict(preset="cpu_small", local_crops=0),
    "cpu_small_pad_sgd": dict(preset="cpu_small", fit="pad", optimizer="sgd", lr=0.06, weight_decay=5e-4,
                              weight_decay_end=5e-4, momentum_constant=True, out_dim=2048),
}


def run_recipe(name: str, minutes: float, epochs: int, eval_sizes: list[int], out_root: Path) -> dict:
    from dinoserve.models import load_backbone
    from dinoserve.training import make_config, train
    from dinoserve.training.knn import evaluate_knn_set, prepare_knn_set

    spec = dict(RECIPES[name])
    preset = spec.pop("preset")
    out = out_root / f"{name}-{int(time.time())}"
    cfg = make_config(preset, data=str(OPENCLIPART_CSV), split=("knn_train", "pool"), out=str(out),
                      knn_data=str(OPENCLIPART_CSV), knn_every=1, time_limit=minutes, epochs=epochs,
                      progress=False, plan_to_time_limit=False, **spec)
    t0 = time.time()
    result = train(cfg)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = next(r["time"] for r in rows if r["event"] == "start")
    curve = [{"minutes": round((r["time"] - start) / 60, 2), "epoch": r["epoch"] + 1, "step": r["step"],
              "top1": r["top1"]} for r in rows if r["event"] == "knn"]
    final = {}
    teacher = load_backbone(str(out / "checkpoint.pth"))
    for size in eval_sizes:
        knn_set = prepare_knn_set(OPENCLIPART_CSV, size, fit=cfg.fit)  # raw pixels fitted the same way
        final[str(size)] = {"teacher": evaluate_knn_set(teacher, knn_set).top1,
                            "raw_pixels": evaluate_knn_set(None, knn_set).top1}
    return {"recipe": RECIPES[name], "config": cfg.to_dict(), "wall_minutes": round((time.time() - t0) / 60, 1),
            "steps": result.steps, "epochs_done": result.epochs_done, "final_loss": result.final_loss,
            "images_per_second": result.images_per_second, "data_wait_share": result.data_wait_share,
            "precision": result.precision, "curve": curve, "final_top1_by_eval_size": final,
            "load_avg_after": machine()["load_avg_1_5_15"]}


def plot(results: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    raw = None
    for name, r in results["recipes"].items():
        if r["curve"]:
            ax.plot([p["minutes"] for p in r["curve"]], [p["top1"] for p in r["curve"]], marker="o", label=name)
        raw = raw or r["final_top1_by_eval_size"].get(str(r["config"]["global_crop_size"]), {}).get("raw_pixels")
    if raw:
        ax.axhline(raw, color="gray", ls="--", label=f"raw pixels ({raw:.1f} %)")
    ax.set_xlabel("training minutes (this machine)")
    ax.set_ylabel("k-NN top-1 on openclipart (%)")
    ax.set_title("DINO from scratch: k-NN against wall-clock time")
    ax.grid(alpha=0.3)
    ax.legend()
    path = plot_path(NAME)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", choices=sorted(RECIPES))
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget per recipe")
    ap.add_argument("--epochs", type=int, default=6, help="epochs the schedules span (the time limit may stop earlier)")
    ap.add_argument("--eval-sizes", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--out", type=Path, default=Path("runs/recipe_curves"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = RESULTS / f"{NAME}.json"
    for name in args.recipes:
        entry = run_recipe(name, args.minutes, args.epochs, args.eval_sizes, args.out)
        results = json.loads(path.read_text()) if path.is_file() else {"recipes": {}}
        results["recipes"][name] = entry
        results["machine"] = machine()
        write_json(NAME, results)
        plot(results)
        logging.info("%s: %s", name, json.dumps({k: entry[k] for k in ("steps", "epochs_done", "final_top1_by_eval_size")}))


if __name__ == "__main__":
    main()
