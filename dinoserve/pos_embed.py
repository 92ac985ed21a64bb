"""Position embeddings resampled exactly as facebookresearch/dino does it.

timm resamples a ViT's position table to a target size; the reference resamples by scale
factors ``(H/p + 0.1) / sqrt(N)`` (bicubic, no antialias) and keeps the table unchanged
only when the grid is square with the trained token count. The two differ by ~2e-2 at
160x96, so dinoserve's ViTs follow the reference (:class:`ReferencePosEmbedViT`) to
reproduce official outputs at any input size. :func:`traceable_reference_pos_embed` is the
same numerics as tensor operations only, for an ONNX graph whose patch grid stays dynamic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ReferencePosEmbedViT", "reference_pos_embed", "traceable_reference_pos_embed"]


class ReferencePosEmbedViT:
    """Mixin for a timm ``VisionTransformer``: its ``_pos_embed`` uses
    :func:`reference_pos_embed` (see the module docstring).

    DINOv2 with registers is a timm ``no_embed_class`` model: its table holds the patches only
    (timm folded the CLS position into the CLS token), and the CLS and register tokens go in
    front of the patches after the table is added, as in facebookresearch/dinov2.
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.view(B, -1, C)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, getattr(self, "reg_token", None)) if t is not None]
        if getattr(self, "no_embed_class", False):
            x = x + reference_pos_embed(self.pos_embed, H, W, num_prefix=0)
            x = torch.cat(prefix + [x], dim=1) if prefix else x
        else:
            x = torch.cat(prefix + [x], dim=1) if prefix else x
            x = x + reference_pos_embed(self.pos_embed, H, W, num_prefix=self.num_prefix_tokens)
        return self.pos_drop(x)


def reference_pos_embed(pos_embed: torch.Tensor, h: int, w: int, num_prefix: int = 1) -> torch.Tensor:
    """The reference ``interpolate_pos_encoding`` for a ``h x w`` patch grid: the first
    ``num_prefix`` entries (CLS) are kept, the patch table resampled."""
    if torch.compiler.is_exporting():
        # The Python branch and scale factors below would be baked into an exported graph
        # at the example size; the matrix form keeps the patch grid dynamic.
        return traceable_reference_pos_embed(pos_embed, h, w, num_prefix)
    n = pos_embed.shape[1] - num_prefix
    if h * w == n and h == w:
        return pos_embed
    side = math.sqrt(n)
    cls_pos, patch_pos = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = pos_embed.shape[-1]
    grid = patch_pos.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


_CUBIC_A = -0.75  # PyTorch's (and the reference's) bicubic convolution constant


def _bicubic_matrix(out: int, side: int, same: torch.Tensor) -> torch.Tensor:
    """``[out, side]`` weights of PyTorch's bicubic resize (align_corners=False) by the
    reference's scale ``(out + 0.1) / side``, or the identity when ``same`` is true
    (scale 1.0 gives the weights 0, 1, 0, 0 exactly)."""
    o = torch.arange(out, dtype=torch.float64)
    target = torch.scalar_tensor(out, dtype=torch.float64)
    scale = torch.where(same, torch.ones((), dtype=torch.float64), (target + 0.1) / side)
    real = (o + 0.5) / scale - 0.5
    idx = torch.floor(real)
    t = real - idx
    a = _CUBIC_A
    weights = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
               ((a + 2) * t - (a + 3)) * t * t + 1,
               ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
               ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
    cols = torch.arange(side, dtype=torch.float64)
    m = torch.zeros(out, side, dtype=torch.float64)
    for k, wk in enumerate(weights):  # taps at idx-1 .. idx+2, clamped to the border
        tap = torch.clamp(idx + (k - 1), 0, side - 1)
        m = m + (tap[:, None] == cols[None, :]).to(torch.float64) * wk[:, None]
    return m


def traceable_reference_pos_embed(pos_embed: torch.Tensor, h: int, w: int, num_prefix: int = 1) -> torch.Tensor:
    """:func:`reference_pos_embed` as tensor operations only, for ONNX export with a dynamic
    patch grid: the separable bicubic resize is two small matrix products. Equal to the
    eager formula up to float rounding (it is closer to a float64 resize than PyTorch's
    float32 kernel), and exactly the table itself at the trained grid."""
    n = pos_embed.shape[1] - num_prefix
    side = math.isqrt(n)
    dim = pos_embed.shape[-1]
    same = torch.scalar_tensor(h == side, dtype=torch.bool) & torch.scalar_tensor(w == side, dtype=torch.bool)
    grid = pos_embed[0, num_prefix:].reshape(side, side, dim)
    mh = _bicubic_matrix(h, side, same).to(pos_embed.dtype)
    mw = _bicubic_matrix(w, side, same).to(pos_embed.dtype)
    patches = torch.einsum("hi,ijd,wj->hwd", mh, grid, mw)
    return torch.cat([pos_embed[:, :num_prefix], patches.reshape(1, -1, dim)], dim=1)
