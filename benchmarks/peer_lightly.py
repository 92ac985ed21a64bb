"""lightly's DINO recipe and ``dinoserve train`` side by side, on the same images, crops and evaluator.

Our trainer should stay at or above a peer at every epoch count measured. The peer is
lightly's own small-data DINO recipe, used as a library (never copied): torchvision resnet18
without its fc, ``DINOProjectionHead(512, 2048, 256, 2048, batch_norm=True)``,
``DINOLoss(output_dim=2048)`` with its default temperatures, SGD lr 0.06 x 64/256 = 0.015,
momentum 0.9, weight decay 5e-4 on every parameter, a per-step cosine learning rate
(``CosineWarmupScheduler``, no warmup), and a teacher that follows by EMA with a constant
momentum 0.99 (``update_momentum``). The student sees all crops, the teacher the two global
ones, each crop position forwarded on its own as lightly's examples do.

Ours is ``dinoserve.training.train`` itself (preset ``cpu_small`` with 6 local crops), so the
benchmark measures what users run. What is held equal, so that only the recipe (model, loss,
optimiser) differs:

* the images: knn_train + pool of ``data/openclipart_knn.csv``, one decoded store
  (:func:`dinoserve.training.store.open_store`, 96 px, ``fit="crop"``);
* the crops: the trainer's own :class:`~dinoserve.training.data.TensorBatches` over
  :class:`~dinoserve.training.tensor_augment.BatchMultiCrop` (2 x 64 px global, 6 x 32 px
  local) with the same seed, so both see the same images in the same order with the same
  crop parameters;
* batch 64, the epoch count, the seed, and fp32 arithmetic for both, also on CPUs with AMX
  where our trainer's ``--precision auto`` would pick bf16 (a run that spans sessions may
  meet both kinds of CPU);
* the evaluator: the teacher backbone's features after every epoch, k-NN (k 20, T 0.07) at
  64 px with :func:`~dinoserve.training.knn.evaluate_knn_protocols`, on the fixed split and
  leave-one-out, each with its binomial standard error.

Results go to ``results/peer_lightly_<epochs>e.json`` (per trainer, seed and epoch: both protocols
with their errors, loss, training and evaluation seconds, plus the machine and its CPU
features) and its ``.png`` (k-NN against epochs with 2-SE bars), one pair per epoch count, so a
long comparison never overwrites a short one. A gap
counts only when it is larger than twice the standard error of the difference::

    pip install -e ".[bench]"
    nice -n 5 .venv/bin/python -m benchmarks.peer_lightly --epochs 5 --seeds 2
    .venv/bin/python -m benchmarks.peer_lightly --epochs 1 --limit-images 256   # a smoke run
    .venv/bin/python -m benchmarks.peer_lightly --epochs 5 --replot   # redraw the PNG from the JSON

A run of many epochs spans sessions: both trainers keep their state in a run folder outside
the repository (``$DINOSERVE_RUNS`` or ``~/.cache/dinoserve/runs``, then
``peer_lightly_<epochs>e``), lightly's after every epoch, ours as ``dinoserve train`` does;
``--minutes`` stops cleanly and ``--resume`` continues exactly where it stopped. A later
session usually runs on a fresh machine without that folder, so full-data runs also package
each trainer's teacher into ``weights/progress/peer_lightly_<epochs>e_<trainer>_seed<N>.*``
(lightly's after every epoch, ours when it stops; commit them), and ``--resume`` without the
run folder continues from those (:mod:`benchmarks.peer_state`: student and teacher from the
packaged teacher, the schedules where the plan has them; the optimizer's momentum and the
loss's center are rebuilt; each run's ``segments`` in the JSON say where that happened)::

    .venv/bin/python -m benchmarks.peer_lightly --epochs 50 --minutes 120            # first session
    .venv/bin/python -m benchmarks.peer_lightly --epochs 50 --minutes 120 --resume   # every later one

lightly is a benchmark-only dependency (the ``bench`` extra); without it the script says so
and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.harness import OPENCLIPART_CSV, RESULTS, machine, plot_path, write_json
from benchmarks.long_run import run_dir
from benchmarks.peer_state import load_lightly, package_dinoserve, package_lightly, packaged_path, read_record, segment

NAME = "peer_lightly"
TRAINERS = ("lightly", "dinoserve")
SPLITS = ("knn_train", "pool")
KNN_SIZE = 64  # the global crop size: both backbones are scored at the size they trained at
INSTALL_HINT = 'lightly is not installed; it is a benchmark-only dependency: pip install -e ".[bench]"'

#: lightly's DINO recipe for a ResNet-18 on small data (its Imagenette/CIFAR-10 benchmarks),
#: at our batch of 64. Recorded in the JSON beside the numbers.
LIGHTLY_RECIPE: dict[str, Any] = {
    "backbone": "torchvision resnet18, fc removed (512-d)",
    "head": "DINOProjectionHead(512, 2048, 256, 2048, batch_norm=True)",
    "loss": "DINOLoss(output_dim=2048), default temperatures (teacher 0.04, student 0.1)",
    "optimizer": "SGD", "lr": 0.06 * 64 / 256, "momentum": 0.9, "weight_decay": 5e-4,
    "lr_schedule": "CosineWarmupScheduler per step, no warmup",
    "teacher_momentum": 0.99,
}

#: What a reader of the JSON needs to read the seconds and the scores right.
NOTES = [
    "train_seconds: the epoch's steps, the first epoch's including kernel warm-up; knn_seconds: "
    "feature extraction and both protocols; dinoserve's first knn_seconds also include the trainer "
    "decoding the labelled set (the benchmark decodes its own copy once for lightly)",
    "both trainers share 2 CPU cores with other jobs (load average in machine): compare epochs, not seconds",
    "gaps: dinoserve minus lightly; se is the paired standard error of the gap (std of per-query "
    "differences / sqrt(queries), both scored on the same queries) where both runs kept the per-query hits "
    "of that epoch (the last one), else the two errors in quadrature (se_kind says which); a gap counts "
    "only beyond 2 se. Neither error covers seed-to-seed spread (random inits alone span 35-44 % at epoch "
    "0): compare seeds, not one run",
    "gaps_over_seeds: the gap averaged over the seeds that have both trainers at that epoch; its se is paired "
    "(each query's hit difference averaged over the seeds, then std / sqrt(queries)) where every seed kept its hits, "
    "else sqrt(sum of the seeds' se^2) / seeds (se_kind 'combined'); per_seed lists the seeds' own gaps, whose "
    "spread neither error covers",
    "hits: per query, in protocol order, 1 if its top-1 class was right: the last epoch's, for the paired error",
    "segments: where a run began, was resumed exactly, or was continued on another machine from its packaged fp16 "
    "teacher (optimizer momentum and loss center rebuilt), with the epochs each covered and its CPU; our trainer "
    "stops mid-epoch at its time limit, so a continued segment's teacher_had_steps_of_first_epoch says how many "
    "steps of the epoch it redoes whole that teacher had already trained (lightly's loop stops at an epoch's end)",
]

if TYPE_CHECKING:
    from dinoserve.training import TrainConfig

log = logging.getLogger(NAME)


# --------------------------------------------------------------------------------------
# What both trainers share
# --------------------------------------------------------------------------------------


def require_lightly() -> None:
    """Exit with status 2 and the install line when lightly is missing (a usage problem,
    not a bug, so no traceback)."""
    try:
        import lightly  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        raise SystemExit(2)


def training_list(limit: int | None, workdir: Path) -> Path:
    """The CSV both trainers read: the protocol's own file, or (smoke runs) a copy of its
    first ``limit`` training rows with absolute paths, so an epoch is a few steps."""
    if limit is None:
        return OPENCLIPART_CSV
    from dinoserve.filelist import find_images

    paths = find_images(OPENCLIPART_CSV, SPLITS)[:limit]
    target = workdir / f"first_{limit}.csv"
    with target.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "category", "split"])
        w.writerows([str(p), "", "pool"] for p in paths)
    return target


def dinoserve_config(data: Path, out: Path, epochs: int, seed: int) -> "TrainConfig":
    """Our trainer's config; its crop options also drive lightly's crops."""
    from dinoserve.training import make_config

    split = SPLITS if data == OPENCLIPART_CSV else ("pool",)
    return make_config("cpu_small", local_crops=6, data=str(data), split=split, out=str(out), epochs=epochs,
                       seed=seed, knn_data=str(OPENCLIPART_CSV), knn_every=1, knn_image_size=KNN_SIZE,
                       progress=False, plan_to_time_limit=False, precision="fp32")


def result_name(epochs: int, limit_images: int | None) -> str:
    """The results' file name (no suffix): one per epoch count, smoke runs apart."""
    return f"{NAME}_{epochs}e" + (f"_first{limit_images}" if limit_images else "")


def knn_row(results: dict) -> dict[str, float]:
    """Both protocols' top-1 and standard error, rounded for the JSON."""
    split, loo = results["split"], results["loo"]
    return {"split_top1": round(split.top1, 2), "split_se": round(split.top1_se, 2),
            "loo_top1": round(loo.top1, 2), "loo_se": round(loo.top1_se, 2)}


def hits_row(results: dict) -> dict[str, str]:
    """Each protocol's per-query hits as a string of 0s and 1s (compact in JSON, exact)."""
    return {p: "".join("1" if h else "0" for h in r.hits) for p, r in results.items()}


def _as_result(hits: str, protocol: str):
    """A :class:`KnnResult` that carries only what :func:`paired_gap` reads."""
    import numpy as np

    from dinoserve.training.knn import KnnResult

    h = np.frombuffer(hits.encode(), dtype=np.uint8) == ord("1")
    return KnnResult(top1=100.0 * float(h.mean()), top5=float("nan"), n_bank=0, n_query=len(h), skipped=0,
                     protocol=protocol, hits=h)


# --------------------------------------------------------------------------------------
# lightly's recipe, driven by our crops
# --------------------------------------------------------------------------------------


def lightly_models(seed: int):
    """Student and teacher (backbone, head) pairs as lightly builds them."""
    import copy

    import torch
    import torchvision
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad
    from torch import nn

    torch.manual_seed(seed)
    backbone = torchvision.models.resnet18()
    backbone.fc = nn.Identity()  # [B, 512] pooled features, what the k-NN evaluator takes
    head = DINOProjectionHead(512, 2048, 256, 2048, batch_norm=True)
    # lightly's examples deepcopy the head; with torch 2.14 its weight_norm tensor refuses
    # deepcopy, so the teacher head is built again and given the student's values
    teacher_backbone, teacher_head = copy.deepcopy(backbone), DINOProjectionHead(512, 2048, 256, 2048, batch_norm=True)
    teacher_head.load_state_dict(head.state_dict())
    deactivate_requires_grad(teacher_backbone)
    deactivate_requires_grad(teacher_head)
    return backbone, head, teacher_backbone, teacher_head


def run_lightly(cfg, seed: int, knn_set, ckpt: Path, deadline: float = math.inf,
                on_epoch=lambda run: None, packaged: Path | None = None) -> dict[str, Any]:
    """Train lightly's recipe on the crops our trainer would make for ``cfg``; k-NN of the
    teacher backbone after every epoch. Its state goes to ``ckpt`` after every epoch, and a
    run that finds ``ckpt`` continues from it exactly, so a run of many epochs spans sessions.
    With ``packaged``, the teacher is also packaged there after every epoch
    (:mod:`benchmarks.peer_state`), and a run without ``ckpt`` (a new machine) continues from
    that package. Stops after the epoch during which ``time.time()`` passes ``deadline``
    (``complete`` False); ``on_epoch`` sees the run after each epoch."""
    import warnings

    import torch
    from lightly.loss import DINOLoss
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import CosineWarmupScheduler

    from dinoserve.filelist import find_images
    from dinoserve.training.data import ResumableSampler, TensorBatches
    from dinoserve.training.engine import store_size
    from dinoserve.training.knn import evaluate_knn_protocols
    from dinoserve.training.store import open_store
    from dinoserve.training.tensor_augment import BatchMultiCrop

    store = open_store(find_images(cfg.data, cfg.split), store_size(cfg), fit=cfg.fit)  # the trainer's own store
    sampler = ResumableSampler(range(len(store)), seed=cfg.seed)
    augment = BatchMultiCrop(cfg.global_crop_size, cfg.global_crop_scale, cfg.local_crops, cfg.local_crop_size,
                             cfg.local_crop_scale)
    batches = TensorBatches(store.pixels, augment, sampler, cfg.batch_size, cfg.seed, 0, torch.device("cpu"))
    steps_per_epoch = len(sampler) // cfg.batch_size

    nets = dict(zip(("student", "head", "teacher", "teacher_head"), lightly_models(seed)))
    params = list(nets["student"].parameters()) + list(nets["head"].parameters())
    optimizer = torch.optim.SGD(params, lr=LIGHTLY_RECIPE["lr"], momentum=LIGHTLY_RECIPE["momentum"],
                                weight_decay=LIGHTLY_RECIPE["weight_decay"])
    scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=0, max_epochs=cfg.epochs * steps_per_epoch)
    criterion = DINOLoss(output_dim=2048)
    stateful = {**nets, "optimizer": optimizer, "scheduler": scheduler, "criterion": criterion}
    run = {"seed": seed, "precision": "fp32", "images": len(store), "steps_per_epoch": steps_per_epoch,
           "epochs": [], "complete": False}
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        if (saved["epochs_planned"], saved["steps_per_epoch"]) != (cfg.epochs, steps_per_epoch):
            raise SystemExit(f"{ckpt}: a run of {saved['epochs_planned']} epochs x {saved['steps_per_epoch']} steps, "
                             f"this one {cfg.epochs} x {steps_per_epoch}; remove it or use its --epochs")
        for name, obj in stateful.items():
            obj.load_state_dict(saved[name])
        run["epochs"], segments = saved["rows"], saved["segments"]
        log.info("lightly seed %d: continued from %s after epoch %d", seed, ckpt, len(run["epochs"]))
    elif packaged is not None and (record := read_record(packaged)) is not None:
        if (record["epochs_planned"], record["steps_per_epoch"]) != (cfg.epochs, steps_per_epoch):
            raise SystemExit(f"{packaged}: a run of {record['epochs_planned']} epochs x {record['steps_per_epoch']} "
                             f"steps, this one {cfg.epochs} x {steps_per_epoch}; remove it and its .json to start over")
        load_lightly(packaged, nets)
        with warnings.catch_warnings():  # a fresh scheduler stepped to where the plan is, before any optimizer step
            warnings.simplefilter("ignore")
            for _ in range(record["epochs_done"] * steps_per_epoch):
                scheduler.step()
        run["epochs"] = record["rows"]
        segments = record["segments"]
        if record["epochs_done"] < cfg.epochs:  # a finished run is only read, and gains no empty segment
            segments = [*segments, segment("continued from the packaged teacher", record["epochs_done"])]
        log.info("lightly seed %d: continued from the packaged teacher %s after epoch %d", seed, packaged,
                 record["epochs_done"])
    else:
        segments = [segment("started", 0)]
    run["segments"] = segments  # the same list: each epoch moves its last one's end

    for epoch in range(len(run["epochs"]), cfg.epochs):
        if time.time() > deadline:
            return run
        t0 = time.perf_counter()
        loss_sum = 0.0
        for net in nets.values():
            net.train()
        for batch in batches.epoch(epoch):
            loss_sum += lightly_step(batch.crops, epoch, *nets.values(), criterion, optimizer, update_momentum)
            scheduler.step()
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        knn = evaluate_knn_protocols(nets["teacher"], knn_set)
        run["epochs"].append({"epoch": epoch + 1, **knn_row(knn), "loss": round(loss_sum / steps_per_epoch, 4),
                              "train_seconds": round(train_s, 1), "knn_seconds": round(time.perf_counter() - t1, 1)})
        if epoch + 1 == cfg.epochs:
            run["epochs"][-1]["hits"] = hits_row(knn)
        segments[-1]["last_epoch"] = epoch + 1
        state = {**{k: v.state_dict() for k, v in stateful.items()}, "rows": run["epochs"],
                 "epochs_planned": cfg.epochs, "steps_per_epoch": steps_per_epoch, "segments": segments}
        _save_atomically(state, ckpt)
        if packaged is not None:
            package_lightly(state, packaged)
        log.info("lightly seed %d epoch %d: %s", seed, epoch + 1,
                 json.dumps({k: v for k, v in run["epochs"][-1].items() if k != "hits"}))
        on_epoch(run)
    run["complete"] = True
    return run


def _save_atomically(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a stop mid-write keeps the last epoch's."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def lightly_step(crops, epoch: int, backbone, head, teacher_backbone, teacher_head, criterion, optimizer,
                 update_momentum) -> float:
    """One step as lightly's DINO example takes it: EMA first, then the loss over every
    (teacher global, student crop) pair of different views."""
    import torch

    m = LIGHTLY_RECIPE["teacher_momentum"]
    update_momentum(backbone, teacher_backbone, m)
    update_momentum(head, teacher_head, m)
    with torch.no_grad():
        teacher_out = [teacher_head(teacher_backbone(v)) for v in crops[:2]]
    student_out = [head(backbone(v)) for v in crops]  # one view at a time: BatchNorm statistics per view
    loss = criterion(teacher_out, student_out, epoch=epoch)  # also moves its center
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    head.cancel_last_layer_gradients(epoch)
    optimizer.step()
    return float(loss.detach())


# --------------------------------------------------------------------------------------
# our trainer, as users run it
# --------------------------------------------------------------------------------------


def run_dinoserve(cfg, seed: int, knn_set, deadline: float = math.inf, packaged: Path | None = None) -> dict[str, Any]:
    """``dinoserve.training.train(cfg)``, resumed (``--resume``, bit-exactly) when ``cfg.out``
    holds its checkpoint, and stopped cleanly at ``deadline`` (the trainer's
    ``--time-limit``). The per-epoch numbers come from its log.jsonl; the last epoch's
    per-query hits from its final teacher, scored again by this benchmark. With
    ``packaged``, the teacher is packaged there when the trainer stops
    (:mod:`benchmarks.peer_state`), and a run folder without a checkpoint (a new machine)
    continues from that package with ``--pretrained`` and ``--start-epoch``."""
    from dinoserve.models import load_backbone
    from dinoserve.training import train
    from dinoserve.training.knn import evaluate_knn_protocols

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file, hits_file, origin = out / "log.jsonl", out / "final_hits.json", out / "continued_from.json"
    if packaged is not None and not (out / "checkpoint.pth").is_file() and not origin.is_file():
        record = read_record(packaged)
        if record is not None:
            origin.write_text(json.dumps(record))
    earlier = json.loads(origin.read_text()) if origin.is_file() else {}
    if earlier:
        if earlier["epochs_done"] >= cfg.epochs:
            return {"seed": seed, **{k: earlier[k] for k in ("precision", "images", "steps_per_epoch") if k in earlier},
                    "epochs": earlier["rows"], "complete": True, "segments": earlier["segments"]}
        # every segment on this machine keeps the options the first one began with, so --resume accepts them
        cfg = dataclasses.replace(cfg, pretrained=str(packaged), start_epoch=earlier["epochs_done"])
    rows = _log(log_file)
    if len(epochs_from_log(rows)) + earlier.get("epochs_done", 0) < cfg.epochs:
        minutes = (deadline - time.time()) / 60
        if minutes <= 0:
            return (_dinoserve_run(seed, rows, cfg.epochs, earlier) if rows
                    else {"seed": seed, "epochs": earlier.get("rows", []), "complete": False})
        resume = (out / "checkpoint.pth").is_file()
        train(dataclasses.replace(cfg, resume=resume, time_limit=None if math.isinf(minutes) else minutes))
        rows = _log(log_file)
    run = _dinoserve_run(seed, rows, cfg.epochs, earlier)
    if run["complete"]:
        if not hits_file.is_file():
            knn = evaluate_knn_protocols(load_backbone(out / "checkpoint.pth").eval(), knn_set)
            again = knn_row(knn)
            if any(abs(again[k] - run["epochs"][-1][k]) > 0.01 for k in ("split_top1", "loo_top1")):
                # the trainer's own k-NN and ours must agree, or the paired gap would mix two evaluators
                raise RuntimeError(f"the final teacher scores {again}, the trainer's log {run['epochs'][-1]}")
            hits_file.write_text(json.dumps(hits_row(knn)))
        run["epochs"][-1]["hits"] = json.loads(hits_file.read_text())
    if packaged is not None and (out / "checkpoint.pth").is_file():
        package_dinoserve(out, packaged, run, cfg.epochs)
    return run


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _dinoserve_run(seed: int, rows: list[dict], planned: int, earlier: dict) -> dict[str, Any]:
    """The run as the JSON keeps it: this machine's log, after the packaged record's rows
    and segments when it was continued from one (``earlier``; empty when it was not)."""
    start = next(r for r in rows if r["event"] == "start")
    epochs = [*earlier.get("rows", []), *epochs_from_log(rows)]
    precision = next((r["precision"] for r in reversed(rows) if r["event"] == "end"), start.get("precision"))
    here = {"how": "continued from the packaged teacher" if earlier else "started",
            "first_epoch": earlier.get("epochs_done", 0),
            "last_epoch": len(epochs), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start["time"]))}
    if earlier.get("teacher_steps_into_next_epoch"):  # the package's teacher had begun the epoch redone here
        here["teacher_had_steps_of_first_epoch"] = earlier["teacher_steps_into_next_epoch"]
    return {"seed": seed, "precision": precision, "images": start["images"], "steps_per_epoch": start["steps_per_epoch"],
            "epochs": epochs, "complete": len(epochs) == planned,
            "segments": [*earlier.get("segments", []), here]}


def epochs_from_log(rows: list[dict]) -> list[dict[str, Any]]:
    """Per-epoch rows from the trainer's log: training time runs from the end of the
    previous k-NN (or the latest start: a resumed run's pause is not training) to the
    epoch's end, evaluation time is the k-NN's own."""
    mark, end, out = None, {}, []
    for r in rows:
        if r["event"] == "start":
            mark = r["time"]
        elif r["event"] == "epoch":
            end = r
        elif r["event"] == "knn" and end.get("epoch") == r["epoch"]:
            out.append({"epoch": r["epoch"] + 1, "split_top1": round(r["top1"], 2), "split_se": r["top1_se"],
                        "loo_top1": round(r["loo_top1"], 2), "loo_se": r["loo_top1_se"], "loss": round(end["loss"], 4),
                        "train_seconds": round(end["time"] - mark, 1), "knn_seconds": r["seconds"]})
            mark = r["time"]
    return out


# --------------------------------------------------------------------------------------
# comparison, JSON and picture
# --------------------------------------------------------------------------------------


def gaps(runs: dict[str, list[dict]], ours: str = "dinoserve", peer: str = "lightly",
         key: str | None = None) -> list[dict[str, Any]]:
    """``ours`` minus ``peer`` (two keys of ``runs``) per seed, epoch and protocol, under
    ``key`` (default ``<ours>_minus_<peer>``), with the standard error of the gap and whether
    the gap exceeds twice it. The error is paired where both epochs kept their per-query
    hits, else the two errors in quadrature (larger: it ignores that both are scored on the
    same queries)."""
    from dinoserve.training.knn import paired_gap

    key = key or f"{ours}_minus_{peer}"
    out = []
    pairs = {(r["seed"], e["epoch"]): e for r in runs.get(peer, []) for e in r["epochs"]}
    for r in runs.get(ours, []):
        for e in r["epochs"]:
            peer = pairs.get((r["seed"], e["epoch"]))
            if peer is None:
                continue
            for p in ("split", "loo"):
                if "hits" in e and "hits" in peer:
                    gap, se = paired_gap(_as_result(e["hits"][p], p), _as_result(peer["hits"][p], p))
                    kind = "paired"
                else:
                    gap, se = e[f"{p}_top1"] - peer[f"{p}_top1"], math.hypot(e[f"{p}_se"], peer[f"{p}_se"])
                    kind = "quadrature"
                out.append({"seed": r["seed"], "epoch": e["epoch"], "protocol": p, key: round(gap, 2),
                            "se": round(se, 2), "se_kind": kind, "beyond_2se": abs(gap) > 2 * se})
    return out


def gaps_over_seeds(runs: dict[str, list[dict]], ours: str = "dinoserve", peer: str = "lightly") -> list[dict[str, Any]]:
    """dinoserve minus lightly averaged over the seeds, at each epoch and protocol where two
    or more seeds have both trainers. Where every seed kept its per-query hits the error is
    paired over seeds too: each query's hit difference is averaged over the seeds first, so
    a query that one seed gains and another loses adds no doubt. Elsewhere it is the per-seed
    errors combined, ``sqrt(sum se^2) / n``. Neither covers the spread between seeds
    (``per_seed`` lists each seed's gap, for that)."""
    import numpy as np

    def hit_difference(e: dict, peer: dict, p: str) -> np.ndarray:
        ours, theirs = (_as_result(x["hits"][p], p).hits for x in (e, peer))
        return ours.astype(np.float64) - theirs.astype(np.float64)

    key = f"{ours}_minus_{peer}"
    per_seed: dict[tuple[int, str], list[dict]] = {}
    for g in gaps(runs, ours, peer):
        per_seed.setdefault((g["epoch"], g["protocol"]), []).append(g)
    epochs = {(r["seed"], t, e["epoch"]): e for t, rs in runs.items() for r in rs for e in r["epochs"]}
    out = []
    for (epoch, p), rows in per_seed.items():
        if len(rows) < 2:
            continue
        pairs = [(epochs[(g["seed"], ours, epoch)], epochs[(g["seed"], peer, epoch)]) for g in rows]
        if all(g["se_kind"] == "paired" for g in rows):
            d = np.mean([hit_difference(e, peer, p) for e, peer in pairs], axis=0)
            gap, se, kind = 100.0 * float(d.mean()), 100.0 * float(d.std(ddof=1) / np.sqrt(len(d))), "paired"
        else:
            gap = float(np.mean([e[f"{p}_top1"] - peer[f"{p}_top1"] for e, peer in pairs]))
            se, kind = math.sqrt(sum(g["se"] ** 2 for g in rows)) / len(rows), "combined"
        out.append({"epoch": epoch, "protocol": p, "seeds": sorted(g["seed"] for g in rows),
                    key: round(gap, 2), "se": round(se, 2), "se_kind": kind,
                    "beyond_2se": abs(gap) > 2 * se, "per_seed": [g[key] for g in rows]})
    return out


def plot(results: dict[str, Any], name: str | None = None, title: str | None = None) -> Path:
    """k-NN against epochs, one panel per protocol, bars of 2 standard errors, one line per
    run of ``results["runs"]``, into ``results/<name>.png`` (default: this comparison's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, (p, panel) in zip(axes, (("split", "fixed split (knn_train -> knn_val)"), ("loo", "leave-one-out"))):
        for i, (trainer, runs) in enumerate(results["runs"].items()):
            for j, run in enumerate(runs):
                # nudged per trainer and seed so the bars don't overlap; seeds differ by line style
                xs = [e["epoch"] + (i - 0.5) * 0.08 + j * 0.03 for e in run["epochs"]]
                ax.errorbar(xs, [e[f"{p}_top1"] for e in run["epochs"]], yerr=[2 * e[f"{p}_se"] for e in run["epochs"]],
                            marker="o", capsize=3, color=f"C{i}", ls=("-", "--", ":", "-.")[j % 4],
                            label=f"{trainer} (seed {run['seed']})")
                for seg in run.get("segments", [])[1:]:  # where a new machine went on from the packaged teacher
                    if seg["how"].startswith("continued"):
                        ax.axvline(seg["first_epoch"] + 0.5, color=f"C{i}", ls=":", lw=1)
        raw = results.get("raw_pixels", {}).get(f"{p}_top1")
        if raw is not None:
            ax.axhline(raw, color="gray", ls="--", label=f"raw pixels ({raw:.1f} %)")
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        ax.set_xlim(0.5, results["epochs"] + 0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"k-NN top-1 at {KNN_SIZE} px (%), bars 2 SE")
    axes[0].legend(fontsize=8)
    smoke = f"\nSMOKE RUN: only {results['limit_images']} training images, a few steps per epoch" if results["smoke"] else ""
    continued = any(seg["how"].startswith("continued") for runs in results["runs"].values() for r in runs
                    for seg in r.get("segments", []))
    note = "\ndotted lines: continued on another machine from the packaged teacher" if continued else ""
    title = title or "DINO on openclipart: lightly's recipe vs dinoserve train, same store, crops and batch"
    fig.suptitle(f"{title}{smoke}{note}")
    fig.tight_layout()
    path = plot_path(name or result_name(results["epochs"], results["limit_images"]))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(results: dict[str, Any], measured: bool = True) -> None:
    """Gaps, notes, JSON and picture; ``measured=False`` (a redraw) keeps the machine
    facts of the run that measured the numbers."""
    results["gaps"] = gaps(results["runs"])
    results["gaps_over_seeds"] = gaps_over_seeds(results["runs"])
    results["notes"] = NOTES
    if measured:
        results["machine"] = machine()
    write_json(result_name(results["epochs"], results["limit_images"]), results)
    plot(results)


def previous_results(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON that ``--append`` adds to; refused when it measured something else."""
    path = RESULTS / f"{result_name(args.epochs, args.limit_images)}.json"
    if not path.is_file():
        raise SystemExit(f"--append: {path} does not exist yet; run once without --append")
    results = json.loads(path.read_text())
    theirs = (results.get("epochs"), results.get("limit_images"))
    if theirs != (args.epochs, args.limit_images):
        raise SystemExit(f"--append: {path} holds --epochs {theirs[0]} --limit-images {theirs[1]}, this run "
                         f"--epochs {args.epochs} --limit-images {args.limit_images}; use the same or drop --append")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    finished = {(t, r["seed"]) for t, runs in results["runs"].items() for r in runs if r.get("complete")}
    again = sorted(f"{t} seed {s}" for t in args.trainers for s in seeds if (t, s) in finished)
    if again and not args.resume:
        raise SystemExit(f"--append: {path} already has {', '.join(again)}; --resume keeps them and goes on with "
                         f"the rest of these seeds, or pick another --first-seed")
    # finished runs stay as they are (main skips them); a run of these seeds that stopped
    # part-way comes back whole from its run folder or package
    results["runs"] = {t: [r for r in runs if r["seed"] not in seeds or (t, r["seed"]) in finished]
                       for t, runs in results["runs"].items()}
    results["seeds"] = len({r["seed"] for runs in results["runs"].values() for r in runs} | set(seeds))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per trainer; both schedules span them")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per trainer (first-seed, first-seed + 1, ...)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--append", action="store_true",
                    help="add these runs to results/peer_lightly.json (same --epochs and --limit-images) instead of "
                         "starting it afresh: more seeds in a later session")
    ap.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    ap.add_argument("--limit-images", type=int, default=None,
                    help="train on only the first N images of the list (smoke runs; the JSON says so). The list is "
                         "sorted by folder, so they come from a few topics only; the k-NN set stays whole")
    ap.add_argument("--out", type=Path, default=None,
                    help="the run folder: both trainers' checkpoints and logs, per seed (default: $DINOSERVE_RUNS "
                         "or ~/.cache/dinoserve/runs, then peer_lightly_<epochs>e[_first<N>])")
    ap.add_argument("--resume", action="store_true",
                    help="continue the runs in the run folder where they stopped (both trainers resume exactly); "
                         "without it, a folder that holds runs is refused")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop cleanly after about this many minutes (after lightly's current epoch, or at our "
                         "trainer's --time-limit); --resume continues: a run of many epochs spans sessions")
    ap.add_argument("--replot", action="store_true",
                    help="redraw results/peer_lightly_<epochs>e.png (and refresh gaps and notes) from the JSON of "
                         "--epochs (and --limit-images); trains nothing")
    args = ap.parse_args()
    if args.replot:
        path = RESULTS / f"{result_name(args.epochs, args.limit_images)}.json"
        if not path.is_file():
            raise SystemExit(f"--replot: {path} does not exist; --epochs picks which comparison to redraw")
        save(json.loads(path.read_text()), measured=False)
        return
    if "lightly" in args.trainers:
        require_lightly()
    previous = previous_results(args) if args.append else None  # refused before any decoding
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from dinoserve.training.knn import evaluate_knn_protocols, prepare_knn_set

    name = result_name(args.epochs, args.limit_images)

    def packaged(trainer: str, seed: int) -> Path | None:
        """Full-data runs carry their teachers in weights/progress to the next machine; smoke runs are short."""
        return None if args.limit_images else packaged_path(name, trainer, seed)

    out = args.out or run_dir(name)
    held = sorted(out.glob("lightly_seed*.pth")) + sorted(out.glob("dinoserve_seed*/checkpoint.pth")) + [
        p for t in args.trainers for s in range(args.first_seed, args.first_seed + args.seeds)
        if (p := packaged(t, s)) is not None and p.is_file()]
    if held and not args.resume:
        raise SystemExit(f"{held[0]} holds a run of this comparison; --resume continues it, or remove it "
                         f"(and its .json) to start over")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.minutes if args.minutes else math.inf

    knn_set = prepare_knn_set(OPENCLIPART_CSV, KNN_SIZE)
    data = training_list(args.limit_images, out)  # in the run folder: a resumed trainer must see the same file
    results: dict[str, Any] = previous if previous is not None else {
        "smoke": args.limit_images is not None, "limit_images": args.limit_images, "epochs": args.epochs,
        "seeds": args.seeds, "torch_threads": torch.get_num_threads(),
        "shared": {"data": f"{OPENCLIPART_CSV.name} splits {'+'.join(SPLITS)}", "store_px": 96, "fit": "crop",
                   "crops": "2 x 64 px (scale 0.25-1) + 6 x 32 px (scale 0.05-0.25), BatchMultiCrop",
                   "batch": 64, "knn": f"k 20, T 0.07, teacher backbone at {KNN_SIZE} px"},
        "lightly_recipe": LIGHTLY_RECIPE, "raw_pixels": knn_row(evaluate_knn_protocols(None, knn_set)),
        "runs": {t: [] for t in args.trainers},
    }
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for trainer in args.trainers:
            cfg = dinoserve_config(data, out / f"dinoserve_seed{seed}", args.epochs, seed)
            results["dinoserve_config"] = cfg.to_dict()
            done = results["runs"].setdefault(trainer, [])
            if any(r["seed"] == seed and r.get("complete") for r in done):
                continue  # kept from the JSON by --append --resume: one trainer of a seed can finish first
            if trainer == "lightly":
                # the JSON after every epoch: a run of many epochs shows its curve while it runs
                run = run_lightly(cfg, seed, knn_set, out / f"lightly_seed{seed}.pth", deadline,
                                  on_epoch=lambda r: save({**results, "runs": {**results["runs"], trainer: [*done, r]}}),
                                  packaged=packaged(trainer, seed))
            else:
                run = run_dinoserve(cfg, seed, knn_set, deadline, packaged=packaged(trainer, seed))
            run["load_avg_after"] = machine()["load_avg_1_5_15"]  # each run's own, as appended runs share one JSON
            done.append(run)
            save(results)  # after every run, so a stopped benchmark keeps what it measured
            if not run["complete"]:
                log.info("--minutes %s reached: %s seed %d stopped after epoch %d of %d; --resume continues it",
                         args.minutes, trainer, seed, len(run["epochs"]), args.epochs)
                return
    for g in results["gaps"] + results["gaps_over_seeds"]:
        who = f"seed {g['seed']}" if "seed" in g else f"seeds {g['seeds']}"
        log.info("%s epoch %d %s: dinoserve - lightly = %+.2f (SE %.2f)%s", who, g["epoch"], g["protocol"],
                 g["dinoserve_minus_lightly"], g["se"], "  > 2 SE" if g["beyond_2se"] else "")


if __name__ == "__main__":
    main()
