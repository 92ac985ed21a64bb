"""DINOv3's rotary position embedding (RoPE) with a dynamic patch grid, for ONNX export.

timm builds DINOv3's RoPE table from Python numbers (``torch.arange(0.5, h)``,
``float(h)``), so ``torch.export`` either specialises the graph to the example's grid or
fails. :func:`dinov3_rope_table` is the same arithmetic, in the same order, on tensor
operations whose only inputs are the grid's sides, so the exported graph recomputes the
table for every input size. It is the table itself, not an approximation: a test checks it
equals timm's bit for bit at several grids, and every export is verified against timm's
own forward at two sizes.

:class:`TraceableRopeEva` is the mixin that uses it while exporting and timm's code
otherwise (the PyTorch outputs an export is checked against stay timm's).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["TraceableRopeEva", "dinov3_rope_table", "check_dinov3_rope"]


def check_dinov3_rope(rope: nn.Module | None) -> str:
    """``""`` when ``rope`` is a RoPE module :func:`dinov3_rope_table` reproduces, else why not."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    if not isinstance(rope, RotaryEmbeddingDinoV3):
        return f"its position encoding is {type(rope).__name__}, not DINOv3's RoPE"
    if rope.normalize_coords != "separate" or rope.grid_indexing != "ij":
        return (f"its RoPE normalises coordinates by {rope.normalize_coords!r} with {rope.grid_indexing!r} "
                f"indexing; only DINOv3's 'separate'/'ij' grid is exported")
    return ""


def dinov3_rope_table(rope: nn.Module, h: int | torch.SymInt, w: int | torch.SymInt) -> torch.Tensor:
    """``[h * w, 2 * dim]`` sin then cos of DINOv3's RoPE for an ``h x w`` patch grid, as timm's
    ``RotaryEmbeddingDinoV3.get_embed(shape=(h, w))`` computes it in eval mode (no coordinate
    augmentation): patch centres at ``(i + 0.5) / side`` mapped to [-1, 1], angles
    ``2 pi coord / period``, rows then columns."""
    dtype = rope.periods.dtype
    # (i + 0.5 + offset) / side per axis, as timm's arange(0.5, side) + offset, / float(side)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5 + rope.grid_offset) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5 + rope.grid_offset) / w
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)
    coords = (2.0 * grid - 1.0).flatten(0, 1)  # [h * w, 2]
    angles = 2 * math.pi * coords[:, :, None].to(dtype) / rope.periods[None, None, :]
    angles = angles.flatten(1)  # [h * w, dim / 2]: the row frequencies, then the column ones
    sin, cos = angles.sin(), angles.cos()
    if rope.rotate_half:  # [f0 .. fk, f0 .. fk]: the layout of timm's apply_rot_embed(half=True)
        sin, cos = torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)
    else:  # interleaved [f0, f0, f1, f1, ...]
        sin, cos = sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)
    return torch.cat([sin, cos], dim=-1)


class TraceableRopeEva:
    """Mixin for a timm ``Eva`` with DINOv3 RoPE and no learned position table: while
    exporting, ``_pos_embed`` builds the RoPE table with :func:`dinov3_rope_table` from the
    (symbolic) patch grid; in eager mode it is timm's own."""

    def _pos_embed(self, x: torch.Tensor):
        if not torch.compiler.is_exporting():
            return super()._pos_embed(x)
        B, H, W, C = x.shape
        x = x.view(B, -1, C)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat(prefix + [x], dim=1) if prefix else x
        return self.pos_drop(x), dinov3_rope_table(self.rope, H, W)
