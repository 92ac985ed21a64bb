"""Which backbones dinoserve builds: the official DINO aliases, timm's ResNets and ViTs
(DINO, DINOv2 with and without registers, DINOv3 with RoPE) and DINOv3's ConvNeXts.

An alias (``dino_vits16`` ... ``dino_resnet50``, the official hub names) is a timm
architecture plus the weights that belong to it. :func:`list_models` is the one listing
(``dinoserve models``), :func:`resolve_name` the one name check the factory uses, and
:func:`family_of_name` the one "is it a ViT or a ResNet" rule for a name; all read the
registry below. timm is imported only when a listing or check needs it.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from dataclasses import dataclass

from dinoserve.card import family_of
from dinoserve.errors import UnknownModelError

__all__ = ["AliasConfig", "ALIASES", "family_of_name", "generation_of", "is_dinov3_vit", "list_models",
           "large_model_note", "memory_shortfall", "not_exportable", "resolve_name"]

_FB = "https://dl.fbaipublicfiles.com/dino"


@dataclass(frozen=True)
class AliasConfig:
    """An official DINO model: a timm architecture plus the weights that belong to it."""

    name: str
    arch: str
    weights: str  # a weight source (timm tag or URL)
    official_url: str  # the facebookresearch/dino backbone-only file
    knn_top1: float  # ImageNet k-NN top-1 reported by the paper
    linear_top1: float
    description: str = ""


ALIASES: dict[str, AliasConfig] = {
    a.name: a
    for a in [
        AliasConfig("dino_vits16", "vit_small_patch16_224", "timm:vit_small_patch16_224.dino",
                    f"{_FB}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", 74.5, 77.0,
                    "ViT-S/16, 21M params"),
        AliasConfig("dino_vits8", "vit_small_patch8_224", "timm:vit_small_patch8_224.dino",
                    f"{_FB}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", 78.3, 79.7,
                    "ViT-S/8, 21M params"),
        AliasConfig("dino_vitb16", "vit_base_patch16_224", "timm:vit_base_patch16_224.dino",
                    f"{_FB}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", 76.1, 78.2,
                    "ViT-B/16, 85M params"),
        AliasConfig("dino_vitb8", "vit_base_patch8_224", "timm:vit_base_patch8_224.dino",
                    f"{_FB}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", 77.4, 80.1,
                    "ViT-B/8, 85M params"),
        AliasConfig("dino_resnet50", "resnet50",
                    f"{_FB}/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
                    f"{_FB}/dino_resnet50_pretrain/dino_resnet50_pretrain.pth", 67.5, 75.3,
                    "ResNet-50, 23M params (timm hosts no DINO ResNet-50)"),
    ]
}


#: The largest DINO architectures: timm name fragment -> parameters. Their weights go to
#: ``model.onnx.data`` (over protobuf's 2 GB), and exporting them needs memory to match.
_LARGE = {"_giant_": 1.14e9, "_huge_plus_": 0.84e9, "_7b_": 6.7e9}

#: Peak memory of an export (trace, write, verify) per byte of fp32 weights, measured 3.31 for
#: DINOv2 ViT-g (15.1 GB) and 3.40 for DINOv3 ViT-H+ (benchmarks/results/export_large.json).
EXPORT_MEMORY_PER_WEIGHT_BYTE = 3.5
#: The same for an int8 export, whose quantiser holds the graph several times over: 6.02
#: measured for DINOv3 ViT-L (7.3 GB for 1.2 GB of weights, export_large.json).
INT8_EXPORT_MEMORY_PER_WEIGHT_BYTE = 6.5


def is_dinov3_vit(arch: str) -> bool:
    """True for timm's DINOv3 ViTs (``vit_*_dinov3``, ``vit_*_dinov3_qkvb``)."""
    return arch.startswith("vit") and (arch.endswith("_dinov3") or arch.endswith("_dinov3_qkvb"))


def generation_of(arch: str) -> str:
    """The DINO generation an architecture name belongs to, in words: ``"DINOv3 ViT"``,
    ``"DINOv3 ConvNeXt"``, ``"DINOv2 ViT"``, ``"DINO ViT"``, ``"ResNet"`` or ``""``."""
    alias = ALIASES.get(arch)
    arch = alias.arch if alias else arch
    family = family_of(arch)
    if family == "convnext":
        return "DINOv3 ConvNeXt"
    if family == "resnet":
        return "ResNet"
    if family != "vit":
        return ""
    if is_dinov3_vit(arch):
        return "DINOv3 ViT"
    return "DINOv2 ViT" if arch.endswith("_dinov2") else "DINO ViT"


def machine_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_shortfall(weight_bytes: int, int8: bool = False, memory: int | None = None) -> str:
    """Why exporting a model of ``weight_bytes`` fp32 weights would run out of ``memory``
    (default: this machine's), in words; ``""`` when it fits."""
    memory = machine_memory() if memory is None else memory
    factor = INT8_EXPORT_MEMORY_PER_WEIGHT_BYTE if int8 else EXPORT_MEMORY_PER_WEIGHT_BYTE
    need = weight_bytes * factor
    if need <= memory:
        return ""
    return (f"{'an int8 ' if int8 else ''}export of {weight_bytes / 2**30:.1f} GiB of fp32 weights needs about "
            f"{need / 2**30:.0f} GiB of memory ({factor:g} x), this machine has {memory / 2**30:.0f} GiB")


def _large_params(name: str) -> float:
    """Parameters of ``name`` when it is one of :data:`_LARGE`; 0 otherwise."""
    return next((params for part, params in _LARGE.items() if part in name), 0)


def large_model_note(name: str, memory: int | None = None) -> str:
    """What to know before exporting ``name`` when it is one of the largest DINO models, in
    words (its weights go to ``model.onnx.data``; int8 where memory does not allow it); ``""``
    for any other model."""
    params = _large_params(name)
    if not params:
        return ""
    int8 = memory_shortfall(int(params * 4), int8=True, memory=memory)
    note = f"{params / 1e9:.1f}B parameters: weights exported to model.onnx.data (over 2 GB)"
    return note + (f"; no int8 here: {int8}" if int8 else "")


def not_exportable(name: str, memory: int | None = None) -> str:
    """Why ``name`` cannot be exported on a machine with ``memory`` bytes (default: this
    one's); ``""`` when it can."""
    params = _large_params(name)
    short = memory_shortfall(int(params * 4), memory=memory) if params else ""
    return f"not exportable here: {params / 1e9:.1f}B parameters; {short}" if short else ""


def _dino_tags(name: str) -> list[str]:
    """timm's DINO weight tags of an architecture (``convnext_tiny.dinov3_lvd1689m``), so a
    search for "dino" also finds the ConvNeXts whose names do not say it."""
    import timm

    return [t for t in timm.list_pretrained(f"{name}.*") if "dino" in t.split(".", 1)[-1]]


def _dino_convnexts() -> list[str]:
    import timm

    return sorted({t.split(".")[0] for t in timm.list_pretrained("convnext*") if ".dinov3" in t})


def list_models(pattern: str = "*") -> list[str]:
    """Aliases, timm ``resnet*``/``vit*`` architectures and DINOv3's ConvNeXts matching
    ``pattern``.

    ``pattern`` is a shell wildcard (``'vit_small*'``); a plain word without ``*``, ``?``
    or ``[`` matches anywhere in the name or its DINO weight tag (``dino`` lists every alias,
    DINOv2 and DINOv3 model).
    """
    import timm

    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    names = list(ALIASES) + [n for family in ("vit", "resnet") for n in timm.list_models(f"{family}*")]
    names += _dino_convnexts()
    return [n for n in names if fnmatch.fnmatch(n, pattern)
            or (family_of(n) == "convnext" and any(fnmatch.fnmatch(t, pattern) for t in _dino_tags(n)))]


def family_of_name(name: str) -> str:
    """``"vit"``, ``"resnet"`` or ``""`` for an alias or a timm name, by the card's family rule
    (:func:`dinoserve.card.family_of`) applied to the alias's architecture. No timm needed:
    an unknown name is not checked here (the factory does that)."""
    alias = ALIASES.get(name)
    return family_of(alias.arch if alias else name)


def resolve_name(name: str) -> tuple[AliasConfig | None, str, str]:
    """``(alias or None, timm architecture, family)`` of an alias or a timm name.

    Raises :class:`~dinoserve.errors.UnknownModelError` naming the choices and the closest
    known names.
    """
    import timm

    alias = ALIASES.get(name)
    arch = alias.arch if alias else name
    family = family_of_name(name)
    if not family or (alias is None and not timm.is_model(arch)):
        close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}: use a DINO alias ({', '.join(ALIASES)}), a timm resnet*/vit* "
            f"architecture or a DINOv3 ConvNeXt ({', '.join(_dino_convnexts())}); see `dinoserve models`.{hint}"
        )
    return alias, arch, family
