"""The attention tap: a ViT's last-block CLS->patch attention, for PyTorch code and ONNX export.

timm computes attention inside ``scaled_dot_product_attention`` (the fused path), where
the probabilities are never visible. :class:`AttentionTap` switches the last block to the
non-fused path and hooks its attention dropout, which receives the softmax output.
:func:`dinoserve.models.forward_with_attention` uses it for one forward pass; the export
wrapper keeps one installed, so the exported ``attention`` output is the same tensor.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AttentionTap"]


class AttentionTap:
    """Captures the last block's attention probabilities of a timm ViT.

    Example::

        tap = AttentionTap(vit)
        try:
            features = vit(x)
            maps = tap.cls_maps(x)  # [B, heads, H/p, W/p]
        finally:
            tap.remove()
    """

    def __init__(self, vit: nn.Module):
        self._attn = vit.blocks[-1].attn
        self.num_heads = int(self._attn.num_heads)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self._prefix = int(vit.num_prefix_tokens)
        self._fused = self._attn.fused_attn
        self._attn.fused_attn = False
        self._captured: list[torch.Tensor] = []
        self._handle = self._attn.attn_drop.register_forward_hook(lambda _m, _i, out: self._keep(out))

    @property
    def module(self) -> nn.Module:
        """The tapped attention module (the last block's)."""
        return self._attn

    def _keep(self, probs: torch.Tensor) -> None:
        self._captured[:] = [probs]  # only the latest forward pass is ever read

    def cls_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The CLS token's attention to each patch in the last forward pass on ``images``
        (``[B, 3, H, W]``), as ``[B, heads, H/p, W/p]``; rows sum to 1 minus CLS->CLS."""
        if not self._captured:
            raise RuntimeError("AttentionTap: no forward pass since the tap was installed")
        probs = self._captured[-1]
        h, w = images.shape[2] // self.patch_size, images.shape[3] // self.patch_size
        return probs[:, :, 0, self._prefix:].reshape(images.shape[0], self.num_heads, h, w)

    def remove(self) -> None:
        """Uninstall: the block goes back to its own attention path."""
        self._handle.remove()
        self._attn.fused_attn = self._fused
        self._captured.clear()
