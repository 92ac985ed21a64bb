"""Long DINO runs on a borrowed GPU: pack the data here, train there, bring the teachers back.

A GPU machine is lent rarely, for minutes, cannot reach the openclipart package and brings
back at most eight files of 16 MiB. So the run is prepared in three steps:

1. ``pack`` (here): the training images (openclipart ``knn_train`` + ``pool``) as square PNG
   thumbnails, fitted exactly as the decoded-image store fits them, and the labelled k-NN
   images as a ``train/<class>/`` + ``val/<class>/`` folder, into one folder that travels::

       python -m benchmarks.gpu_long_run pack gpu_data --size 96

   96 px keeps the folder (about 32 MiB) and the repository inside the 64 MiB that travels;
   the k-NN bank images are symbolic links into the training images.

2. ``run`` (on the GPU machine): every recipe of :data:`RECIPES` as its own ``dinoserve train``
   process, all at once on the one GPU (a resnet18 at 64-96 px leaves an H200 mostly idle,
   so three runs cost about what one does), each planned by ``--plan-to-time-limit`` so its
   cosine ends inside ``--minutes``, k-NN on the thumbnails every ``--knn-every`` epochs.
   Each teacher backbone comes back as fp16 safetensors halves, with the logs::

       python -m benchmarks.gpu_long_run run --data gpu_data --out $OUT --minutes 6

3. ``adopt`` (here): join the halves into one ``.safetensors`` per recipe under ``runs/gpu``
   with the run's model card, ready for ``benchmarks/long_run.py`` to measure and ship.

The thumbnails make the GPU's k-NN a proxy (the images are resampled twice); the numbers
that count are measured here on the full-resolution protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.harness import OPENCLIPART_CSV, RESULTS, read_log, write_json

#: What the teachers may take of the 64 MiB that comes back (a resnet18 in fp16 is 22 MB, so
#: two of them and a vit_tiny fit; a third resnet18 does not).
RETURN_BYTES = 60 * 2**20

#: Each recipe: ``dinoserve train`` options (besides data, output, time and k-NN). Why each:
RECIPES: dict[str, list[str]] = {
    # lightly's small-data DINO recipe (87.3 % k-NN on Imagenette after 200 epochs at
    # 128/64 px): SGD, K 2048, BN head, constant teacher momentum 0.99; crops at 96/48 px.
    # (from the 96-px thumbnails that travel: the store is not 1.5x the crop here)
    "r18_sgd_96": ["-p", "cpu_small", "--global-crop-size", "96", "--local-crop-size", "48", "--local-crops", "6",
                   "--store-size", "96",
                   "--optimizer", "sgd", "--lr", "0.06", "--weight-decay", "5e-4", "--weight-decay-end", "5e-4",
                   "--momentum-teacher", "0.99", "--momentum-constant", "--out-dim", "2048",
                   "--warmup-epochs", "10", "--knn-image-size", "96"],
    # the same at the CPU's 64/32 px, so the CPU long run and the demo can continue it cheaply
    "r18_sgd_64": ["-p", "cpu_small", "--local-crops", "6", "--store-size", "96",
                   "--optimizer", "sgd", "--lr", "0.06", "--weight-decay", "5e-4", "--weight-decay-end", "5e-4",
                   "--momentum-teacher", "0.99", "--momentum-constant", "--out-dim", "2048",
                   "--warmup-epochs", "10", "--knn-image-size", "64"],
    # a ViT (learned CLS attention maps for the app) at about resnet18's cost: 8-px patches
    # at 64/32 px (8x8 global tokens); the reference's AdamW recipe with a long warmup
    "vit_tiny_p8_64": ["-p", "cpu_small", "-a", "vit_tiny_patch16_224", "--patch-size", "8",
                       "--local-crops", "6", "--store-size", "96", "--out-dim", "2048", "--lr", "5e-4",
                       "--warmup-epochs", "10", "--weight-decay", "0.04", "--weight-decay-end", "0.4",
                       "--drop-path-rate", "0.1", "--momentum-teacher", "0.996", "--no-use-bn-in-head",
                       "--knn-image-size", "64"],
}
# Larger batches: a resnet18 step at 64-96 px is bound by kernel launches on an H200 (about
# 730 img/s per process at batch 256 with three processes sharing it), so a larger batch
# should buy epochs per minute; the trainer scales the learning rate by batch / 256.
RECIPES["r18_sgd_64_b1024"] = RECIPES["r18_sgd_64"] + ["-b", "1024"]
RECIPES["r18_sgd_64_b512"] = RECIPES["r18_sgd_64"] + ["-b", "512"]
RECIPES["r18_sgd_96_b1024"] = RECIPES["r18_sgd_96"] + ["-b", "1024"]


def pack(target: Path, size: int) -> None:
    """Thumbnails of the training images and a labelled k-NN folder, fitted as the store fits."""
    from PIL import Image

    from dinoserve.filelist import read_file_list
    from dinoserve.images import preprocess_batch

    entries = read_file_list(OPENCLIPART_CSV)
    train = {i: target / "train" / f"{i:05d}.png" for i, e in enumerate(entries) if e.split in ("knn_train", "pool")}
    val = {i: target / "knn" / "val" / e.category / f"{i:05d}.png" for i, e in enumerate(entries)
           if e.split == "knn_val"}
    jobs = [(entries[i].path, out) for i, out in {**train, **val}.items()]
    for start in range(0, len(jobs), 256):
        chunk = jobs[start:start + 256]
        pixels, kept, bad = preprocess_batch([p for p, _ in chunk], size, 1.0, on_error="skip", workers=2)
        for row, k in zip(pixels, kept):
            out = chunk[k][1]
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(row.transpose(1, 2, 0)).save(out, optimize=True)
        for k, reason in bad:
            print(f"skipped {chunk[k][0]}: {reason}", file=sys.stderr)
        print(f"{min(start + 256, len(jobs))}/{len(jobs)}", flush=True)
    for i, e in enumerate(entries):  # the k-NN bank is part of the training images: links, not copies
        if e.split == "knn_train" and train[i].is_file():
            link = target / "knn" / "train" / e.category / train[i].name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(train[i], link.parent))
    total = sum(p.stat().st_size for p in target.rglob("*.png"))
    print(f"{target}: {sum(1 for _ in target.rglob('*.png'))} PNGs, {total / 2**20:.1f} MiB")


def run(data: Path, out: Path, minutes: float, knn_every: int, batch: int, recipes: list[str],
        epochs: int | None = None) -> None:
    """All recipes at once, one process each; then the teachers and logs into ``out``.

    ``epochs`` fixes every schedule (the time limit then only stops a run that is slower
    than planned). Without it each run plans its epochs from its first steps, which
    misplans when the runs start at different moments: a run that times its steps alone
    plans for a GPU it will share, and the time limit stops it long before its planned
    epochs (results/gpu_long_run.json has the measured speeds to plan with)."""
    plan = ["--epochs", str(epochs), "--no-plan-to-time-limit"] if epochs else ["--plan-to-time-limit",
                                                                              "--epochs", "1000"]
    runs = Path("/tmp/gpu_long_run")
    _decode_stores(data / "train", runs / "stores", recipes)
    procs = {}
    for name in recipes:
        cmd = [sys.executable, "-m", "dinoserve", "train", "-q", "-d", str(data / "train"), "-o", str(runs / name),
               "--knn-data", str(data / "knn"), "--knn-every", str(knn_every), "-b", str(batch),
               "--time-limit", str(minutes), *plan,
               "--store-dir", str(runs / "stores"), *RECIPES[name]]
        env = dict(os.environ, OMP_NUM_THREADS="4")
        log = open(out / f"{name}.stderr.txt", "w")
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"started {name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    while any(p.poll() is None for p in procs.values()):
        time.sleep(15)
        for name in procs:
            knn = _knn_rows(runs / name / "log.jsonl")
            last = f"epoch {knn[-1]['epoch'] + 1} top-1 {knn[-1]['top1']:.1f}" if knn else "no k-NN yet"
            print(f"{time.time() - t0:5.0f}s {name}: {last}", flush=True)
    summary = {}
    from benchmarks.gpu_train import save_teacher_halves

    for name, p in procs.items():
        ckpt = runs / name / "checkpoint.pth"
        summary[name] = {"returncode": p.returncode, "knn": _knn_rows(runs / name / "log.jsonl")}
        if not ckpt.is_file():
            continue
        save_teacher_halves(ckpt, out, prefix=name)
        if sum(f.stat().st_size for f in out.glob("*.safetensors")) > RETURN_BYTES:
            # all of $OUT comes back or a file is left out: drop this teacher, keep its log
            for f in out.glob(f"{name}_?.safetensors"):
                f.unlink()
            summary[name]["teacher"] = "not brought back: over the transfer limit"
            print(f"{name}: teacher dropped, the transfer limit is reached", flush=True)
    import torch

    summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary["torch"] = torch.__version__
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:  # one file: the transfer takes eight at most
        for name in procs:
            tar.add(runs / name / "log.jsonl", arcname=f"{name}/log.jsonl")
            tar.add(out / f"{name}.stderr.txt", arcname=f"{name}/stderr.txt")
    for name in procs:
        (out / f"{name}.stderr.txt").unlink()
    print(json.dumps({k: (v["returncode"], v["knn"][-1:]) for k, v in summary.items() if isinstance(v, dict)}))


def _decode_stores(images: Path, store_dir: Path, recipes: list[str]) -> None:
    """Decode every store the recipes will crop from before any of them starts, so that
    all start together and each times its first steps (--plan-to-time-limit) under the
    load of the others, not alone."""
    from dinoserve.filelist import find_images
    from dinoserve.training.store import open_store

    sizes = {int(_option(RECIPES[name], "--store-size", 1.5 * float(_option(RECIPES[name], "--global-crop-size", 64))))
             for name in recipes}  # the trainer's rule (engine.store_size); 64 is cpu_small's crop
    paths = find_images(images)
    for size in sorted(sizes):
        open_store(paths, size, store_dir, workers=8)


def _option(opts: list[str], flag: str, default):
    return opts[opts.index(flag) + 1] if flag in opts else default


def _knn_rows(log: Path) -> list[dict]:
    return [r for r in read_log(log) if r.get("event") == "knn"]


def adopt(src: Path, target: Path) -> None:
    """Each recipe's fp16 halves -> one fp32 ``.safetensors`` with the run's model card."""
    from safetensors.torch import load_file, save_file

    with tarfile.open(src / "logs.tar.gz") as tar:
        tar.extractall(target, filter="data")
        names = sorted({Path(m).parts[0] for m in tar.getnames()})
    _record_runs(src, target, names)
    for first in sorted(src.glob("*_a.safetensors")):
        name = first.name[: -len("_a.safetensors")]
        if not (src / f"{name}_b.safetensors").is_file():  # the transfer left it behind (64 MiB at most)
            print(f"{name}: second half missing; skipped", file=sys.stderr)
            continue
        sd = {**load_file(first), **load_file(src / f"{name}_b.safetensors")}
        start = json.loads((target / name / "log.jsonl").read_text().splitlines()[0])
        card = json.dumps(start["meta"])
        save_file({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                  str(target / name / "teacher.safetensors"), metadata={"format": "dinoserve-shipped-1", "card": card})
        print(target / name / "teacher.safetensors")


def _record_runs(src: Path, target: Path, names: list[str]) -> None:
    """Each run's plan, speed and thumbnail k-NN into results/gpu_long_run.json (runs of
    earlier calls kept, the same name replaced)."""
    path = RESULTS / "gpu_long_run.json"
    report = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    device = json.loads((src / "summary.json").read_text())
    for name in names:
        rows = [json.loads(line) for line in (target / name / "log.jsonl").read_text().splitlines()]
        plan = [r for r in rows if r["event"] == "plan"]
        end = [r for r in rows if r["event"] == "end"]
        report["runs"][name] = {
            "options": RECIPES.get(name), "device": device.get("device"), "torch": device.get("torch"),
            "concurrent_with": [n for n in names if n != name], "minutes": rows[0]["args"]["time_limit"],
            "batch": rows[0]["args"]["batch_size"], "planned_epochs": plan[-1]["epochs"] if plan else None,
            "epochs_done": end[-1]["epochs_done"] if end else None, "stopped_early": end[-1]["stopped_early"] if end else None,
            "img_per_s": end[-1]["images_per_second"] if end else None,
            "final_loss": end[-1]["final_loss"] if end else None,
            "knn_thumbnails": [{k: r[k] for k in ("epoch", "top1", "top1_se", "loo_top1", "loo_top1_se")}
                               for r in rows if r["event"] == "knn"],
            "teacher_returned": (src / f"{name}_b.safetensors").is_file(),
        }
    write_json("gpu_long_run", report)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("target", type=Path)
    p.add_argument("--size", type=int, default=96)
    r = sub.add_parser("run")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--minutes", type=float, default=6.0)
    r.add_argument("--knn-every", type=int, default=20)
    r.add_argument("--batch", type=int, default=256)
    r.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    r.add_argument("--epochs", type=int, help="fixed epochs for every recipe (default: fitted to --minutes)")
    a = sub.add_parser("adopt")
    a.add_argument("src", type=Path)
    a.add_argument("--target", type=Path, default=Path("runs/gpu"))
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(args.target, args.size)
    elif args.cmd == "run":
        args.out.mkdir(parents=True, exist_ok=True)
        run(args.data, args.out, args.minutes, args.knn_every, args.batch, args.recipes, args.epochs)
    else:
        adopt(args.src, args.target)


if __name__ == "__main__":
    main()
