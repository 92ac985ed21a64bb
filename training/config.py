"""Training configuration: one flat dataclass, three presets, checked overrides.

Every knob of ``train(cfg)`` is a field of :class:`TrainConfig` with its default on its
own line and a ``help`` text that the CLI shows verbatim, so the dataclass is the single
source of truth for defaults, the command line and the ``args`` dict in checkpoints.

Presets change a few fields and say why (see :data:`PRESETS`); :func:`make_config` applies
a preset then the user's overrides, rejecting unknown keys and wrong types with a
:class:`~dinoserve.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from dinoserve.errors import ConfigError
from dinoserve.registry import family_of_name


def _option(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its CLI help (and ``choices``) in the field's metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """All options of a DINO training run (defaults: the reference ViT-S/16 recipe)."""

    # --- data ------------------------------------------------------------------------
    data: Optional[str] = _option(None, "Image folder (searched recursively) or CSV file list (path,category,split).")
    split: Optional[tuple] = _option(None, "CSV only: keep rows whose split is one of these (repeat or comma list), e.g. knn_train,pool.")
    data_root: Optional[str] = _option(None, "CSV only: folder that relative paths are resolved against (default: the file list's own default).")
    out: str = _option("runs/dino", "Output folder: checkpoint.pth and log.jsonl.")
    augment: str = _option("tensor", "tensor: multi-crop as batched tensor ops on the training device; pil: the PIL reference pipeline in DataLoader workers.", choices=("tensor", "pil"))
    num_workers: int = _option(4, "DataLoader worker processes of --augment pil (0 = in the main process).")
    store_size: Optional[int] = _option(None, "Side in pixels of the decoded-image store every crop is cut from (each image decoded once and fitted by --fit; default 1.5 x the global crop size).")
    fit: str = _option("crop", "How each image is fitted into the square store and the k-NN/served input: crop (shorter side, centre square; photos) or pad (white border trimmed, longer side, padded on white; clip art, icons, product shots). Recorded in the model card, so export, the client and the index use it too.", choices=("crop", "pad"))
    store_dir: Optional[str] = _option(None, "Folder of decoded-image stores, shared by runs (default ~/.cache/dinoserve/stores); a store whose source images changed is rebuilt.")

    # --- model -----------------------------------------------------------------------
    arch: str = _option("vit_small_patch16_224", "timm architecture (vit_* or resnet*) or DINO alias (dino_vits16 ...).")
    pretrained: Optional[str] = _option(None, "Start student and teacher backbones from this weight source (checkpoint, .pth, .safetensors, timm:<tag>, alias).")
    img_size: Optional[int] = _option(None, "ViT only: position-embedding grid size in pixels (default: the global crop size, or with --pretrained the size of those weights).")
    patch_size: Optional[int] = _option(None, "ViT only: override the patch size of the architecture (e.g. 8 for small images).")
    depth: Optional[int] = _option(None, "ViT only: override the number of blocks (tiny test models).")
    reference_init: bool = _option(True, "From scratch, initialise as the reference does: ResNet blocks' last BatchNorm gamma 1 (timm: 0), ViT cls token trunc_normal(0.02) (timm: 1e-6).")
    drop_path_rate: float = _option(0.1, "Stochastic depth rate of the student (the teacher uses 0).")
    out_dim: int = _option(65536, "K, the number of prototypes (head output dimension).")
    hidden_dim: int = _option(2048, "Hidden width of the projection head MLP.")
    bottleneck_dim: int = _option(256, "Bottleneck width before the weight-normalised last layer.")
    head_layers: int = _option(3, "Number of linear layers in the head MLP.")
    use_bn_in_head: bool = _option(False, "BatchNorm in the head MLP.")
    norm_last_layer: bool = _option(True, "Fix the last layer's weight norm g to 1 (more stable; False can be better for ViT-S).")

    # --- multi-crop ------------------------------------------------------------------
    global_crop_size: int = _option(224, "Side of the two global crops in pixels.")
    global_crop_scale: tuple = _option((0.4, 1.0), "Area range of global crops, as fractions of the image.")
    local_crops: int = _option(8, "Number of small local crops per image (0 disables multi-crop).")
    local_crop_size: int = _option(96, "Side of the local crops in pixels.")
    local_crop_scale: tuple = _option((0.05, 0.4), "Area range of local crops, as fractions of the image.")

    # --- optimisation ----------------------------------------------------------------
    epochs: int = _option(100, "Number of epochs.")
    batch_size: int = _option(64, "Images per process per step (total batch = this x processes).")
    optimizer: str = _option("adamw", "adamw, sgd or lars.", choices=("adamw", "sgd", "lars"))
    lr: float = _option(5e-4, "Peak learning rate for a total batch of 256 (scaled linearly by total batch / 256).")
    min_lr: float = _option(1e-6, "Learning rate at the end of the cosine schedule.")
    warmup_epochs: float = _option(10, "Epochs of linear learning-rate warmup from 0.")
    weight_decay: float = _option(0.04, "Weight decay at the start (weights with ndim > 1, not biases or norms).")
    weight_decay_end: float = _option(0.4, "Weight decay at the end of the cosine schedule.")
    clip_grad: float = _option(3.0, "Per-parameter gradient norm clip (0 = off).")
    freeze_last_layer: int = _option(1, "Epochs during which the head's last layer gets no updates.")

    # --- teacher and loss -------------------------------------------------------------
    teacher_update: str = _option("ema", "ema: momentum teacher; epoch: teacher = student of the previous epoch; copy: teacher = student every step (fails, per the paper).", choices=("ema", "epoch", "copy"))
    momentum_teacher: float = _option(0.996, "EMA momentum at the start, raised to 1 by a cosine per step (0.9995 for small batches).")
    momentum_constant: bool = _option(False, "Keep the EMA momentum at --momentum-teacher for the whole run instead of raising it to 1.")
    teacher_temp: float = _option(0.04, "Teacher softmax temperature after warmup.")
    warmup_teacher_temp: float = _option(0.04, "Teacher temperature at the start of its warmup.")
    warmup_teacher_temp_epochs: int = _option(0, "Epochs of linear teacher-temperature warmup.")
    student_temp: float = _option(0.1, "Student softmax temperature.")
    center_momentum: float = _option(0.9, "EMA momentum of the teacher-output center.")

    # --- run -------------------------------------------------------------------------
    precision: str = _option("auto", "auto (CUDA: bf16 if supported, else fp16; CPU: bf16 only with AMX, where it is faster, else fp32), fp32, bf16 or fp16 (CUDA, with a grad scaler).", choices=("auto", "fp32", "bf16", "fp16"))
    device: str = _option("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
    seed: int = _option(0, "Random seed (each process adds its rank).")
    resume: bool = _option(False, "Continue from <out>/checkpoint.pth exactly where it stopped (same step, schedules, center, optimizer, sampler position).")
    start_epoch: int = _option(0, "With --pretrained: begin the --epochs plan at this epoch, every schedule where the whole plan has it then (continues a run whose checkpoint is lost, from its packaged teacher).")
    save_every: int = _option(0, "Also write the checkpoint every N steps (0 = only at epoch ends).")
    log_every: int = _option(10, "Write a log.jsonl line every N steps.")
    max_steps: Optional[int] = _option(None, "Stop cleanly (checkpoint written) after this many steps in total; schedules still span --epochs, and --resume continues.")
    time_limit: Optional[float] = _option(None, "Stop cleanly (checkpoint written) after this many minutes; --resume continues.")
    plan_to_time_limit: bool = _option(False, "With --time-limit: after the first steps, plan --epochs (and every schedule) to what the measured speed fits in the limit, so the learning rate anneals before the time runs out.")
    progress: bool = _option(True, "Show a progress bar (main process only).")

    # --- evaluation ------------------------------------------------------------------
    knn_data: Optional[str] = _option(None, "Labelled set for k-NN evaluation: CSV with knn_train/knn_val splits, or a folder with train/ and val/ class folders.")
    knn_every: int = _option(1, "Run k-NN every N epochs (and after the last).")
    knn_k: int = _option(20, "k of the k-NN classifier.")
    knn_temperature: float = _option(0.07, "Temperature of the k-NN vote weights exp(sim / T).")
    knn_image_size: Optional[int] = _option(None, "Evaluation image size for k-NN (default: the backbone's image size, i.e. the global crop size unless --img-size/--pretrained set it).")
    knn_data_root: Optional[str] = _option(None, "Root for relative paths in a k-NN CSV.")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists for tuples) for checkpoints and logs."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


#: Why each preset differs from the defaults is said next to each value.
#: Options that define the network (backbone, head, number of crops the loss expects): a
#: resumed run always takes them from its checkpoint.
NETWORK_OPTIONS = ("arch", "img_size", "patch_size", "depth", "out_dim", "hidden_dim", "bottleneck_dim",
                   "head_layers", "use_bn_in_head", "norm_last_layer", "local_crops")

#: Options that define the crops a network learned from: fine-tuning keeps them with the
#: network, so the model sees what it was trained on.
CROP_OPTIONS = ("global_crop_size", "global_crop_scale", "local_crop_size", "local_crop_scale", "store_size", "fit")

#: Options a resumed run cannot change: the network, and the images, order and size of the
#: batches that the checkpoint's position refers to. Anything else (stop limits, epochs,
#: learning rate, clipping, precision, evaluation, logging) may change, which is how a run
#: is continued, or rescued after a non-finite loss.
FIXED_ON_RESUME = frozenset(NETWORK_OPTIONS) | {"data", "split", "data_root", "batch_size", "seed", "optimizer",
                                               "global_crop_size", "local_crop_size", "store_size", "augment",
                                               "fit"}


PRESETS: dict[str, dict[str, Any]] = {
    # The reference ViT-S/16 recipe (main_dino.py defaults, 100 epochs, batch 64/GPU).
    "vit_s16": dict(arch="vit_small_patch16_224", img_size=224),
    # The reference ResNet-50 recipe: SGD, lr 0.03, constant wd 1e-4, smaller crops scales.
    "resnet50": dict(
        arch="resnet50", optimizer="sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
        global_crop_scale=(0.14, 1.0), local_crop_scale=(0.05, 0.14), drop_path_rate=0.0,
    ),
    # Something useful on 2 CPU cores in minutes. resnet18 rather than vit_tiny: at 64 px a
    # ViT-16 sees only 4x4 tokens while the ResNet's convolutions keep working, and ResNets
    # are DINO's stable small-batch choice (no warmup-sensitive attention). 64 px global /
    # 32 px local crops make a step ~12x cheaper than 224/96; 4 local crops keep 10 of the
    # 18 loss terms of multi-crop at a third of its cost. A short warmup and no teacher-temp
    # warmup because runs are only a few epochs long; momentum 0.99 because at a few hundred
    # steps per run 0.996 would keep the teacher close to its random init for most of it.
    # out_dim 1024, lr 1e-3 and a free last-layer norm came from benchmarks/gpu_sweep.py
    # (same 36 s budget on an H200, ~700 steps): k-NN at 96 px 50.4 % vs 47.5 % for
    # K = 4096 / lr 5e-4 / norm_last_layer, and the loss left ln K (6.2 vs ln 1024 = 6.9)
    # where the old head stayed near it (7.8 vs 8.3). A teacher temperature boost to 0.07
    # sat at ln K (collapse warning), so the teacher stays at 0.04. On the CPU, where a run
    # is ~250 steps, that head still sat at ln K (uniform teacher) in a 6-minute demo run;
    # BatchNorm in the head and lr 2.5e-3 (6.25e-4 after batch scaling: what
    # benchmarks/knn_openclipart.py found learning on 2 cores) get it off ln K.
    "cpu_small": dict(
        arch="resnet18", global_crop_size=64, global_crop_scale=(0.25, 1.0), local_crops=4,
        local_crop_size=32, local_crop_scale=(0.05, 0.25), out_dim=1024, drop_path_rate=0.0,
        norm_last_layer=False, use_bn_in_head=True, epochs=20, batch_size=64, lr=2.5e-3, warmup_epochs=1,
        min_lr=1e-5,
        weight_decay=0.04, weight_decay_end=0.1, momentum_teacher=0.99,
        teacher_temp=0.04, warmup_teacher_temp=0.04, num_workers=2,
        # with --time-limit (the demo's minutes) the epochs come from the measured speed, so
        # the cosine ends when the time does; freezing the last layer for an epoch would
        # freeze it for the whole of a one-epoch run
        plan_to_time_limit=True, freeze_last_layer=0,
        # precision stays "auto": bf16 on CPUs with AMX, fp32 elsewhere (see precision.py)
    ),
    # Adapting pretrained weights (the shipped model) to a new folder in minutes: the
    # network and crop options come from the weights' record, the head from the weights
    # when they carry one. A tenth of cpu_small's learning rate and a slow teacher keep
    # the features the weights already have while the head and backbone adapt; the demo
    # serves the result only if k-NN says it is not worse.
    "finetune": dict(
        optimizer="adamw", lr=2.5e-4, min_lr=1e-6, warmup_epochs=0.2, weight_decay=0.04, weight_decay_end=0.04,
        momentum_teacher=0.996, drop_path_rate=0.0, freeze_last_layer=0, epochs=1, batch_size=64,
        teacher_temp=0.04, warmup_teacher_temp=0.04, plan_to_time_limit=True, num_workers=2,
    ),
}


def _type_of(name: str) -> Any:
    return typing.get_type_hints(TrainConfig)[name]


def coerce_option(name: str, value: Any) -> Any:
    """Check ``value`` against the field's type; convert only lossless cases (int->float,
    list->tuple, "a,b"->tuple for split)."""
    tp = _type_of(name)
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if optional:
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    bad = ConfigError(f"option {name!r}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        choices = TrainConfig.__dataclass_fields__[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"option {name!r}: {value!r} is not one of {', '.join(choices)}")
        return value
    if tp is tuple:
        if name == "split" and isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, (list, tuple)):
            raise bad
        if name == "split":
            items = tuple(s.strip() for v in value for s in str(v).split(",") if s.strip())
            return items or None
        if len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"option {name!r}: expected two numbers (low, high), got {value!r}")
        return (float(value[0]), float(value[1]))
    raise bad  # pragma: no cover - every field type is handled above


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a copy of ``cfg`` with ``overrides`` applied; unknown keys or wrong types
    raise :class:`ConfigError` (with the closest option names)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    changes = {}
    for key, value in overrides.items():
        k = key.replace("-", "_")
        if k not in names:
            close = difflib.get_close_matches(k, names, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown training option {key!r}.{hint}")
        changes[k] = coerce_option(k, value)
    return dataclasses.replace(cfg, **changes)


def make_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """A validated :class:`TrainConfig`: defaults, then ``preset``, then ``overrides``."""
    cfg = TrainConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        cfg = apply_overrides(cfg, PRESETS[preset])
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def batch_size_for(n_images: int, batch_size: int) -> int:
    """``batch_size``, or for fewer than two batches of images a quarter of them (at least
    2): a small folder then still gives several steps an epoch, not one or none."""
    return batch_size if n_images >= 2 * batch_size else max(2, n_images // 4)

def validate(cfg: TrainConfig) -> None:
    """Reject values that cannot work, naming the option and a fix."""
    positive = ["epochs", "batch_size", "out_dim", "hidden_dim", "bottleneck_dim", "global_crop_size",
                "local_crop_size", "log_every", "knn_every", "knn_k", "head_layers"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"option {name!r} must be at least 1, got {getattr(cfg, name)}")
    for name in ["local_crops", "num_workers", "save_every", "start_epoch", "freeze_last_layer", "warmup_epochs",
                 "warmup_teacher_temp_epochs", "clip_grad", "lr", "min_lr", "weight_decay",
                 "weight_decay_end", "drop_path_rate"]:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"option {name!r} must not be negative, got {getattr(cfg, name)}")
    for name in ["momentum_teacher", "center_momentum"]:
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"option {name!r} must lie in [0, 1], got {getattr(cfg, name)}")
    for name in ["teacher_temp", "warmup_teacher_temp", "student_temp", "knn_temperature"]:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"option {name!r} must be positive, got {getattr(cfg, name)}")
    for name in ["global_crop_scale", "local_crop_scale"]:
        lo, hi = getattr(cfg, name)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"option {name!r} must satisfy 0 < low <= high <= 1, got ({lo}, {hi})")
    if cfg.warmup_teacher_temp_epochs > cfg.epochs:
        raise ConfigError(f"warmup_teacher_temp_epochs ({cfg.warmup_teacher_temp_epochs}) exceeds epochs ({cfg.epochs})")
    vit_only = [n for n in ("img_size", "patch_size", "depth") if getattr(cfg, n) is not None]
    if vit_only and family_of_name(cfg.arch) != "vit":
        raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in vit_only)}: ViT options, "
                          f"but --arch {cfg.arch} is not a ViT")
    if cfg.store_size is not None and cfg.store_size < cfg.global_crop_size // 2:
        raise ConfigError(f"option 'store_size' ({cfg.store_size}) is under half the global crop size "
                          f"({cfg.global_crop_size}): crops would be blown-up blur; raise --store-size")
    if cfg.start_epoch and not cfg.resume:
        if cfg.start_epoch >= cfg.epochs:
            raise ConfigError(f"option 'start_epoch' ({cfg.start_epoch}) must be below --epochs ({cfg.epochs})")
        if not cfg.pretrained:
            raise ConfigError("--start-epoch continues a plan from trained weights: pass them with --pretrained")
        if cfg.plan_to_time_limit:
            raise ConfigError("--start-epoch continues a fixed plan: pass --no-plan-to-time-limit")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"option 'max_steps' must be at least 1, got {cfg.max_steps}")
    if cfg.time_limit is not None and cfg.time_limit <= 0:
        raise ConfigError(f"option 'time_limit' must be positive minutes, got {cfg.time_limit}")
