"""``train(cfg)``: a DINO run from top to bottom.

``_train`` builds the run (data, networks, loss, optimizer, plan), then loops over the
epochs; :func:`train_one_epoch` is the reference's loop over batches, and
:func:`dino_step` the method itself: teacher on the global crops, student on all, the
DINO loss, backward, optimizer step, centre and teacher updates. Everything around the
steps (clocks, logs, progress bar, checkpoints, stop checks) is the
:class:`~dinoserve.training.bookkeeping.Bookkeeper`'s.

The same function runs on one CPU, one GPU, or under ``torchrun`` (see distributed.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from dinoserve.errors import ConfigError, DataError, NonFiniteLossError
from dinoserve.models import backbone_card, read_weights
from dinoserve.training import distributed as D
from dinoserve.training.augment import MultiCropAugment
from dinoserve.training.bookkeeping import Bookkeeper, checkpoint_meta
from dinoserve.training.config import TrainConfig, apply_overrides, make_config, validate
from dinoserve.filelist import find_images
from dinoserve.training.data import Batch, PilBatches, ResumableSampler, StoreCrops, TensorBatches
from dinoserve.training.loss import DINOLoss, teacher_entropy
from dinoserve.training.networks import Networks, build_networks
from dinoserve.training.optim import (build_optimizer, cancel_last_layer_grads, clip_gradients, param_groups,
                                      set_lr_and_weight_decay)
from dinoserve.training.plan import REPLAN_AFTER_STEPS, Plan, replan, schedules
from dinoserve.training.precision import autocast, grad_scaler, resolve_precision
from dinoserve.training.resume import checkpoint_to_continue
from dinoserve.training.store import ImageStore, open_store
from dinoserve.training.teacher import update_after_step, update_at_epoch_start
from dinoserve.training.tensor_augment import BatchMultiCrop

__all__ = ["Run", "TrainResult", "dino_step", "make_run", "train", "train_one_epoch"]

logger = logging.getLogger("dinoserve.training")


@dataclass
class TrainResult:
    """What a run did; ``train`` returns it and the CLI prints it as JSON."""

    checkpoint: str
    out_dir: str
    epochs_done: int
    steps: int
    final_loss: float | None
    epoch_losses: list[float]
    images_per_second: float
    precision: str
    skipped: dict[str, Any]
    knn: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    data_wait_share: float | None = None  # fraction of loop time spent waiting for batches

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Run:
    """What every step uses, fixed for the whole run (the objects keep their own state)."""

    cfg: TrainConfig
    info: D.DistInfo
    nets: Networks
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    precision: str


def make_run(cfg: TrainConfig, info: D.DistInfo, pretrained=None, initialise: bool = True) -> Run:
    """Networks, DINO loss, optimizer and precision for ``cfg`` on ``info.device``
    (``initialise``: a new run, see :func:`~dinoserve.training.networks.build_networks`)."""
    nets = build_networks(cfg, info, pretrained, initialise)
    dino_loss = DINOLoss(cfg.out_dim, 2 + cfg.local_crops, teacher_temp=cfg.teacher_temp,
                         warmup_teacher_temp=cfg.warmup_teacher_temp,
                         warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs, epochs=cfg.epochs,
                         student_temp=cfg.student_temp, center_momentum=cfg.center_momentum).to(info.device)
    precision = resolve_precision(cfg.precision, info.device)
    return Run(cfg, info, nets, dino_loss, build_optimizer(cfg.optimizer, param_groups(nets.student)),
               grad_scaler(precision, info.device), precision)


def train(cfg: TrainConfig | None = None, **overrides: Any) -> TrainResult:
    """Train DINO as ``cfg`` says (or ``make_config(**overrides)``); return a summary.

    Raises :class:`~dinoserve.errors.DinoserveError` subclasses for bad options or data and
    :class:`NonFiniteLossError` if the loss diverges (the last checkpoint is kept).
    """
    if cfg is None:
        cfg = make_config(**overrides)
    elif overrides:
        cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    if cfg.data is None:
        raise ConfigError("no training data: pass --data FOLDER or --data FILE.csv")
    info = D.setup(cfg.device)
    try:
        return _train(cfg, info)
    finally:
        D.teardown(info)


def _train(cfg: TrainConfig, info: D.DistInfo) -> TrainResult:
    t_start = time.monotonic()
    cfg, resume = checkpoint_to_continue(cfg, info.is_main)
    store = _open_store(cfg, info.is_main)
    batches, steps_per_epoch = _batches(cfg, store, info)
    pretrained = read_weights(cfg.pretrained) if cfg.pretrained else None  # sizes, and values for a new run
    run = make_run(cfg, info, pretrained, initialise=resume is None)
    plan = schedules(cfg, cfg.epochs, steps_per_epoch, info.world_size)
    book = Bookkeeper(cfg, info, t_start)
    if resume is not None:
        start_epoch, first_step = book.restore(run, plan, resume)
    else:  # per-process streams, so drop path differs between processes
        start_epoch, first_step = cfg.start_epoch, 0
        book.progress.step = start_epoch * plan.steps_per_epoch
        torch.manual_seed(cfg.seed + info.rank)
    _log_start(run, book, store, plan, resumed=resume is not None)

    if cfg.plan_to_time_limit and cfg.time_limit and resume is None:
        # plan to the time limit: time the first steps, then refit every schedule to the speed
        first = islice(batches.epoch(0), min(REPLAN_AFTER_STEPS, steps_per_epoch))
        first_step = train_one_epoch(run, plan, book, first, epoch=0)
        if not book.progress.stopped:
            per_step = book.seconds_per_step()
            plan = replan(cfg, plan, book.progress.step, per_step, book.seconds_left(), info.world_size)
            _log_plan(book, plan, per_step)

    epoch_losses: list[float] = []
    knn_rows: list[dict[str, Any]] = []
    knn_set: dict[str, Any] = {}  # the labelled images, decoded at the first evaluation
    epochs_done = start_epoch
    t_loop = time.perf_counter()
    for epoch in range(start_epoch, plan.epochs):
        if not book.progress.stopped:
            first_step = train_one_epoch(run, plan, book, batches.epoch(epoch, first_step), epoch, first_step)
        finished = first_step == plan.steps_per_epoch
        epochs_done = epoch + 1 if finished else epoch
        book.save(run, plan, epochs_done, 0 if finished else first_step)
        if finished:
            epoch_losses.append(book.end_epoch(epoch))
            if cfg.knn_data and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == plan.epochs):
                knn_rows.append(_knn(cfg, run.nets.teacher.backbone, info, epoch, book, knn_set))
        if book.progress.stopped:
            _say_stopped(cfg, book, epoch, plan)
            break
        first_step = 0

    p, elapsed = book.progress, time.perf_counter() - t_loop
    result = TrainResult(
        checkpoint=str(book.checkpoint), out_dir=cfg.out, epochs_done=epochs_done, steps=p.step,
        final_loss=p.last_loss, epoch_losses=epoch_losses,
        images_per_second=round(p.images_seen / elapsed, 2) if elapsed > 0 else 0.0,
        precision=run.precision, skipped=_skip_summary(store), knn=knn_rows, stopped_early=p.stopped,
        data_wait_share=round(p.data_wait / elapsed, 4) if elapsed > 0 else None)
    book.log.write("end", **result.to_dict())
    book.log.close()
    return result


def train_one_epoch(run: Run, plan: Plan, book: Bookkeeper, batches: Iterable[Batch], epoch: int,
                    first_step: int = 0) -> int:
    """Train on ``batches``, the rest of ``epoch`` from its batch ``first_step``; return how
    many of the epoch's batches are done (``plan.steps_per_epoch``: the epoch is finished)."""
    run.nets.student.train()
    run.nets.teacher.train()
    if first_step == 0:
        update_at_epoch_start(run.cfg.teacher_update, run.nets.teacher, run.nets.student)
    book.start_epoch(plan, epoch, first_step)
    done = first_step
    for batch in book.timed(batches):
        k = plan.position(epoch, done)
        set_lr_and_weight_decay(run.optimizer, float(plan.lr[k]), float(plan.weight_decay[k]))
        stats = dino_step(run, batch.crops, epoch, float(plan.momentum[k]))
        done += 1
        if book.after_step(run, plan, epoch, done, stats, len(batch)):
            break
    return done


def dino_step(run: Run, crops: list[torch.Tensor], epoch: int, momentum: float) -> dict[str, float]:
    """One DINO step on a batch's multi-crop views (the first two global); returns the loss
    (mean over processes) and the teacher's entropies as floats."""
    nets, device = run.nets, run.info.device
    crops = [c.to(device, non_blocking=True) for c in crops]
    with autocast(run.precision, device):
        with torch.no_grad():
            teacher_out = nets.teacher(crops[:2])  # the teacher sees only the global crops
        student_out = nets.ddp_student(crops)
    loss = run.dino_loss(student_out, teacher_out, epoch)
    # all processes stop together on a non-finite loss; the mean is what we log
    stats = D.all_reduce(torch.stack([loss.detach().float(), (~torch.isfinite(loss)).float()]).cpu())
    if stats[1] > 0:
        raise NonFiniteLossError(
            f"loss is {loss.item()} in epoch {epoch}; stopped. The last good checkpoint in {run.cfg.out} is kept. "
            f"Try a lower --lr, --precision fp32, a smaller --clip-grad or --norm-last-layer, then --resume or "
            f"start again.")
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if run.cfg.clip_grad:
        clip_gradients(nets.student, run.cfg.clip_grad)
    cancel_last_layer_grads(nets.student, epoch, run.cfg.freeze_last_layer)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.dino_loss.update_center(teacher_out)  # after the loss, as the method prescribes
    update_after_step(run.cfg.teacher_update, nets.teacher, nets.student, momentum)
    with torch.no_grad():
        h, h_mean = teacher_entropy(run.dino_loss.teacher_probs(teacher_out, epoch))
    return {"loss": float(stats[0]) / run.info.world_size, "teacher_entropy": h, "teacher_mean_entropy": h_mean}


def _log_start(run: Run, book: Bookkeeper, store: ImageStore, plan: Plan, resumed: bool) -> None:
    cfg, info = run.cfg, run.info
    book.log.write("start", args=cfg.to_dict(), world_size=info.world_size, device=str(info.device),
                   precision=run.precision, images=len(store), steps_per_epoch=plan.steps_per_epoch,
                   resumed_at_step=book.progress.step if resumed else None, meta=checkpoint_meta(run.nets.card, cfg),
                   skipped=_skip_summary(store))
    for path, reason in store.skipped:
        book.log.write("skip", path=path, reason=reason)
    if info.is_main:
        logger.info("training %s on %d images: %d steps/epoch x %d epochs, total batch %d, %s on %s, %s crops",
                    cfg.arch, len(store), plan.steps_per_epoch, plan.epochs, cfg.batch_size * info.world_size,
                    run.precision, info.device, cfg.augment)


def _log_plan(book: Bookkeeper, plan: Plan, per_step: float) -> None:
    book.log.write("plan", step=book.progress.step, seconds_per_step=round(per_step, 3), epochs=plan.epochs,
                   planned_steps=plan.epochs * plan.steps_per_epoch)
    if book.info.is_main:
        logger.info("%.2f s per step: %d epoch(s) of %d steps fit the %.3g-minute limit; schedules planned for that",
                    per_step, plan.epochs, plan.steps_per_epoch, book.cfg.time_limit)


def _say_stopped(cfg: TrainConfig, book: Bookkeeper, epoch: int, plan: Plan) -> None:
    if book.info.is_main:
        why = "--max-steps" if cfg.max_steps is not None and book.progress.step >= cfg.max_steps else "--time-limit"
        logger.info("%s reached after %d steps (epoch %d of %d); checkpoint saved, --resume continues",
                    why, book.progress.step, epoch + 1, plan.epochs)


def _skip_summary(store: ImageStore, keep: int = 10) -> dict[str, Any]:
    return {"count": len(store.skipped), "files": len(store.skipped),
            "examples": [{"path": p, "reason": r} for p, r in store.skipped[:keep]]}


def _open_store(cfg: TrainConfig, main: bool) -> ImageStore:
    """The decoded images of ``cfg.data``; the main process builds it, the others read it."""
    paths = find_images(cfg.data, cfg.split, cfg.data_root)
    size = store_size(cfg)
    if main:
        store = open_store(paths, size, cfg.store_dir, progress=cfg.progress, fit=cfg.fit)
    D.barrier()
    if not main:
        store = open_store(paths, size, cfg.store_dir, fit=cfg.fit)
    if len(store) == 0:
        reasons = "; ".join(reason for _, reason in store.skipped[:5])
        raise DataError(f"{cfg.data}: none of its {len(paths)} image(s) could be read, so there is nothing to "
                        f"train on ({reasons}{' ...' if len(store.skipped) > 5 else ''})")
    if store.skipped and main:
        # one short line; each file and its reason go to log.jsonl ("skip" rows) and the summary
        logger.warning("%d of %d images are left out (unreadable, or over the decompression-bomb limit); "
                       "the first: %s. All are listed in %s", len(store.skipped), len(paths),
                       store.skipped[0][0], Path(cfg.out) / "log.jsonl")
    return store


def store_size(cfg: TrainConfig) -> int:
    """Side of the stored images: ``--store-size``, else 1.5x the global crop, so that the
    largest crop shrinks its source region by at most 1.5x."""
    return cfg.store_size or int(round(cfg.global_crop_size * 1.5))


def _batches(cfg: TrainConfig, store: ImageStore, info: D.DistInfo) -> tuple[Any, int]:
    """This process's batch source (``.epoch(epoch, first_batch)``) and the steps per epoch."""
    sampler = ResumableSampler(range(len(store)), info.world_size, info.rank, seed=cfg.seed)
    steps_per_epoch = sampler.num_samples // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{cfg.data}: {len(store)} readable images give each of {info.world_size} process(es) "
                        f"{sampler.num_samples}, fewer than one batch of {cfg.batch_size}; lower --batch-size")
    crop_args = (cfg.global_crop_size, cfg.global_crop_scale, cfg.local_crops, cfg.local_crop_size, cfg.local_crop_scale)
    if cfg.augment == "tensor":
        return TensorBatches(store.pixels, BatchMultiCrop(*crop_args), sampler, cfg.batch_size, cfg.seed, info.rank,
                             info.device), steps_per_epoch
    return PilBatches(StoreCrops(store.pixels, MultiCropAugment(*crop_args), seed=cfg.seed), sampler, cfg.batch_size,
                      cfg.num_workers, cfg.seed, info.device.type == "cuda"), steps_per_epoch


def _knn(cfg: TrainConfig, backbone: nn.Module, info: D.DistInfo, epoch: int, book: Bookkeeper,
         cache: dict[str, Any]) -> dict[str, Any]:
    """k-NN accuracy of the teacher backbone on both protocols, on the main process (the
    labelled set is decoded once and kept in ``cache``); other processes wait."""
    row: dict[str, Any] = {"epoch": epoch, "step": book.progress.step}
    if info.is_main:
        from dinoserve.training.knn import evaluate_knn_protocols, prepare_knn_set

        t0 = time.perf_counter()
        if "set" not in cache:
            size = cfg.knn_image_size or backbone_card(backbone).image_size
            cache["set"] = prepare_knn_set(cfg.knn_data, size, root=cfg.knn_data_root, fit=cfg.fit)
        backbone.eval()
        try:
            r = evaluate_knn_protocols(backbone, cache["set"], k=cfg.knn_k, temperature=cfg.knn_temperature,
                                       device=info.device)
        finally:
            backbone.train()
        # top1 is the fixed split (comparable with every earlier log); loo the low-noise protocol
        split, loo = r["split"], r["loo"]
        row.update(top1=float(split.top1), top5=float(split.top5), top1_se=round(split.top1_se, 2),
                   loo_top1=float(loo.top1), loo_top1_se=round(loo.top1_se, 2),
                   seconds=round(time.perf_counter() - t0, 1))
        book.log.write("knn", **row)
        logger.info("k-NN after epoch %d: top-1 %.2f top-5 %.2f", epoch + 1, row["top1"], row["top5"])
    D.barrier()
    return row
