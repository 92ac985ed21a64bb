"""The official DINOv2 / DINOv3 checkpoint layouts, renamed to timm's.

facebookresearch/dinov2 and facebookresearch/dinov3 save their backbones under their own
names; timm (and so dinoserve) builds the same networks with other names. Each layout is
spotted by keys only it has, and :func:`to_timm_layout` renames it. Pure: no model needed.

What is left out, and why it is safe, is listed per layout (``DROPPED``): a masked-modelling
token used only in pretraining, constants the architecture recomputes, and pretraining-only
heads. Everything else must be used: loading stays strict.
"""

from __future__ import annotations

import re

import torch

from dinoserve.errors import WeightsError

__all__ = ["to_timm_layout", "DROPPED"]

#: Keys of the official layouts that a serving backbone does not use, with the reason.
DROPPED = {
    "mask_token": "the masked-image-modelling token, used only in pretraining",
    "rope_embed.periods": "DINOv3's RoPE periods, a constant timm recomputes from the temperature",
    "bias_mask": "DINOv3's constant mask that keeps the key bias at zero",
    "local_cls_norm": "the 7B model's norm for local crops, used only in pretraining",
    "projectors.": "distillation projection heads (EUPE), not part of the backbone",
    "norms.": "per-stage feature norms of distillation checkpoints, not part of the backbone",
}


def _dropped(key: str) -> bool:
    return any(key == d or key.endswith("." + d) or key.startswith(d) for d in DROPPED)


def to_timm_layout(sd: dict[str, torch.Tensor], source: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict in timm's names, layout name)``; ``""`` and ``sd`` unchanged when it is
    none of the official DINOv2/DINOv3 layouts."""
    if "storage_tokens" in sd:
        return _dinov3_vit(sd, source), "dinov3-official"
    if "mask_token" in sd and "pos_embed" in sd:
        return _dinov2(sd), "dinov2-official"
    if "downsample_layers.0.0.weight" in sd and any(k.startswith("stages.") for k in sd):
        return _dinov3_convnext(sd), "dinov3-convnext-official"
    return sd, ""


def _dinov2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in sd.items() if not _dropped(k)}
    if "register_tokens" in out:
        # timm's register model keeps position entries for the patches only: the CLS entry is
        # a constant added to the CLS token, so fold it in (the sum the reference computes).
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    # The giant model's SwiGLU is packed as w12 (gate and value) and w3 in the reference.
    return {re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)): v for k, v in out.items()}


def _dinov3_vit(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if _dropped(k):
            continue
        if k.endswith("attn.qkv.bias"):
            q, kb, vb = v.chunk(3, dim=-1)
            if torch.any(kb != 0):  # the reference masks it to zero; timm has no key bias to put it in
                raise WeightsError(f"{source}: {k} has a non-zero key bias, which DINOv3 keeps at zero; "
                                   f"the file is not a DINOv3 checkpoint as released")
            out[k.replace("qkv.bias", "q_bias")] = q
            out[k.replace("qkv.bias", "v_bias")] = vb
            continue
        k = k.replace("storage_tokens", "reg_token").replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        out[k] = v
    return out


def _dinov3_convnext(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if _dropped(k):
            continue
        k = k.replace("downsample_layers.0.", "stem.")
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
        k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
        if k.startswith("norm."):
            k = "head." + k
        out[k] = v
    return out
