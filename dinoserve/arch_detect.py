"""Tell a backbone state dict's DINO generation and timm architecture from its keys alone.

Pure functions over ``{name: tensor}`` (timm's layouts), so :mod:`dinoserve.weights` can
name the architecture a file was made for before any model is built, and refuse a file of
one generation loaded into another by naming both. Each generation has keys only it has:

- DINOv3 ViT (timm ``Eva``): layer scale as ``blocks.N.gamma_1``, no position table (RoPE);
- DINOv2 ViT: layer scale as ``blocks.N.ls1.gamma``, a learned position table;
- DINO ViT: a learned position table, no layer scale;
- DINOv3 ConvNeXt: ``stem.0.weight`` and ``stages.N.blocks``;
- ResNet: ``layer1.0.conv1.weight``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

__all__ = ["weights_generation", "register_count", "detect_dino_arch"]

_VIT_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge_plus", 1536: "giant",
              4096: "7b"}
# timm's depth of each size, to pass ``depth`` only when a file differs (tests' tiny models)
_DINOV2_DEPTHS = {"small": 12, "base": 12, "large": 24, "giant": 40}
_DINOV3_DEPTHS = {"tiny": 12, "small": 12, "small_plus": 12, "base": 12, "large": 24, "huge_plus": 32, "7b": 40}
_CONVNEXTS = {96: ((3, 3, 9, 3), "convnext_tiny"), 128: ((3, 3, 27, 3), "convnext_base"),
              192: ((3, 3, 27, 3), "convnext_large")}


def weights_generation(sd: Mapping[str, torch.Tensor]) -> str:
    """``"DINOv3 ViT"``, ``"DINOv2 ViT"``, ``"DINO ViT"``, ``"DINOv3 ConvNeXt"``, ``"ResNet"`` or
    ``""`` (unknown), in the words of :func:`dinoserve.registry.generation_of`."""
    if "blocks.0.gamma_1" in sd and "pos_embed" not in sd:
        return "DINOv3 ViT"
    if "pos_embed" in sd and "patch_embed.proj.weight" in sd:
        return "DINOv2 ViT" if "blocks.0.ls1.gamma" in sd else "DINO ViT"
    if "stem.0.weight" in sd and any(k.startswith("stages.") for k in sd):
        return "DINOv3 ConvNeXt"
    if "layer1.0.conv1.weight" in sd:
        return "ResNet"
    return ""


def register_count(sd: Mapping[str, torch.Tensor]) -> int:
    """Register tokens a ViT state dict holds (timm's ``reg_token``; 0 without)."""
    reg = sd.get("reg_token")
    return int(reg.shape[1]) if reg is not None else 0


def _depth(sd: Mapping[str, torch.Tensor]) -> int:
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))


def detect_dino_arch(sd: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]] | None:
    """``(timm arch, constructor options)`` of a DINOv2/DINOv3 ViT or DINOv3 ConvNeXt state
    dict, or None when it is none of them (or not a standard size)."""
    gen = weights_generation(sd)
    if gen == "DINOv2 ViT":
        dim, _, p, _ = sd["patch_embed.proj.weight"].shape
        size, regs = _VIT_NAMES.get(dim), register_count(sd)
        if size not in _DINOV2_DEPTHS or p != 14 or regs not in (0, 4):
            return None
        kw: dict[str, Any] = {}
        # A register model's table holds the patches only (timm folds CLS into its token).
        grid = math.isqrt(sd["pos_embed"].shape[1] - (0 if regs else 1))
        if grid * p != 518:
            kw["img_size"] = grid * p
        if _depth(sd) != _DINOV2_DEPTHS[size]:
            kw["depth"] = _depth(sd)
        return f"vit_{size}_patch14_{'reg4_' if regs else ''}dinov2", kw
    if gen == "DINOv3 ViT":
        dim = sd["patch_embed.proj.weight"].shape[0]
        size = _VIT_NAMES.get(dim)
        if size == "small" and "blocks.0.mlp.fc1_g.weight" in sd:
            size = "small_plus"  # same width, a SwiGLU MLP
        if size not in _DINOV3_DEPTHS:
            return None
        qkvb = "_qkvb" if "blocks.0.attn.q_bias" in sd else ""
        arch = f"vit_{size}_patch16_dinov3{qkvb}"
        kw = {"depth": _depth(sd)} if _depth(sd) != _DINOV3_DEPTHS[size] else {}
        return arch, kw
    if gen == "DINOv3 ConvNeXt":
        dim = int(sd["stem.0.weight"].shape[0])
        depths = tuple(len({k.split(".")[3] for k in sd if k.startswith(f"stages.{i}.blocks.")}) for i in range(4))
        if dim not in _CONVNEXTS:
            return None
        standard, arch = _CONVNEXTS[dim]
        if dim == 96 and depths[2] == 27:
            arch, standard = "convnext_small", (3, 3, 27, 3)
        return arch, ({} if depths == standard else {"depths": depths})
    return None
