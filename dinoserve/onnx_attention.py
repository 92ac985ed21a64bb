"""ViT attention as one ONNX ``Attention`` operator (opset 23) in exported graphs.

timm's attention reshapes the fused query/key/value product to ``[3, batch, heads, tokens,
head_dim]`` and splits it: views in PyTorch, but a Transpose and a Split that copy the
tensors in an ONNX graph, followed by four operators for the attention itself. Written as
three products with the weight slices (constants of the graph) and one ``Attention``
operator on ``[batch, tokens, width]`` tensors, nothing is copied and onnxruntime runs its
fused attention kernel. ViT-S/16 fp32 went from 0.94x to 1.00x of PyTorch eager here (batch
8, one thread), and the profile lost 40 ms of copies per 750-ms batch.

Only the exported graph sees this: :class:`dinoserve.export.ExportWrapper` calls
:func:`use_onnx_attention` on its own copy of the backbone. The export's verification
compares the graph with the unchanged model, so a difference fails the export.
"""

from __future__ import annotations

import types
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["use_onnx_attention"]


def _rewritable(module: nn.Module) -> bool:
    """A plain timm attention: no query/key norm, no output norm, no gate. Anything else keeps
    timm's forward (its extra steps are not in this one)."""
    from timm.layers import Attention

    return (type(module) is Attention
            and all(isinstance(getattr(module, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
            and getattr(module, "gate", None) is None)


def _forward(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
             is_causal: bool = False) -> torch.Tensor:
    if attn_mask is not None or is_causal:  # not a ViT encoder's call: timm's own path
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    width = self.num_heads * self.head_dim
    w, b = self.qkv.weight, self.qkv.bias
    q, k, v = (F.linear(x, w[i * width:(i + 1) * width], None if b is None else b[i * width:(i + 1) * width])
               for i in range(3))
    out = torch.onnx.ops.attention(q, k, v, q_num_heads=self.num_heads, kv_num_heads=self.num_heads,
                                   scale=self.scale)[0]
    return self.proj_drop(self.proj(out))


def use_onnx_attention(vit: nn.Module, keep: Iterable[nn.Module] = ()) -> int:
    """Give every plain timm attention module of ``vit``, except those in ``keep``, a forward
    that exports as one ONNX ``Attention`` operator. Changes ``vit`` in place (pass a copy);
    returns how many modules changed."""
    kept = {id(m) for m in keep}
    changed = 0
    for module in vit.modules():
        if id(module) not in kept and _rewritable(module):
            module.forward = types.MethodType(_forward, module)
            changed += 1
    return changed
