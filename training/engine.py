"""``train(cfg)``: a DINO run from top to bottom.

Phases, in order (each marked by a banner comment): config and resume, distributed
set-up, data, models, loss/optimizer/precision, schedules, restore, loop, teardown.
The same function runs on one CPU, one GPU, or under ``torchrun`` (see distributed.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dinoserve.errors import ConfigError, DataError, NonFiniteLossError, TrainingError
from dinoserve.models import backbone_spec, create_backbone, load_weights
from dinoserve.training import distributed as D
from dinoserve.training.augment import MultiCropAugment
from dinoserve.training.checkpoint import CHECKPOINT_NAME, load_for_resume, rng_state, save_atomic, set_rng_state
from dinoserve.training.config import TrainConfig, apply_overrides, make_config, validate
from dinoserve.training.data import MultiCropDataset, ResumableSampler, SkipReport, collate_crops, find_images
from dinoserve.training.head import DINOHead, MultiCropWrapper
from dinoserve.training.loss import DINOLoss, teacher_entropy
from dinoserve.training.monitor import CollapseMonitor, JsonlLog, Throughput
from dinoserve.training.optim import build_optimizer, cancel_last_layer_grads, clip_gradients, param_groups
from dinoserve.training.precision import autocast, grad_scaler, resolve_precision
from dinoserve.training.schedules import cosine_schedule
from dinoserve.training.teacher import update_after_step, update_at_epoch_start

logger = logging.getLogger("training")

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_checkpoint(out_dir: str, **overrides: Any) -> TrainConfig:
    """The config saved in ``<out_dir>/checkpoint.pth`` (less its ``max_steps`` and
    ``time_limit``) with ``overrides`` applied and ``resume=True``: what
    ``dinoserve train --resume`` uses."""
    saved = load_for_resume(out_dir)["args"]
    # stop limits belong to one invocation: a resumed run goes on to --epochs unless told
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"max_steps", "time_limit"}
    cfg = apply_overrides(TrainConfig(), {k: v for k, v in saved.items() if k in names})
    cfg = apply_overrides(cfg, {**overrides, "resume": True, "out": str(out_dir)})
    validate(cfg)
    return cfg


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
    resume = load_for_resume(out) if cfg.resume else None
    if resume is not None:
        saved = resume["args"]
        changed = {k: saved[k] for k in ARCH_KEYS if k in saved and saved[k] != getattr(cfg, k)}
        if changed:
            logger.warning("resume: keeping the checkpoint's architecture options %s", changed)
            cfg = apply_overrides(cfg, changed)
    elif ckpt_path.exists():
        raise TrainingError(f"{ckpt_path} already exists: pass --resume to continue that run or choose another --out")
    if cfg.data is None:
        raise ConfigError("no training data: pass --data FOLDER or --data FILE.csv")

    # ----------------------------------------------------------------------------------
    # data: multi-crop views decoded in workers, bad images skipped, resumable sampler
    # ----------------------------------------------------------------------------------
    paths = find_images(cfg.data, cfg.split, cfg.data_root)
    augment = MultiCropAugment(cfg.global_crop_size, cfg.global_crop_scale, cfg.local_crops,
                               cfg.local_crop_size, cfg.local_crop_scale)
    dataset = MultiCropDataset(paths, augment, seed=cfg.seed, max_decode_side=cfg.max_decode_side,
                               cache_dir=out / "decode_cache" if cfg.decode_cache else None)
    sampler = ResumableSampler(dataset, info.world_size, info.rank, seed=cfg.seed)
    steps_per_epoch = sampler.num_samples // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{cfg.data}: {len(paths)} images give each of {info.world_size} process(es) "
                        f"{sampler.num_samples}, fewer than one batch of {cfg.batch_size}; lower --batch-size")
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=collate_crops, drop_last=True, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))  # own generator: model RNG untouched

    # ----------------------------------------------------------------------------------
    # models: student and teacher, same init on every rank; teacher gets no gradients
    # ----------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    bb_kwargs = _backbone_kwargs(cfg)
    student_bb = create_backbone(cfg.arch, drop_path_rate=cfg.drop_path_rate, **bb_kwargs)
    teacher_bb = create_backbone(cfg.arch, drop_path_rate=0.0, **bb_kwargs)
    if cfg.pretrained and resume is None:
        src = load_weights(student_bb, cfg.pretrained)
        logger.info("student and teacher start from %s (%s)", src.source, src.format)
    spec = backbone_spec(teacher_bb)
    if spec.family == "resnet":  # resolution is not architectural: record what we train at
        spec = dataclasses.replace(spec, image_size=cfg.global_crop_size)
        teacher_bb.dino_spec = student_bb.dino_spec = spec
    head_kw = dict(use_bn=cfg.use_bn_in_head, nlayers=cfg.head_layers, hidden_dim=cfg.hidden_dim,
                   bottleneck_dim=cfg.bottleneck_dim)
    student = MultiCropWrapper(student_bb, DINOHead(spec.embed_dim, cfg.out_dim, norm_last_layer=cfg.norm_last_layer, **head_kw))
    teacher = MultiCropWrapper(teacher_bb, DINOHead(spec.embed_dim, cfg.out_dim, **head_kw))
    if spec.family == "resnet" and info.enabled and device.type == "cuda":
        # gloo has no SyncBatchNorm kernels, so CPU runs keep per-process statistics
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
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
    ncrops = 2 + cfg.local_crops
    dino_loss = DINOLoss(cfg.out_dim, ncrops, teacher_temp=cfg.teacher_temp, warmup_teacher_temp=cfg.warmup_teacher_temp,
                         warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs, epochs=cfg.epochs,
                         student_temp=cfg.student_temp, center_momentum=cfg.center_momentum).to(device)
    optimizer = build_optimizer(cfg.optimizer, param_groups(student))
    precision = resolve_precision(cfg.precision, device)
    scaler = grad_scaler(precision, device)

    # ----------------------------------------------------------------------------------
    # schedules, one value per step of the whole run
    # ----------------------------------------------------------------------------------
    total_batch = cfg.batch_size * info.world_size
    lr_s = cosine_schedule(cfg.lr * total_batch / 256, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs)
    wd_s = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch)
    mom_s = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps_per_epoch)

    # ----------------------------------------------------------------------------------
    # restore (resume) or seed; per-rank RNG so drop path differs between ranks
    # ----------------------------------------------------------------------------------
    start_epoch, start_in_epoch, step = 0, 0, 0
    skipped = SkipReport()
    if resume is not None:
        student.load_state_dict(resume["student"])
        teacher.load_state_dict(resume["teacher"])
        optimizer.load_state_dict(resume["optimizer"])
        dino_loss.center.copy_(resume["dino_loss"]["center"].to(device))
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        prog = resume["progress"]
        start_epoch, start_in_epoch, step = int(resume["epoch"]), int(prog["epoch_step"]), int(prog["step"])
        if prog.get("steps_per_epoch") != steps_per_epoch and start_in_epoch:
            raise TrainingError(f"--resume: the checkpoint stopped mid-epoch with {prog.get('steps_per_epoch')} steps per "
                                f"epoch, but this run has {steps_per_epoch}; keep --batch-size and the process count")
        skipped = SkipReport.from_dict(prog.get("skipped", {}))
        rngs = prog.get("rng", [])
        if len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank], device)
        else:
            torch.manual_seed(cfg.seed + info.rank + 1_000_003 * step)
    else:
        torch.manual_seed(cfg.seed + info.rank)

    log = JsonlLog(out / "log.jsonl" if main else None)
    log.write("start", args=cfg.to_dict(), world_size=info.world_size, device=str(device), precision=precision,
              images=len(paths), steps_per_epoch=steps_per_epoch, resumed_at_step=step if resume else None,
              meta=_meta(spec, cfg))
    if main:
        logger.info("training %s on %d images: %d steps/epoch x %d epochs, total batch %d, %s on %s",
                    cfg.arch, len(paths), steps_per_epoch, cfg.epochs, total_batch, precision, device)

    saved_epochs = [start_epoch]

    def save(epochs_done: int, epoch_step: int) -> None:
        saved_epochs[0] = epochs_done
        rngs = [rng_state(device)]
        if info.enabled:
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, rng_state(device))
        if not main:
            return
        state = {
            "student": student.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epochs_done, "args": cfg.to_dict(),
            "dino_loss": {"center": dino_loss.center.detach().cpu()},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "meta": _meta(spec, cfg),
            "progress": {"step": step, "epoch_step": epoch_step, "steps_per_epoch": steps_per_epoch,
                         "world_size": info.world_size, "rng": rngs, "skipped": skipped.to_dict(all_paths=True)},
        }
        save_atomic(state, ckpt_path)

    # ----------------------------------------------------------------------------------
    # loop
    # ----------------------------------------------------------------------------------
    collapse = CollapseMonitor(cfg.out_dim)
    speed = Throughput()
    epoch_losses: list[float] = []
    knn_results: list[dict[str, Any]] = []
    knn_cache: dict[str, Any] = {}
    last_loss: float | None = None
    stopped = False
    images_seen, t_loop = 0, time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        in_epoch = start_in_epoch if epoch == start_epoch else 0
        if in_epoch:
            sampler.set_start(in_epoch * cfg.batch_size)  # skip the batches already done
        else:
            update_at_epoch_start(cfg.teacher_update, teacher, student)
        student.train()
        teacher.train()
        speed.reset()
        loss_sum, loss_n, epoch_skipped = 0.0, 0, 0
        bar = _progress(cfg, main, epoch, steps_per_epoch, in_epoch)
        for batch in loader:
            it = epoch * steps_per_epoch + in_epoch
            for i, g in enumerate(optimizer.param_groups):
                g["lr"] = float(lr_s[it])
                if i == 0:
                    g["weight_decay"] = float(wd_s[it])
            epoch_skipped += len(batch.failures)
            for f in skipped.add(batch.failures):
                logger.warning("skipped image: %s", f.reason)
                log.write("skip", path=f.path, reason=f.reason)
            n = torch.tensor(float(len(batch)))
            if D.all_reduce(n, "min").item() >= 2:  # BatchNorm needs 2 samples; all ranks agree
                loss_value = _step(cfg, batch, device, teacher, student, ddp_student, dino_loss, optimizer, scaler,
                                   precision, epoch, it, mom_s, info, step, ckpt_path)
                last_loss = loss_value["loss"]
                loss_sum, loss_n = loss_sum + last_loss, loss_n + 1
                speed.add(len(batch) * info.world_size)
                images_seen += len(batch) * info.world_size
            else:
                loss_value = None
            step += 1
            in_epoch += 1
            if loss_value is not None and main and (step % cfg.log_every == 0 or in_epoch == steps_per_epoch):
                row = dict(step=step, epoch=epoch, lr=float(lr_s[it]), wd=float(wd_s[it]),
                           momentum=float(mom_s[it]), teacher_temp=dino_loss.teacher_temp(epoch),
                           img_per_s=round(speed.rate, 2), **loss_value)
                if scaler is not None:
                    row["grad_scale"] = float(scaler.get_scale())  # falling fast: fp16 overflow
                log.write("step", **row)
                if epoch >= max(1, math.ceil(cfg.warmup_epochs)):
                    warning = collapse.check(row["loss"], row["teacher_mean_entropy"])
                    if warning:
                        logger.warning(warning)
                        log.write("warning", step=step, message=warning)
            if bar is not None:
                bar.update(1)
                if loss_value is not None:
                    bar.set_postfix(loss=f"{loss_value['loss']:.3f}", lr=f"{lr_s[it]:.2e}", wd=f"{wd_s[it]:.3f}",
                                    mom=f"{mom_s[it]:.4f}", H_t=f"{loss_value['teacher_entropy']:.2f}",
                                    img_s=f"{speed.rate:.1f}", refresh=False)
            if cfg.save_every and step % cfg.save_every == 0 and in_epoch < steps_per_epoch:
                save(epoch, in_epoch)
            if _should_stop(cfg, step, t_start):
                stopped = True
                break
        if bar is not None:
            bar.close()
        epoch_done = in_epoch >= steps_per_epoch
        save(epoch + 1 if epoch_done else epoch, 0 if epoch_done else in_epoch)
        sums = D.all_reduce(torch.tensor([loss_sum, float(loss_n), float(epoch_skipped)], dtype=torch.float64))
        mean_loss = float(sums[0] / sums[1]) if sums[1] else float("nan")
        if epoch_done:
            epoch_losses.append(mean_loss)
            log.write("epoch", epoch=epoch, step=step, loss=mean_loss, skipped=int(sums[2]),
                      img_per_s=round(speed.rate, 2), skipped_total_files=len(skipped.paths))
            if int(sums[2]):
                logger.warning("epoch %d: skipped %d unreadable image(s)", epoch, int(sums[2]))
            if cfg.knn_data and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
                knn_results.append(_knn(cfg, teacher.backbone, device, epoch, step, log, main, knn_cache))
        if stopped:
            break

    # ----------------------------------------------------------------------------------
    # teardown
    # ----------------------------------------------------------------------------------
    elapsed = time.perf_counter() - t_loop
    result = TrainResult(
        checkpoint=str(ckpt_path), out_dir=str(out), epochs_done=saved_epochs[0],
        steps=step, final_loss=last_loss, epoch_losses=epoch_losses,
        images_per_second=round(images_seen / elapsed, 2) if elapsed > 0 else 0.0,
        precision=precision, skipped=skipped.to_dict(), knn=knn_results, stopped_early=stopped,
    )
    log.write("end", **{k: v for k, v in result.to_dict().items() if k != "skipped"}, skipped=skipped.to_dict())
    log.close()
    return result


def _step(cfg, batch, device, teacher, student, ddp_student, dino_loss, optimizer, scaler, precision,
          epoch, it, mom_s, info, step, ckpt_path) -> dict[str, float]:
    """One optimisation step; returns loss and teacher statistics as floats."""
    crops = [c.to(device, non_blocking=True) for c in batch.crops]
    with autocast(precision, device):
        with torch.no_grad():
            teacher_out = teacher(crops[:2])  # the teacher sees only the global crops
        student_out = ddp_student(crops)
    loss = dino_loss(student_out, teacher_out, epoch)
    # all ranks stop together on a non-finite loss; the mean is what we log
    stats = D.all_reduce(torch.stack([loss.detach().float(), (~torch.isfinite(loss)).float()]).cpu())
    if stats[1] > 0:
        raise NonFiniteLossError(
            f"loss is {loss.item()} at step {step} (epoch {epoch}); stopped. The last good checkpoint "
            f"{ckpt_path} is kept. Try a lower --lr, --precision fp32, a smaller --clip-grad or "
            f"--norm-last-layer, then --resume or start again.")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if cfg.clip_grad:
        clip_gradients(student, cfg.clip_grad)
    cancel_last_layer_grads(student, epoch, cfg.freeze_last_layer)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    dino_loss.update_center(teacher_out)  # after the loss, as the method prescribes
    update_after_step(cfg.teacher_update, teacher, student, float(mom_s[it]))
    with torch.no_grad():
        h, h_mean = teacher_entropy(dino_loss.teacher_probs(teacher_out, epoch))
    return {"loss": float(stats[0]) / info.world_size, "teacher_entropy": h, "teacher_mean_entropy": h_mean}


def _backbone_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    vit_only = {"patch_size": cfg.patch_size, "depth": cfg.depth, "img_size": cfg.img_size}
    if not cfg.arch.startswith(("vit", "dino_vit")):
        return {}  # validate() has refused ViT options for other architectures
    if vit_only["img_size"] is None:
        # position embeddings at the training size, or at the size the weights were made for
        vit_only["img_size"] = _weights_img_size(cfg.pretrained) if cfg.pretrained else cfg.global_crop_size
    return vit_only


def _weights_img_size(source: str) -> int | None:
    """The image size a ViT weight source's position embeddings were made for (None: unknown)."""
    from dinoserve.models import extract_backbone_state_dict, read_checkpoint, resolve_source

    sd, _ = extract_backbone_state_dict(read_checkpoint(resolve_source(source)), source=source)
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        return None
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    return grid * int(sd["patch_embed.proj.weight"].shape[-1])


def _meta(spec, cfg: TrainConfig) -> dict[str, Any]:
    return {**spec.to_dict(), "out_dim": cfg.out_dim, "hidden_dim": cfg.hidden_dim,
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
        from dinoserve.training.knn import evaluate_knn_set, prepare_knn_set

        t0 = time.perf_counter()
        if "set" not in cache:
            size = cfg.knn_image_size or backbone_spec(backbone).image_size
            cache["set"] = prepare_knn_set(cfg.knn_data, size, root=cfg.knn_data_root)
        backbone.eval()
        try:
            r = evaluate_knn_set(backbone, cache["set"], k=cfg.knn_k, temperature=cfg.knn_temperature,
                                 device=device)
        finally:
            backbone.train()
        row.update(top1=float(r.top1), top5=float(r.top5), seconds=round(time.perf_counter() - t0, 1))
        log.write("knn", **row)
        logger.info("k-NN after epoch %d: top-1 %.2f top-5 %.2f", epoch + 1, row["top1"], row["top5"])
    D.barrier()
    return row
