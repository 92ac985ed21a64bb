"""DINO self-supervised training of timm ResNet and ViT backbones.

>>> from dinoserve.training import make_config, train
>>> result = train(make_config("cpu_small", data="photos/", out="runs/photos", epochs=5))
>>> result.checkpoint  # loads with dinoserve.models.load_backbone(...)

Modules, one job each: ``config`` (options and presets), ``augment`` (multi-crop), ``data``
(images, skipping bad ones, resumable sampler), ``head`` (DINO head, multi-crop wrapper),
``loss`` (DINO loss with centering), ``schedules``, ``teacher`` (EMA and alternatives),
``optim`` (parameter groups, clipping, LARS), ``precision``, ``distributed``, ``checkpoint``,
``monitor`` and ``engine`` (``train``).

Names are imported on first use, so ``import dinoserve.training.config`` (the CLI's option table)
does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PRESETS": "dinoserve.training.config",
    "TrainConfig": "dinoserve.training.config",
    "apply_overrides": "dinoserve.training.config",
    "make_config": "dinoserve.training.config",
    "TrainResult": "dinoserve.training.engine",
    "config_from_checkpoint": "dinoserve.training.resume",
    "train": "dinoserve.training.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dinoserve.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
