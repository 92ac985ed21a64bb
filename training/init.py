"""From-scratch initialisation that matches the reference trainer where timm differs.

facebookresearch/dino builds its ResNets with torchvision, whose residual blocks start with
the last BatchNorm's gamma at 1; timm sets it to 0 (``zero_init_last``), which makes every
block an identity at step 0. Its ViT draws the cls token from ``trunc_normal(std=0.02)``;
timm uses ``normal(std=1e-6)``. Both matter in short from-scratch runs, so training starts
from the reference's values unless ``--no-reference-init`` is given.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def match_reference_init(backbone: nn.Module) -> nn.Module:
    """Set the values the reference initialises differently from timm, in place."""
    for module in backbone.modules():
        last_bn = getattr(module, "bn3", None) or getattr(module, "bn2", None)
        if hasattr(module, "zero_init_last") and isinstance(last_bn, nn.BatchNorm2d):
            nn.init.ones_(last_bn.weight)
    cls_token = getattr(backbone, "cls_token", None)
    if isinstance(cls_token, nn.Parameter):
        nn.init.trunc_normal_(cls_token, std=0.02)
    return backbone
