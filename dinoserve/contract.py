"""The exported graph's tensor names: the one place export, int8 quantisation,
``config.pbtxt``, the backends and the client take them from.

The contract (docs/DESIGN.md, "ONNX and Triton contract"):

- :data:`INPUT` ``images``: UINT8 ``[B, 3, H, W]``, RGB, already fitted by the client; the
  graph normalises;
- :data:`EMBEDDING` ``embedding``: FP32 ``[B, D]``, not L2-normalised (the client does that);
- :data:`ATTENTION` ``attention`` (ViTs): FP32 ``[B, heads, H/p, W/p]``, the last block's CLS
  attention over the patch tokens;
- :data:`PATCH_TOKENS` ``patch_tokens`` (exported on request): FP32 ``[B, N, D]``.

Clients and servers outside dinoserve see these names on the wire, so they never change.
No imports: every layer, the torch-free client included, can use this module.
"""

from __future__ import annotations

__all__ = ["INPUT", "EMBEDDING", "ATTENTION", "PATCH_TOKENS", "output_names"]

INPUT = "images"
EMBEDDING = "embedding"
ATTENTION = "attention"
PATCH_TOKENS = "patch_tokens"


def output_names(family: str, patch_tokens: bool = False) -> list[str]:
    """The graph's outputs for a backbone of ``family`` (``vit``, ``resnet``, ``convnext``), in
    order: ``embedding``, ``attention`` for ViTs, then ``patch_tokens`` when asked for."""
    return [EMBEDDING] + ([ATTENTION] if family == "vit" else []) + ([PATCH_TOKENS] if patch_tokens else [])
