"""``train(cfg)``: a DINO run from top to bottom.

Phases, in order (each marked by a banner comment): config and resume, distributed
set-up, data, models, loss/optimizer/precision, schedules, restore, loop, teardown. The
loop calls :func:`train_one_epoch`, whose body is one step after another: schedules,
forward, loss, backward, step, teacher update, log. What every step needs and never changes
within a run lives in one :class:`Run`.

The same function runs on one CPU, one GPU, or under ``torchrun`` (see distributed.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dinoserve.errors import ConfigError, DataError, NonFiniteLossError, TrainingError
from dinoserve.models import Weights, backbone_card, create_backbone, load_weights, read_weights
from dinoserve.registry import family_of_name
from dinoserve.training import distributed as D
from dinoserve.training.augment import MultiCropAugment
from dinoserve.training.checkpoint import (CHECKPOINT_NAME, load_for_resume, remove_stale_temp_files, rng_state,
                                           save_atomic, set_rng_state)
from dinoserve.training.config import PRESETS, TrainConfig, coerce_option, apply_overrides, make_config, validate
from dinoserve.training.data import Batch, PilBatches, ResumableSampler, StoreCrops, TensorBatches, find_images
from dinoserve.training.head import DINOHead, MultiCropWrapper
from dinoserve.training.init import match_reference_init
from dinoserve.training.loss import DINOLoss, teacher_entropy
from dinoserve.training.monitor import CollapseMonitor, JsonlLog, Throughput
from dinoserve.training.optim import build_optimizer, cancel_last_layer_grads, clip_gradients, param_groups
from dinoserve.training.precision import autocast, grad_scaler, resolve_precision
from dinoserve.training.schedules import cosine_schedule
from dinoserve.training.store import ImageStore, open_store
from dinoserve.training.teacher import update_after_step, update_at_epoch_start
from dinoserve.training.tensor_augment import BatchMultiCrop

logger = logging.getLogger("dinoserve.training")

#: Options that define the network; on --resume they always come from the checkpoint.
ARCH_KEYS = ("arch", "img_size", "patch_size", "depth", "out_dim", "hidden_dim", "bottleneck_dim",
             "head_layers", "use_bn_in_head", "norm_last_layer", "local_crops")


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


@dataclass
class Run:
    """Everything a step needs that does not change during a run, and the step counter."""

    cfg: TrainConfig
    info: D.DistInfo
    student: MultiCropWrapper
    teacher: MultiCropWrapper
    ddp_student: nn.Module
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    precision: str
    lr: np.ndarray  # per-step schedules of the whole run
    wd: np.ndarray
    momentum: np.ndarray
    steps_per_epoch: int
    log: JsonlLog
    ckpt_path: Path
    t_start: float
    card: Any = None  # the teacher backbone's model card, written into checkpoint meta
    step: int = 0
    collapse: CollapseMonitor = None  # type: ignore[assignment]
    speed: Throughput = field(default_factory=Throughput)
    images_seen: int = 0
    data_wait: float = 0.0
    replan_at: int | None = None  # the step after which --fit-epochs-to-time sets the epochs
    t_first_step: float | None = None

    @property
    def device(self) -> torch.device:
        return self.info.device


@dataclass
class EpochOutcome:
    mean_loss: float
    last_loss: float | None
    steps_done: int  # within the epoch, counting steps done before a resume
    stopped: bool


#: Options a resumed run cannot change: they define the network, the images and the order
#: and size of the batches that the checkpoint's position refers to. Anything else (stop
#: limits, epochs, learning rate, clipping, precision, evaluation, logging) may change,
#: which is how a run is continued or rescued after a non-finite loss.
FIXED_ON_RESUME = frozenset(ARCH_KEYS) | {"data", "split", "data_root", "batch_size", "seed", "optimizer",
                                         "global_crop_size", "local_crop_size", "store_size", "augment", "fit"}


def config_from_checkpoint(out_dir: str, preset: str | None = None, **overrides: Any) -> TrainConfig:
    """The config saved in ``<out_dir>/checkpoint.pth`` (less its ``max_steps`` and
    ``time_limit``) with ``overrides`` applied and ``resume=True``: what
    ``dinoserve train --resume`` uses.

    ``preset`` and ``overrides`` may repeat the original command line: values equal to the
    run's own are accepted; options of :data:`FIXED_ON_RESUME` that differ are refused,
    each named with both values.
    """
    saved = load_for_resume(out_dir)["args"]
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    implied = {**(PRESETS[preset] if preset else {}), **overrides}
    conflicts = []
    for key, value in implied.items():
        k = key.replace("-", "_")
        if k in names and k in saved and k in FIXED_ON_RESUME:
            ours, theirs = coerce_option(k, value), coerce_option(k, saved[k])
            if ours != theirs:
                conflicts.append(f"--{k.replace('_', '-')} {_show(ours)} (the run has {_show(theirs)})")
    if conflicts:
        raise ConfigError(f"--resume: {out_dir} was trained with other options: {'; '.join(conflicts)}. Drop them "
                          f"to continue that run, or start a new one with another --out")
    # stop limits belong to one invocation: a resumed run goes on to --epochs unless told
    keep = names - {"max_steps", "time_limit"}
    cfg = apply_overrides(TrainConfig(), {k: v for k, v in saved.items() if k in keep})
    cfg = apply_overrides(cfg, {**overrides, "resume": True, "out": str(out_dir)})
    validate(cfg)
    return cfg


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


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
    device, main = info.device, info.is_main
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME

    # ----------------------------------------------------------------------------------
    # config and resume: architecture keys come from the checkpoint, the rest from cfg
    # ----------------------------------------------------------------------------------
    if main:
        remove_stale_temp_files(ckpt_path)  # a run killed while saving left one behind
    resume = load_for_resume(out) if cfg.resume else None
    if resume is not None:
        saved = resume["args"]
        changed = {k: saved[k] for k in ARCH_KEYS if k in saved and saved[k] != getattr(cfg, k)}
        if changed:
            logger.warning("resume: keeping the checkpoint's architecture options %s", changed)
            cfg = apply_overrides(cfg, changed)
    elif ckpt_path.exists():
        raise TrainingError(f"{ckpt_path} already exists: pass --resume to continue that run or choose another --out")

    # ----------------------------------------------------------------------------------
    # data: every image decoded once into the store; crops on the device (or PIL workers)
    # ----------------------------------------------------------------------------------
    store = _open_store(cfg, main)
    sampler = ResumableSampler(range(len(store)), info.world_size, info.rank, seed=cfg.seed)
    steps_per_epoch = sampler.num_samples // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{cfg.data}: {len(store)} readable images give each of {info.world_size} process(es) "
                        f"{sampler.num_samples}, fewer than one batch of {cfg.batch_size}; lower --batch-size")
    batches = _batches(cfg, store, sampler, info)

    # ----------------------------------------------------------------------------------
    # models: student and teacher, same init on every rank; teacher gets no gradients
    # ----------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    pretrained = read_weights(cfg.pretrained) if cfg.pretrained else None  # read once: sizes and values
    bb_kwargs = _backbone_kwargs(cfg, pretrained)
    student_bb = create_backbone(cfg.arch, drop_path_rate=cfg.drop_path_rate, **bb_kwargs)
    teacher_bb = create_backbone(cfg.arch, drop_path_rate=0.0, **bb_kwargs)
    if resume is None and pretrained is not None:
        load_weights(student_bb, pretrained)
        logger.info("student and teacher start from %s (%s)", pretrained.source, pretrained.format)
    elif resume is None and cfg.reference_init:  # a resumed run loads every value from its checkpoint
        match_reference_init(student_bb)
    card = backbone_card(teacher_bb).replace(fit=cfg.fit)  # served images are fitted as trained
    if card.family == "resnet":  # resolution is not architectural: record what we train at
        card = card.replace(image_size=cfg.global_crop_size)
    teacher_bb.dino_card = student_bb.dino_card = card
    head_kw = dict(use_bn=cfg.use_bn_in_head, nlayers=cfg.head_layers, hidden_dim=cfg.hidden_dim,
                   bottleneck_dim=cfg.bottleneck_dim)
    student = MultiCropWrapper(student_bb, DINOHead(card.embed_dim, cfg.out_dim, norm_last_layer=cfg.norm_last_layer, **head_kw))
    teacher = MultiCropWrapper(teacher_bb, DINOHead(card.embed_dim, cfg.out_dim, **head_kw))
    if card.family == "resnet" and info.enabled and device.type == "cuda":
        # gloo has no SyncBatchNorm kernels, so CPU runs keep per-process statistics
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    if pretrained is not None and resume is None and pretrained.head_state_dict:
        _load_head(student.head, pretrained)
    student.to(device)
    teacher.to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    ddp_student = (DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
                   if info.enabled else student)

    # ----------------------------------------------------------------------------------
    # loss, optimizer, precision
    # ----------------------------------------------------------------------------------
    dino_loss = DINOLoss(cfg.out_dim, 2 + cfg.local_crops, teacher_temp=cfg.teacher_temp,
                         warmup_teacher_temp=cfg.warmup_teacher_temp,
                         warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs, epochs=cfg.epochs,
                         student_temp=cfg.student_temp, center_momentum=cfg.center_momentum).to(device)
    optimizer = build_optimizer(cfg.optimizer, param_groups(student))
    precision = resolve_precision(cfg.precision, device)

    # ----------------------------------------------------------------------------------
    # schedules, one value per step of the whole run
    # ----------------------------------------------------------------------------------
    total_batch = cfg.batch_size * info.world_size
    run = Run(cfg=cfg, info=info, student=student, teacher=teacher, ddp_student=ddp_student, dino_loss=dino_loss,
              optimizer=optimizer, scaler=grad_scaler(precision, device), precision=precision,
              lr=cosine_schedule(cfg.lr * total_batch / 256, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs),
              wd=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch),
              momentum=_momentum_schedule(cfg, steps_per_epoch), steps_per_epoch=steps_per_epoch,
              log=JsonlLog(out / "log.jsonl" if main else None), ckpt_path=ckpt_path, t_start=t_start,
              card=card, collapse=CollapseMonitor(cfg.out_dim))

    # ----------------------------------------------------------------------------------
    # restore (resume) or seed; per-rank RNG so drop path differs between ranks
    # ----------------------------------------------------------------------------------
    start_epoch, start_in_epoch = 0, 0
    if resume is not None:
        start_epoch, start_in_epoch = _restore(run, resume)
    else:
        torch.manual_seed(cfg.seed + info.rank)
    skipped = _skip_summary(store)
    run.log.write("start", args=cfg.to_dict(), world_size=info.world_size, device=str(device), precision=precision,
                  images=len(store), steps_per_epoch=steps_per_epoch, resumed_at_step=run.step if resume else None,
                  meta=_meta(card, cfg), skipped=skipped)
    for path, reason in store.skipped:
        run.log.write("skip", path=path, reason=reason)
    if main:
        logger.info("training %s on %d images: %d steps/epoch x %d epochs, total batch %d, %s on %s, %s crops",
                    cfg.arch, len(store), steps_per_epoch, cfg.epochs, total_batch, precision, device, cfg.augment)

    # ----------------------------------------------------------------------------------
    # loop
    # ----------------------------------------------------------------------------------
    epoch_losses: list[float] = []
    knn_results: list[dict[str, Any]] = []
    knn_cache: dict[str, Any] = {}
    last_loss: float | None = None
    epochs_saved = start_epoch
    stopped = False
    t_loop = time.perf_counter()
    if cfg.fit_epochs_to_time and cfg.time_limit and resume is None:
        run.replan_at = min(REPLAN_AFTER_STEPS, cfg.epochs * steps_per_epoch)  # before a short plan ends
    epoch = start_epoch - 1
    while epoch + 1 < run.cfg.epochs:  # --fit-epochs-to-time may change the count after a few steps
        epoch += 1
        cfg = run.cfg
        in_epoch = start_in_epoch if epoch == start_epoch else 0
        if not in_epoch:
            update_at_epoch_start(cfg.teacher_update, teacher, student)
        outcome = train_one_epoch(run, batches.epoch(epoch, in_epoch), epoch, in_epoch)
        last_loss = outcome.last_loss if outcome.last_loss is not None else last_loss
        done = outcome.steps_done >= steps_per_epoch
        epochs_saved = epoch + 1 if done else epoch
        _save(run, epochs_saved, 0 if done else outcome.steps_done)
        if done:
            epoch_losses.append(outcome.mean_loss)
            run.log.write("epoch", epoch=epoch, step=run.step, loss=outcome.mean_loss, img_per_s=round(run.speed.rate, 2))
            if cfg.knn_data and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
                knn_results.append(_knn(cfg, teacher.backbone, device, epoch, run.step, run.log, main, knn_cache))
        if outcome.stopped:
            stopped = True
            why = "--max-steps" if cfg.max_steps is not None and run.step >= cfg.max_steps else "--time-limit"
            if main:
                logger.info("%s reached after %d steps (epoch %d of %d); checkpoint saved, --resume continues",
                            why, run.step, epoch + 1, cfg.epochs)
            break

    # ----------------------------------------------------------------------------------
    # teardown
    # ----------------------------------------------------------------------------------
    elapsed = time.perf_counter() - t_loop
    result = TrainResult(
        checkpoint=str(ckpt_path), out_dir=str(out), epochs_done=epochs_saved,
        steps=run.step, final_loss=last_loss, epoch_losses=epoch_losses,
        images_per_second=round(run.images_seen / elapsed, 2) if elapsed > 0 else 0.0,
        precision=precision, skipped=skipped, knn=knn_results, stopped_early=stopped,
        data_wait_share=round(run.data_wait / elapsed, 4) if elapsed > 0 else None,
    )
    run.log.write("end", **result.to_dict())
    run.log.close()
    return result


def train_one_epoch(run: Run, batches: Iterator[Batch], epoch: int, in_epoch: int) -> EpochOutcome:
    """Train on ``batches`` (the rest of epoch ``epoch``, which starts at batch ``in_epoch``)."""
    cfg, main = run.cfg, run.info.is_main
    run.student.train()
    run.teacher.train()
    run.speed.reset()
    loss_sum, loss_n, last_loss, stopped = 0.0, 0, None, False
    bar = _progress(cfg, main, epoch, run.steps_per_epoch, in_epoch)
    t_wait = time.perf_counter()
    for batch in batches:
        run.data_wait += time.perf_counter() - t_wait
        it = epoch * run.steps_per_epoch + in_epoch
        for i, g in enumerate(run.optimizer.param_groups):
            g["lr"] = float(run.lr[it])
            if i == 0:  # the regularised group
                g["weight_decay"] = float(run.wd[it])
        stats = _step(run, batch, epoch, it)
        last_loss = stats["loss"]
        loss_sum, loss_n = loss_sum + last_loss, loss_n + 1
        n_images = len(batch) * run.info.world_size
        run.speed.add(n_images)
        run.images_seen += n_images
        run.step += 1
        in_epoch += 1
        if run.step == 1:
            run.t_first_step = time.perf_counter()
        if run.step == run.replan_at:
            _fit_epochs_to_time(run)
            cfg = run.cfg
        if main and (run.step % cfg.log_every == 0 or in_epoch == run.steps_per_epoch):
            _log_step(run, epoch, it, stats)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{run.lr[it]:.2e}", H_t=f"{stats['teacher_entropy']:.2f}",
                            img_s=f"{run.speed.rate:.1f}", refresh=False)
        if cfg.save_every and run.step % cfg.save_every == 0 and in_epoch < run.steps_per_epoch:
            _save(run, epoch, in_epoch)
        if _should_stop(cfg, run.step, run.t_start):
            stopped = True
            break
        t_wait = time.perf_counter()
    if bar is not None:
        bar.close()
    sums = D.all_reduce(torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64))
    mean_loss = float(sums[0] / sums[1]) if sums[1] else float("nan")
    return EpochOutcome(mean_loss=mean_loss, last_loss=last_loss, steps_done=in_epoch, stopped=stopped)


def _step(run: Run, batch: Batch, epoch: int, it: int) -> dict[str, float]:
    """One optimisation step; returns loss and teacher statistics as floats."""
    crops = [c.to(run.device, non_blocking=True) for c in batch.crops]
    with autocast(run.precision, run.device):
        with torch.no_grad():
            teacher_out = run.teacher(crops[:2])  # the teacher sees only the global crops
        student_out = run.ddp_student(crops)
    loss = run.dino_loss(student_out, teacher_out, epoch)
    # all ranks stop together on a non-finite loss; the mean is what we log
    stats = D.all_reduce(torch.stack([loss.detach().float(), (~torch.isfinite(loss)).float()]).cpu())
    if stats[1] > 0:
        raise NonFiniteLossError(
            f"loss is {loss.item()} at step {run.step} (epoch {epoch}); stopped. The last good checkpoint "
            f"{run.ckpt_path} is kept. Try a lower --lr, --precision fp32, a smaller --clip-grad or "
            f"--norm-last-layer, then --resume or start again.")
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if run.cfg.clip_grad:
        clip_gradients(run.student, run.cfg.clip_grad)
    cancel_last_layer_grads(run.student, epoch, run.cfg.freeze_last_layer)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.dino_loss.update_center(teacher_out)  # after the loss, as the method prescribes
    update_after_step(run.cfg.teacher_update, run.teacher, run.student, float(run.momentum[it]))
    with torch.no_grad():
        h, h_mean = teacher_entropy(run.dino_loss.teacher_probs(teacher_out, epoch))
    return {"loss": float(stats[0]) / run.info.world_size, "teacher_entropy": h, "teacher_mean_entropy": h_mean}


#: Steps timed before --fit-epochs-to-time plans the run (the first step, which warms up
#: the kernels, is not timed).
REPLAN_AFTER_STEPS = 6


def _fit_epochs_to_time(run: Run) -> None:
    """Set the epoch count (and so every schedule) to what the speed measured so far fits
    in the rest of --time-limit, so the learning rate anneals before the time runs out."""
    cfg = run.cfg
    now = time.perf_counter()
    per_step = (now - run.t_first_step) / max(run.step - 1, 1)
    left = cfg.time_limit * 60 - (time.monotonic() - run.t_start)
    # 5 % of the time is kept for checkpoints and evaluation
    total = run.step + max(0.0, 0.95 * left) / per_step
    epochs = max(1, int(round(total / run.steps_per_epoch)))
    epochs = int(D.all_reduce(torch.tensor(float(epochs)), "min").item())  # every rank plans the same run
    run.cfg = apply_overrides(cfg, {"epochs": epochs})
    total_batch = cfg.batch_size * run.info.world_size
    run.lr = cosine_schedule(cfg.lr * total_batch / 256, cfg.min_lr, epochs, run.steps_per_epoch, cfg.warmup_epochs)
    run.wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, epochs, run.steps_per_epoch)
    run.momentum = _momentum_schedule(run.cfg, run.steps_per_epoch)
    run.log.write("plan", step=run.step, seconds_per_step=round(per_step, 3), epochs=epochs,
                  planned_steps=epochs * run.steps_per_epoch)
    if run.info.is_main:
        logger.info("%.2f s per step: %d epoch(s) of %d steps fit the %.3g-minute limit; schedules planned for that",
                    per_step, epochs, run.steps_per_epoch, cfg.time_limit)


def _log_step(run: Run, epoch: int, it: int, stats: dict[str, float]) -> None:
    row = dict(step=run.step, epoch=epoch, lr=float(run.lr[it]), wd=float(run.wd[it]), momentum=float(run.momentum[it]),
               teacher_temp=run.dino_loss.teacher_temp(epoch), img_per_s=round(run.speed.rate, 2), **stats)
    if run.scaler is not None:
        row["grad_scale"] = float(run.scaler.get_scale())  # falling fast: fp16 overflow
    run.log.write("step", **row)
    if epoch >= max(1, math.ceil(run.cfg.warmup_epochs)):
        warning = run.collapse.check(row["loss"], row["teacher_mean_entropy"])
        if warning:
            logger.warning(warning)
            run.log.write("warning", step=run.step, message=warning)


def _save(run: Run, epochs_done: int, epoch_step: int) -> None:
    """The checkpoint, in the dino layout plus ``meta`` and ``progress`` (main process)."""
    rngs = [rng_state(run.device)]
    if run.info.enabled:
        rngs = [None] * run.info.world_size
        dist.all_gather_object(rngs, rng_state(run.device))
    if not run.info.is_main:
        return
    state = {
        "student": run.student.state_dict(), "teacher": run.teacher.state_dict(),
        "optimizer": run.optimizer.state_dict(), "epoch": epochs_done, "args": run.cfg.to_dict(),
        "dino_loss": {"center": run.dino_loss.center.detach().cpu()},
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "meta": _meta(run.card, run.cfg),
        "progress": {"step": run.step, "epoch_step": epoch_step, "steps_per_epoch": run.steps_per_epoch,
                     "world_size": run.info.world_size, "rng": rngs},
    }
    save_atomic(state, run.ckpt_path)


def _restore(run: Run, resume: dict[str, Any]) -> tuple[int, int]:
    """Load a checkpoint into ``run``; return (epoch, batch within it) to start at."""
    run.student.load_state_dict(resume["student"])
    run.teacher.load_state_dict(resume["teacher"])
    run.optimizer.load_state_dict(resume["optimizer"])
    run.dino_loss.center.copy_(resume["dino_loss"]["center"].to(run.device))
    if run.scaler is not None and resume.get("scaler"):
        run.scaler.load_state_dict(resume["scaler"])
    prog = resume["progress"]
    start_epoch, start_in_epoch, run.step = int(resume["epoch"]), int(prog["epoch_step"]), int(prog["step"])
    if prog.get("steps_per_epoch") != run.steps_per_epoch and start_in_epoch:
        raise TrainingError(f"--resume: the checkpoint stopped mid-epoch with {prog.get('steps_per_epoch')} steps per "
                            f"epoch, but this run has {run.steps_per_epoch}; keep --batch-size and the process count")
    rngs = prog.get("rng", [])
    if len(rngs) == run.info.world_size:
        set_rng_state(rngs[run.info.rank], run.device)
    else:
        torch.manual_seed(run.cfg.seed + run.info.rank + 1_000_003 * run.step)
    return start_epoch, start_in_epoch


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


def _batches(cfg: TrainConfig, store: ImageStore, sampler: ResumableSampler, info: D.DistInfo):
    crop_args = (cfg.global_crop_size, cfg.global_crop_scale, cfg.local_crops, cfg.local_crop_size, cfg.local_crop_scale)
    if cfg.augment == "tensor":
        return TensorBatches(store.pixels, BatchMultiCrop(*crop_args), sampler, cfg.batch_size, cfg.seed, info.rank,
                             info.device)
    return PilBatches(StoreCrops(store.pixels, MultiCropAugment(*crop_args), seed=cfg.seed), sampler, cfg.batch_size,
                      cfg.num_workers, cfg.seed, info.device.type == "cuda")


def _skip_summary(store: ImageStore, keep: int = 10) -> dict[str, Any]:
    return {"count": len(store.skipped), "files": len(store.skipped),
            "examples": [{"path": p, "reason": r} for p, r in store.skipped[:keep]]}


def _momentum_schedule(cfg: TrainConfig, steps_per_epoch: int) -> np.ndarray:
    """Teacher momentum per step: a cosine from ``momentum_teacher`` to 1 (the reference),
    or constant with ``--momentum-constant`` (short runs, where the cosine freezes the
    teacher long before the student has learned)."""
    if cfg.momentum_constant:
        return np.full(cfg.epochs * steps_per_epoch, cfg.momentum_teacher)
    return cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps_per_epoch)


def _load_head(head: DINOHead, pretrained: Weights) -> None:
    """Start the head from the one stored with the pretrained backbone when it has this
    run's shape (same K, widths, BatchNorm); otherwise keep a fresh head and say so."""
    own = head.state_dict()
    theirs = pretrained.head_state_dict
    if set(own) == set(theirs) and all(own[k].shape == theirs[k].shape for k in own):
        head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in theirs.items()})
        logger.info("the head starts from %s too", pretrained.source)
    else:
        logger.info("%s holds a head of another shape; the head starts fresh", pretrained.source)


def _backbone_kwargs(cfg: TrainConfig, pretrained: Weights | None) -> dict[str, Any]:
    vit_only = {"patch_size": cfg.patch_size, "depth": cfg.depth, "img_size": cfg.img_size}
    if family_of_name(cfg.arch) != "vit":
        return {}  # validate() has refused ViT options for other architectures
    if vit_only["img_size"] is None:
        # position embeddings at the training size, or at the size the weights were made for
        vit_only["img_size"] = pretrained.image_size if pretrained is not None else cfg.global_crop_size
    return vit_only


def _meta(card, cfg: TrainConfig) -> dict[str, Any]:
    """Checkpoint ``meta``: the teacher backbone's model card, plus head and crop settings."""
    return {**card.to_dict(), "out_dim": cfg.out_dim, "hidden_dim": cfg.hidden_dim,
            "bottleneck_dim": cfg.bottleneck_dim, "head_layers": cfg.head_layers,
            "use_bn_in_head": cfg.use_bn_in_head, "norm_last_layer": cfg.norm_last_layer,
            "global_crop_size": cfg.global_crop_size, "local_crop_size": cfg.local_crop_size,
            "local_crops": cfg.local_crops, "format": "dinoserve-train-1"}


def _progress(cfg: TrainConfig, main: bool, epoch: int, total: int, initial: int):
    if not (main and cfg.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True, leave=True)


def _should_stop(cfg: TrainConfig, step: int, t_start: float) -> bool:
    stop = cfg.max_steps is not None and step >= cfg.max_steps
    if cfg.time_limit is not None:
        late = torch.tensor(float(time.monotonic() - t_start > cfg.time_limit * 60))
        stop = stop or bool(D.all_reduce(late, "max").item())  # every rank stops at the same step
    return stop


def _knn(cfg: TrainConfig, backbone: nn.Module, device: torch.device, epoch: int, step: int, log: JsonlLog,
         main: bool, cache: dict) -> dict[str, Any]:
    """k-NN accuracy of the teacher backbone on the main process (the labelled set is
    decoded once and kept in ``cache``); other processes wait."""
    row: dict[str, Any] = {"epoch": epoch, "step": step}
    if main:
        from dinoserve.training.knn import evaluate_knn_protocols, prepare_knn_set

        t0 = time.perf_counter()
        if "set" not in cache:
            size = cfg.knn_image_size or backbone_card(backbone).image_size
            cache["set"] = prepare_knn_set(cfg.knn_data, size, root=cfg.knn_data_root, fit=cfg.fit)
        backbone.eval()
        try:
            r = evaluate_knn_protocols(backbone, cache["set"], k=cfg.knn_k, temperature=cfg.knn_temperature,
                                       device=device)
        finally:
            backbone.train()
        # top1 is the fixed split (comparable with every earlier log); loo the low-noise protocol
        split, loo = r["split"], r["loo"]
        row.update(top1=float(split.top1), top5=float(split.top5), top1_se=round(split.top1_se, 2),
                   loo_top1=float(loo.top1), loo_top1_se=round(loo.top1_se, 2),
                   seconds=round(time.perf_counter() - t0, 1))
        log.write("knn", **row)
        logger.info("k-NN after epoch %d: top-1 %.2f top-5 %.2f", epoch + 1, row["top1"], row["top5"])
    D.barrier()
    return row
