"""DINO self-supervised training of timm ResNet and ViT backbones.

>>> from training import make_config, train
>>> result = train(make_config("cpu_small", data="photos/", out="runs/photos", epochs=5))
>>> result.checkpoint  # loads with dinoserve.models.load_backbone(...)

Modules, one job each: ``config`` (options and presets), ``augment`` (multi-crop), ``data``
(images, skipping bad ones, resumable sampler), ``head`` (DINO head, multi-crop wrapper),
``loss`` (DINO loss with centering), ``schedules``, ``teacher`` (EMA and alternatives),
``optim`` (parameter groups, clipping, LARS), ``precision``, ``distributed``, ``checkpoint``,
``monitor`` and ``engine`` (``train``).
"""

from training.config import PRESETS, TrainConfig, apply_overrides, make_config
from training.engine import TrainResult, config_from_checkpoint, train

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "apply_overrides", "config_from_checkpoint",
           "make_config", "train"]
