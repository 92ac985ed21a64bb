"""Continuing a run: its config from the checkpoint, and what a new invocation may change."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from dinoserve.errors import ConfigError, TrainingError
from dinoserve.training.checkpoint import CHECKPOINT_NAME, load_for_resume, remove_stale_temp_files
from dinoserve.training.config import (FIXED_ON_RESUME, NETWORK_OPTIONS, PRESETS, TrainConfig, apply_overrides,
                                       coerce_option, validate)

logger = logging.getLogger("dinoserve.training")


def config_from_checkpoint(out_dir: str, preset: str | None = None, **overrides: Any) -> TrainConfig:
    """The config saved in ``<out_dir>/checkpoint.pth`` (less its ``max_steps`` and
    ``time_limit``) with ``overrides`` applied and ``resume=True``: what
    ``dinoserve train --resume`` uses.

    ``preset`` and ``overrides`` may repeat the original command line: values equal to the
    run's own are accepted; options of :data:`~dinoserve.training.config.FIXED_ON_RESUME`
    that differ are refused, each named with both values.
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


def checkpoint_to_continue(cfg: TrainConfig, is_main: bool) -> tuple[TrainConfig, dict[str, Any] | None]:
    """``cfg`` with the network options of the checkpoint it resumes, and that checkpoint
    (None for a new run, which must not overwrite one)."""
    path = Path(cfg.out) / CHECKPOINT_NAME
    if is_main:
        remove_stale_temp_files(path)  # a run killed while saving left one behind
    if not cfg.resume:
        if path.exists():
            raise TrainingError(f"{path} already exists: pass --resume to continue that run or choose another --out")
        return cfg, None
    resume = load_for_resume(cfg.out)
    saved = resume["args"]
    changed = {k: saved[k] for k in NETWORK_OPTIONS if k in saved and saved[k] != getattr(cfg, k)}
    if changed:
        logger.warning("resume: keeping the checkpoint's network options %s", changed)
        cfg = apply_overrides(cfg, changed)
    return cfg, resume


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
