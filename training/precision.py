"""Mixed precision: which dtype a run uses, its autocast context and its grad scaler.

``auto`` picks bf16 on CUDA devices that support it (else fp16 with a scaler). On the CPU
it picks bf16 only where it is faster: with AMX tiles (Sapphire Rapids and later), checked,
not assumed. AVX512-BF16 alone computes bf16 but does not pay: on this project's 2-core
Xeon (AVX512-BF16, no AMX) a forward + backward at 64 px took 1.17 s in bf16 vs 0.67 s in
fp32 for resnet18 and 1.17 s vs 0.26 s for vit_tiny (batch 16, best of 4), so ``auto``
stays fp32 there; ``--precision bf16`` still forces it. fp16 is refused on the CPU.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

from dinoserve.errors import ConfigError


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """AMX tiles: the CPU feature that makes bf16 training faster than fp32."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe() and cpu_supports_bf16())


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX), plus a working bf16 matmul."""
    native = False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            native = True
    if not native:
        return False
    a = torch.ones(4, 4, dtype=torch.bfloat16)
    return bool((a @ a).float().sum() == 64)


def resolve_precision(requested: str, device: torch.device) -> str:
    """One of fp32, bf16, fp16 for ``requested`` (auto, fp32, bf16, fp16) on ``device``."""
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision {requested!r} is not one of auto, fp32, bf16, fp16")
    cuda = device.type == "cuda"
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_amx() else "fp32"
    if requested == "fp16" and not cuda:
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if requested == "bf16" and not cuda and not cpu_supports_bf16():
        raise ConfigError("--precision bf16: this CPU has no native bf16 (AVX512-BF16/AMX); use fp32")
    return requested


def autocast(precision: str, device: torch.device):
    """The autocast context of a forward pass (a null context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 only; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
