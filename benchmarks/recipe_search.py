"""DINO recipes side by side over a whole short plan (20 epochs), on the low-noise protocol.

Which recipe should the next long run use? Curves of 3-5 epochs could not say: at that
budget random inits alone span 35-44 % k-NN. This benchmark trains each recipe (an *arm*:
``cpu_small`` plus a few options) for a full plan of ``--epochs`` with ``dinoserve train``
itself, on what ``benchmarks/peer_lightly.py`` holds equal (knn_train + pool, the 96 px
store, 2 x 64 px + 6 x 32 px crops, batch 64, fp32, the same seed and so the same images,
order and crop parameters), with k-NN on the fixed split and leave-one-out after every
epoch. Each arm is compared with the baseline arm ``cpu_small`` at every epoch; at the last
one the error is paired (both teachers scored on the same queries), and a gap counts only
beyond twice it.

Each arm is a run of an hour or more on two CPU cores, so the search spans sessions as the
side-by-side does: run folders outside the repository (``$DINOSERVE_RUNS`` or
``~/.cache/dinoserve/runs``, then ``recipe_search_<epochs>e``), resumed exactly, and each
arm's teacher packaged into ``weights/progress/recipe_search_<epochs>e_<arm>_seed<N>.*``
when it stops (commit them), from which a fresh machine goes on. Arms run one after the
other in ``ARMS`` order; results merge into ``results/recipe_search_<epochs>e.json`` and
its ``.png``::

    .venv/bin/python -m benchmarks.recipe_search --epochs 20 --minutes 120            # first session
    .venv/bin/python -m benchmarks.recipe_search --epochs 20 --minutes 120 --resume   # every later one
    .venv/bin/python -m benchmarks.recipe_search --epochs 20 --replot
    .venv/bin/python -m benchmarks.recipe_search --epochs 1 --limit-images 256 --arms cpu_small k256   # smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.harness import OPENCLIPART_CSV, RESULTS, machine, write_json
from benchmarks.long_run import run_dir
from benchmarks.peer_lightly import (KNN_SIZE, dinoserve_config, gaps, knn_row, plot, run_dinoserve,
                                     training_list)
from benchmarks.peer_state import packaged_path

if TYPE_CHECKING:
    from dinoserve.training import TrainConfig

NAME = "recipe_search"
BASELINE = "cpu_small"

#: Each arm: the options it sets on top of the baseline, and why it is worth an hour.
ARMS: dict[str, dict[str, Any]] = {
    # the shipped CPU preset, as the side-by-side runs it: what every arm is compared with
    "cpu_small": {},
    # lightly's recipe in our trainer: SGD 0.06 x 64/256, constant weight decay 5e-4 and
    # teacher momentum 0.99, K 2048, no warmup, no clipping, a normalised last layer, and
    # lightly's end of the cosine (x 0.001). Ours trailed lightly by 4-6 points LOO mid-run
    # in both 50-epoch seeds; if this arm tracks lightly, the recipe is why, not the trainer.
    # Also what the 300-epoch long run used (there at batch 256 with a 10-epoch warmup).
    "lightly_sgd": dict(optimizer="sgd", lr=0.06, min_lr=1.5e-5, weight_decay=5e-4, weight_decay_end=5e-4,
                        momentum_constant=True, out_dim=2048, warmup_epochs=0.0, clip_grad=0.0, norm_last_layer=True),
    # DINO's own crop scales: larger local crops, whose 32 px hold more of an object
    # (clip art on white: a 5-25 % crop is often one flat colour)
    "dino_scales": dict(global_crop_scale=(0.4, 1.0), local_crop_scale=(0.05, 0.4)),
    # K: 6.5k images and ~2k steps may use fewer prototypes, or profit from more
    "k4096": dict(out_dim=4096),
    "k256": dict(out_dim=256),
}

NOTES = [
    "every arm is dinoserve train: preset cpu_small with 6 local crops (benchmarks.peer_lightly.dinoserve_config), "
    "then the arm's options; arms lists them",
    "gaps: arm minus the baseline arm per seed, epoch and protocol; se is paired (std of per-query differences / "
    "sqrt(queries)) at the last epoch, where both runs kept their hits, else the two errors in quadrature (se_kind). "
    "A gap counts only beyond 2 se; neither error covers seed-to-seed spread",
    "final: each arm's last epoch, with its gap to the baseline there (seed by seed)",
    "segments: where a run began, was resumed exactly, or was continued on another machine from its packaged fp16 "
    "teacher; teacher_had_steps_of_first_epoch says how many steps of the epoch it redoes whole that teacher had",
    "left out: fit=pad (it changes the evaluator's input too, so the fixed protocol with it); the small-image stem "
    "and ViTs with 8 px patches (4-10x a resnet18's CPU time per epoch: GPU arms)",
]

log = logging.getLogger(NAME)


def result_name(epochs: int, limit_images: int | None) -> str:
    """The results' file name (no suffix): one per plan length, smoke runs apart."""
    return f"{NAME}_{epochs}e" + (f"_first{limit_images}" if limit_images else "")


def arm_config(base: "TrainConfig", arm: str, out: Path) -> "TrainConfig":
    """``base`` with ``arm``'s options, writing to ``out``; checked as any config is."""
    from dinoserve.training import make_config

    return make_config(None, **{**base.to_dict(), **ARMS[arm], "out": str(out)})


def run_arm(base: "TrainConfig", arm: str, knn_set, run_root: Path, deadline: float = math.inf,
            packaged: Path | None = None) -> dict[str, Any]:
    """One arm's run for ``base.seed``: started, resumed exactly, or continued from
    ``packaged`` (:func:`benchmarks.peer_lightly.run_dinoserve`), until its plan ends or
    ``deadline`` passes."""
    cfg = arm_config(base, arm, run_root / f"{arm}_seed{base.seed}")
    return run_dinoserve(cfg, base.seed, knn_set, deadline, packaged=packaged)


def final_table(runs: dict[str, list[dict]], gap_rows: list[dict]) -> list[dict[str, Any]]:
    """Each arm's last epoch per seed: both protocols, and the gap to the baseline there."""
    out = []
    for arm, arm_runs in runs.items():
        for run in arm_runs:
            last = run["epochs"][-1] if run["epochs"] else None
            if last is None:
                continue
            row = {"arm": arm, "seed": run["seed"], "epoch": last["epoch"], "complete": run.get("complete", False),
                   **{k: last[k] for k in ("split_top1", "split_se", "loo_top1", "loo_se")}}
            for g in gap_rows:
                if (g["arm"], g["seed"], g["epoch"]) == (arm, run["seed"], last["epoch"]):
                    row[f"{g['protocol']}_gap"] = {k: g[k] for k in ("gap", "se", "se_kind", "beyond_2se")}
            out.append(row)
    return out


def compare(results: dict[str, Any]) -> None:
    """Gaps to the baseline and the final table, into ``results``."""
    rows = []
    for arm in results["runs"]:
        if arm != BASELINE:
            rows += [{"arm": arm, **g} for g in gaps(results["runs"], ours=arm, peer=BASELINE, key="gap")]
    results["gaps"] = rows
    results["final"] = final_table(results["runs"], rows)


def save(results: dict[str, Any], measured: bool = True) -> None:
    """Gaps, notes, JSON and picture; ``measured=False`` (a redraw) keeps the machine facts."""
    compare(results)
    results["notes"] = NOTES
    if measured:
        results["machine"] = machine()
    name = result_name(results["epochs"], results["limit_images"])
    write_json(name, results)
    plot(results, name=name, title=f"DINO recipes on openclipart, {results['epochs']}-epoch plans, same store, "
                                   f"crops and batch; each arm against {BASELINE}")


def previous_results(path: Path) -> dict[str, Any] | None:
    """The JSON a search adds to; refused when one of its arms was measured with other options
    than ``ARMS`` now gives it (rename the arm instead of changing it)."""
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    for arm, options in results.get("arms", {}).items():
        now = json.loads(json.dumps(ARMS.get(arm)))  # tuples as the JSON keeps them
        if now != options:
            raise SystemExit(f"{path}: arm {arm!r} was measured with {options}, ARMS now gives {now}; "
                             f"give the changed arm a new name, or remove the file to start the search over")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20, help="the plan every arm trains (its cosine schedules end there)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                    help=f"arms to run, in ARMS order; the baseline {BASELINE} always runs first")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--limit-images", type=int, default=None, help="train on the first N images only (smoke runs)")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: $DINOSERVE_RUNS or "
                                                           "~/.cache/dinoserve/runs, then recipe_search_<epochs>e)")
    ap.add_argument("--resume", action="store_true",
                    help="continue arms that stopped part-way (run folder, or packaged teacher on a new machine)")
    ap.add_argument("--minutes", type=float, default=None, help="stop cleanly after about this many minutes")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG and refresh gaps from the JSON; trains nothing")
    args = ap.parse_args()
    name = result_name(args.epochs, args.limit_images)
    path = RESULTS / f"{name}.json"
    if args.replot:
        if not path.is_file():
            raise SystemExit(f"--replot: {path} does not exist; --epochs picks which search to redraw")
        save(json.loads(path.read_text()), measured=False)
        return
    previous = previous_results(path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from dinoserve.training.knn import evaluate_knn_protocols, prepare_knn_set

    arms = [a for a in ARMS if a in args.arms or a == BASELINE]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    out = args.out or run_dir(name)
    packaged = {(a, s): None if args.limit_images else packaged_path(name, a, s) for a in arms for s in seeds}
    finished = {(a, r["seed"]) for a, runs in (previous or {}).get("runs", {}).items() for r in runs if r.get("complete")}
    held = [str(p) for (a, s), p in packaged.items() if p is not None and p.is_file() and (a, s) not in finished]
    held += [str(p) for a in arms for s in seeds if (p := out / f"{a}_seed{s}" / "checkpoint.pth").is_file()
             and (a, s) not in finished]
    if held and not args.resume:
        raise SystemExit(f"{held[0]} holds a run of this search; --resume continues it, or remove it "
                         f"(and its .json) to start that arm over")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.minutes if args.minutes else math.inf
    knn_set = prepare_knn_set(OPENCLIPART_CSV, KNN_SIZE)
    data = training_list(args.limit_images, out)
    results: dict[str, Any] = previous or {
        "smoke": args.limit_images is not None, "limit_images": args.limit_images, "epochs": args.epochs,
        "baseline": BASELINE, "torch_threads": torch.get_num_threads(),
        "raw_pixels": knn_row(evaluate_knn_protocols(None, knn_set)), "arms": {}, "runs": {}}
    for seed in seeds:
        base = dinoserve_config(data, out, args.epochs, seed)
        results["base_config"] = base.to_dict()
        for arm in arms:
            kept = results["runs"].setdefault(arm, [])
            if (arm, seed) in finished:
                continue
            results["arms"][arm] = ARMS[arm]
            kept[:] = [r for r in kept if r["seed"] != seed]  # a stopped run comes back whole from its folder
            log.info("arm %s seed %d: %s", arm, seed, ARMS[arm] or "the baseline")
            run = run_arm(base, arm, knn_set, out, deadline, packaged[(arm, seed)])
            run["load_avg_after"] = machine()["load_avg_1_5_15"]
            kept.append(run)
            save(results)
            if not run["complete"]:
                log.info("--minutes %s reached: %s seed %d stopped after epoch %d of %d; --resume continues it",
                         args.minutes, arm, seed, len(run["epochs"]), args.epochs)
                return
    for row in results["final"]:
        gaps_here = "  ".join(f"{p} {g['gap']:+.2f} (SE {g['se']:.2f}){' > 2 SE' if g['beyond_2se'] else ''}"
                              for p in ("split", "loo") if (g := row.get(f"{p}_gap")))
        log.info("%s seed %d epoch %d: split %.2f, LOO %.2f  %s", row["arm"], row["seed"], row["epoch"],
                 row["split_top1"], row["loo_top1"], gaps_here)


if __name__ == "__main__":
    main()
