"""k-NN top-1 on the openclipart protocol: raw pixels, random init, and cpu_small DINO training.

Protocol (data/README of the shared data; data/openclipart_knn.csv here): bank = knn_train
(1,337 images), queries = knn_val (345), 23 classes, k = 20, T = 0.07, L2-normalised
features. Training may use knn_train + pool, never knn_val.

Stages, each adding to ``results/knn_openclipart.json``:

``baselines``  raw pixels (our centre-crop transform and the README's letterbox-on-white
               variant that gave its 55.2 %) and randomly initialised backbones.
``train``      a cpu_small run on knn_train + pool in segments of ``--segment`` minutes
               (time-limited runs resumed exactly), the teacher evaluated after each
               segment: a curve of k-NN top-1 over training minutes.

Needs ``apt-get install -y openclipart-png``. Run it niced, e.g.::

    nice -n 10 .venv/bin/python -m benchmarks.knn_openclipart baselines
    nice -n 10 .venv/bin/python -m benchmarks.knn_openclipart train --minutes 30 --segment 5
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import OPENCLIPART_CSV, RESULTS, machine, plot_path, write_json
from dinoserve.images import load_image
from dinoserve.models import create_backbone, load_backbone
from dinoserve.filelist import read_file_list
from dinoserve.training.knn import KnnSet, evaluate_knn_set, knn_scores, labelled_items, prepare_knn_set, raw_pixel_features

NAME = "knn_openclipart"
EVAL_SIZE = 112  # the protocol's evaluation size (data README)
log = logging.getLogger(NAME)


def _load_results() -> dict:
    path = RESULTS / f"{NAME}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(results: dict) -> None:
    results["machine"] = machine()
    write_json(NAME, results)


# --- baselines ------------------------------------------------------------------------------


def _letterbox(path: Path, size: int) -> np.ndarray | None:
    """The README's reference transform: fit the longer side, pad on white to a square."""
    try:
        img = load_image(path)
    except Exception:  # noqa: BLE001 - unreadable images are skipped, as in the protocol
        return None
    scale = size / max(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img.resize((w, h), Image.Resampling.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return np.asarray(canvas, np.uint8).transpose(2, 0, 1)


def _letterbox_set(size: int) -> KnnSet:
    bank_items, query_items = labelled_items(OPENCLIPART_CSV)
    classes = sorted({c for _, c in bank_items})
    index = {c: i for i, c in enumerate(classes)}

    def load(items):
        arrays, labels = [], []
        for path, cls in items:
            arr = _letterbox(path, size)
            if arr is not None:
                arrays.append(arr)
                labels.append(index[cls])
        return np.stack(arrays), np.array(labels, np.int64)

    bp, bl = load(bank_items)
    qp, ql = load(query_items)
    return KnnSet(bp, bl, qp, ql, classes, size)


def baselines(results: dict) -> None:
    torch.manual_seed(0)
    rows = []
    t0 = time.time()
    sets = {
        "centre crop 0.875 (dinoserve eval transform)": prepare_knn_set(OPENCLIPART_CSV, EVAL_SIZE),
        "centre crop 1.0 (shorter side = size)": prepare_knn_set(OPENCLIPART_CSV, EVAL_SIZE, crop_pct=1.0),
        "letterbox on white (data README reference)": _letterbox_set(EVAL_SIZE),
    }
    log.info("decoded the three variants in %.1f s", time.time() - t0)
    for transform, knn_set in sets.items():
        for centre in ("image", "bank"):
            bank = raw_pixel_features(knn_set.bank_pixels, centre=centre)
            queries = raw_pixel_features(knn_set.query_pixels, reference=knn_set.bank_pixels, centre=centre)
            r = knn_scores(bank, queries, knn_set)
            rows.append({"features": f"raw pixels (centred per {centre})", "transform": transform, **r.to_dict()})
            log.info("raw pixels centred per %s, %s: %.1f %%", centre, transform, r.top1)
    main = sets["centre crop 0.875 (dinoserve eval transform)"]
    for arch, kwargs in (("resnet18", {}), ("vit_tiny_patch16_224", {"img_size": EVAL_SIZE})):
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = create_backbone(arch, **kwargs)
            for transform in ("centre crop 0.875 (dinoserve eval transform)",
                              "letterbox on white (data README reference)"):
                r = evaluate_knn_set(model, sets[transform], batch_size=64)
                rows.append({"features": f"random-init {arch} (seed {seed})", "transform": transform,
                             **r.to_dict()})
                log.info("random %s seed %d, %s: %.1f %%", arch, seed, transform, r.top1)
    results["baselines"] = {"image_size": EVAL_SIZE, "n_bank": len(main.bank_labels),
                            "n_query": len(main.query_labels), "skipped": len(main.skipped), "rows": rows}


# --- training curve ---------------------------------------------------------------------------

CACHE_SIDE = 128  # shorter side of the pre-shrunk training copy: 2x the 64 px global crop


def shrunk_copy(folder: Path, side: int = CACHE_SIDE) -> tuple[Path, dict]:
    """Decode knn_train + pool once into small PNGs under ``folder`` (same relative layout)
    and write a file list for them. Training then decodes 128-px images instead of clip art
    of up to 89 megapixels; unreadable images are left out here, as training would skip them."""
    from concurrent.futures import ThreadPoolExecutor

    from dinoserve.filelist import default_root

    entries = read_file_list(OPENCLIPART_CSV, splits=["knn_train", "pool"])
    root = default_root(OPENCLIPART_CSV)
    csv_path = folder / "train_list.csv"
    if csv_path.is_file():
        return csv_path, json.loads((folder / "cache_info.json").read_text())
    t0 = time.time()

    def one(entry) -> str | None:
        rel = entry.path.relative_to(root)
        try:
            img = load_image(entry.path)
        except Exception:  # noqa: BLE001 - unreadable: skipped and counted
            return None
        f = side / min(img.size)
        if f < 1:
            img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BICUBIC)
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        img.save(target)
        return rel.as_posix()

    with ThreadPoolExecutor(2) as pool:
        kept = [r for r in pool.map(one, entries) if r is not None]
    with open(csv_path.with_suffix(".tmp"), "w") as f:
        f.write("path,category,split\n" + "".join(f"{r},,train\n" for r in kept))
    csv_path.with_suffix(".tmp").replace(csv_path)
    info = {"images": len(kept), "skipped": len(entries) - len(kept), "side": side,
            "seconds": round(time.time() - t0, 1)}
    (folder / "cache_info.json").write_text(json.dumps(info))
    return csv_path, info


def _evaluate_checkpoint(ckpt: Path, knn_set: KnnSet) -> float:
    model = load_backbone(ckpt)  # the teacher, as every consumer gets it
    return evaluate_knn_set(model, knn_set, batch_size=128).top1


def train_curve(results: dict, args) -> None:
    from dinoserve.training import config_from_checkpoint, make_config, train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data, cache = shrunk_copy(work / "cache")
    log.info("training copy: %s", cache)
    recipe = json.loads(args.recipe)
    out = work / args.name
    curve_set = prepare_knn_set(OPENCLIPART_CSV, args.eval_size)
    torch.manual_seed(recipe.get("seed", 0))  # the engine's first draw: the student = teacher init
    arch = recipe.get("arch", make_config("cpu_small").arch)
    init = create_backbone(arch, **({"img_size": recipe.get("global_crop_size", 64)} if arch.startswith("vit") else {}))
    points = [{"minutes": 0.0, "top1": evaluate_knn_set(init, curve_set).top1}]
    raw = {centre: knn_scores(raw_pixel_features(curve_set.bank_pixels, centre=centre),
                              raw_pixel_features(curve_set.query_pixels, curve_set.bank_pixels, centre=centre),
                              curve_set).top1 for centre in ("image", "bank")}
    run = {"name": args.name, "recipe": recipe, "segment_minutes": args.segment, "cache": cache,
           "eval_size_curve": args.eval_size, "points": points, "load_avg": [],
           "raw_pixels_at_curve_size": raw}
    results.setdefault("runs", {})[args.name] = run
    trained_minutes = 0.0
    segments = int(round(args.minutes / args.segment))
    for i in range(segments):
        t0 = time.time()
        if i == 0:
            cfg = make_config("cpu_small", data=str(data), data_root=str(work / "cache"), out=str(out),
                              time_limit=args.segment, progress=False, **recipe)
        else:
            cfg = config_from_checkpoint(str(out), time_limit=args.segment, progress=False)
        r = train(cfg)
        trained_minutes += (time.time() - t0) / 60
        top1 = _evaluate_checkpoint(out / "checkpoint.pth", curve_set)
        points.append({"minutes": round(trained_minutes, 2), "top1": top1, "steps": r.steps,
                       "epochs_done": r.epochs_done, "loss": r.final_loss, "img_per_s": r.images_per_second})
        run["load_avg"].append(machine()["load_avg_1_5_15"])
        log.info("segment %d: %.1f min trained, %d steps, loss %.3f, k-NN top-1 %.1f %% (%.0f img/s)",
                 i + 1, trained_minutes, r.steps, r.final_loss or float("nan"), top1, r.images_per_second)
        _save(results)
        if r.epochs_done >= cfg.epochs:
            break
    # the final checkpoint under every transform of the baselines
    model = load_backbone(out / "checkpoint.pth")
    final = {}
    for size in sorted({args.eval_size, EVAL_SIZE}):
        final[f"centre crop 0.875 @ {size}"] = evaluate_knn_set(model, prepare_knn_set(OPENCLIPART_CSV, size)).top1
        final[f"letterbox @ {size}"] = evaluate_knn_set(model, _letterbox_set(size)).top1
    run["final"] = final
    run["checkpoint"] = str(out / "checkpoint.pth")
    log.info("final: %s", final)


def _plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in results.get("runs", {}).items():
        pts = [p for p in run["points"] if p["top1"] is not None]
        if pts:
            ax.plot([p["minutes"] for p in pts], [p["top1"] for p in pts], marker="o",
                    label=f"DINO {name} (teacher, {run['eval_size_curve']} px)")
    styles = iter(["--", ":", "-.", (0, (1, 3)), (0, (5, 1)), (0, (3, 1, 1, 1))])
    for name, run in results.get("runs", {}).items():
        raw = run.get("raw_pixels_at_curve_size", {}).get("image")
        if raw is not None:
            ax.axhline(raw, color="tab:red", lw=1.5, label=f"raw pixels (centred per image), centre crop 0.875 @ {run['eval_size_curve']} px")
            break
    for row in results.get("baselines", {}).get("rows", []):
        if "seed 1" in row["features"] or "per bank" in row["features"] or "vit" in row["features"]:
            continue
        ax.axhline(row["top1"], ls=next(styles, "--"), lw=1, color="grey",
                   label=f"{row['features'].replace(' (seed 0)', '')}, {row['transform'].split(' (')[0]} @ {EVAL_SIZE} px")
    ax.set_xlabel("training minutes (2 shared CPU cores)")
    ax.set_ylabel("k-NN top-1 on knn_val (%)")
    ax.set_title("openclipart k-NN (23 classes, k=20, T=0.07)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(plot_path(NAME), dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["baselines", "train", "plot"])
    ap.add_argument("--minutes", type=float, default=30, help="training budget (train stage)")
    ap.add_argument("--segment", type=float, default=5, help="minutes between k-NN evaluations")
    ap.add_argument("--recipe", default="{}", help="JSON overrides of the cpu_small preset")
    ap.add_argument("--name", default="cpu_small", help="run name (results key and output folder)")
    ap.add_argument("--work", default="/tmp/dinoserve_knn_bench", help="cache and run folder")
    ap.add_argument("--eval-size", type=int, default=64, help="k-NN size along the curve")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = _load_results()
    if args.stage == "baselines":
        baselines(results)
    elif args.stage == "train":
        train_curve(results, args)
    if args.stage != "plot":
        _save(results)
    _plot(results)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1)[:3000])


if __name__ == "__main__":
    main()
