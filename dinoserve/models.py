"""DINO backbones: the factory, and the one door to the model modules.

``create_backbone(name)`` is the one way to build a backbone; ``load_weights(model, src)``
the one way to fill it; ``load_backbone(src)`` does both, working the architecture out of
the weights when it can. Every backbone carries its :class:`~dinoserve.card.ModelCard` as
``model.dino_card`` (:func:`backbone_card`), which export writes into ``config.pbtxt`` and
training into checkpoint ``meta``.

The work is split by job, and the public names of each module are re-exported here:

- :mod:`dinoserve.registry`: the official aliases and the listing (``list_models``);
- :mod:`dinoserve.weights`: resolve a source, read it once, convert, load strictly;
- :mod:`dinoserve.pos_embed`: the reference implementation's position-embedding numerics;
- :mod:`dinoserve.rope`: DINOv3's RoPE on tensor operations, for export with a dynamic grid;
- :mod:`dinoserve.attention`: the last block's CLS attention, shared with ONNX export.

A weight source is resolved and read before any model is built, so a missing or broken
file fails fast. ViTs are built with ``dynamic_img_size=True``; a learned position table
(DINO, DINOv2) is resampled exactly as the reference implementations do, so official
weights give the reference's outputs at any input size, and DINOv3's RoPE is timm's own.
:func:`backbone_outputs` is the one definition of the exported outputs (embedding,
attention, patch tokens), used by export verification and the exported graph alike.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dinoserve.attention import AttentionTap
from dinoserve.card import ModelCard
from dinoserve.contract import ATTENTION, EMBEDDING, output_names
from dinoserve.errors import UnknownModelError, WeightsError
from dinoserve.pos_embed import ReferencePosEmbedViT, reference_pos_embed, traceable_reference_pos_embed
from dinoserve.registry import ALIASES, AliasConfig, is_dinov3_vit, list_models, resolve_name
from dinoserve.rope import TraceableRopeEva, check_dinov3_rope
from dinoserve.weights import (
    Weights,
    extract_backbone_state_dict,
    file_sha256,
    load_state_dict_strict,
    read_checkpoint,
    read_weights,
    resolve_source,
)

__all__ = [
    # factory
    "create_backbone",
    "load_backbone",
    "load_weights",
    "backbone_card",
    "normalize_tensor",
    "forward_with_attention",
    "forward_outputs",
    "backbone_outputs",
    "patch_tokens_of",
    "patch_token_error",
    "ModelCard",
    # registry
    "AliasConfig",
    "ALIASES",
    "list_models",
    # weights
    "Weights",
    "read_weights",
    "read_checkpoint",
    "resolve_source",
    "extract_backbone_state_dict",
    "file_sha256",
    # reference numerics
    "ReferencePosEmbedViT",
    "reference_pos_embed",
    "traceable_reference_pos_embed",
]

def create_backbone(
    name: str,
    *,
    weights: str | os.PathLike | Weights | None = None,
    pretrained: bool = False,
    checkpoint_key: str = "teacher",
    **kwargs: Any,
) -> nn.Module:
    """Build a DINO backbone (no classifier) by alias or timm ``resnet*``/``vit*``/``convnext*`` name.

    Args:
        name: ``dino_vits16`` ... ``dino_resnet50``, or a timm architecture (DINOv2's
            ``vit_*_dinov2``/``vit_*_reg4_dinov2``, DINOv3's ``vit_*_dinov3[_qkvb]`` and
            ``convnext_*`` included).
        weights: a weight source (see :mod:`dinoserve.weights`) or a :class:`Weights` record
            already read, loaded strictly.
        pretrained: load the alias's own weights (aliases only).
        checkpoint_key: ``teacher`` or ``student`` for training checkpoints.
        **kwargs: passed to timm (``img_size``, ``depth``, ``drop_path_rate`` ...); ``None``
            values mean "use the architecture's default". A ResNet's ``img_size`` only
            records the size it is trained and evaluated at.

    The returned module maps a float ``[B, 3, H, W]`` normalised batch to ``[B, D]`` features
    (ViT: final-normed CLS token; ResNet: global average pool; ConvNeXt: average pool and
    its head's LayerNorm, DINOv3's CLS-token equivalent) and carries its
    :class:`~dinoserve.card.ModelCard` as ``model.dino_card``.
    """
    alias, arch, family = resolve_name(name)
    if pretrained and alias is None and weights is None:
        raise UnknownModelError(
            f"{name!r} has no default DINO weights; pass weights=... (e.g. timm:{name}.dino) "
            f"or use an alias: {', '.join(ALIASES)}"
        )
    source = weights if weights is not None else alias.weights if pretrained else None
    record = source if source is None or isinstance(source, Weights) else read_weights(source, checkpoint_key)
    model = _build(arch, family, {k: v for k, v in kwargs.items() if v is not None})
    if record is not None:
        load_weights(model, record)
    return model


def _build(arch: str, family: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if family == "vit":
        kwargs.setdefault("dynamic_img_size", True)
        if is_dinov3_vit(arch):  # upstream DINOv3's feature is the CLS token; timm defaults to avg
            kwargs.setdefault("global_pool", "token")
    timm_kwargs = {k: v for k, v in kwargs.items() if not (family != "vit" and k == "img_size")}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **timm_kwargs)
    except TypeError as e:  # timm rejects unknown kwargs with a TypeError; report it as ours
        raise UnknownModelError(f"cannot build {arch!r} with options {kwargs}: {e}") from None
    if family == "vit":
        model.__class__ = type("Dino" + type(model).__name__, (_position_mixin(model, arch), type(model)), {})
    model.dino_card = _card_of(model, arch, family, kwargs)
    return model


def _position_mixin(model: nn.Module, arch: str) -> type:
    """The mixin that makes a timm ViT's position encoding match its reference and export
    with a dynamic grid: a learned table resampled as facebookresearch/dino(v2) does, or
    DINOv3's RoPE. Anything else is refused by name rather than exported approximately."""
    if getattr(model, "rope", None) is None:
        return ReferencePosEmbedViT
    problem = check_dinov3_rope(model.rope)
    if not problem and getattr(model, "pos_embed", None) is None:
        return TraceableRopeEva
    raise UnknownModelError(f"{arch}: {problem or 'it has both a learned position table and RoPE'}; dinoserve "
                            f"serves DINO, DINOv2 and DINOv3 ViTs (see `dinoserve models dino`)")


def _card_of(model: nn.Module, arch: str, family: str, kwargs: dict[str, Any]) -> ModelCard:
    # Mean/std and interpolation stay the card's defaults (ImageNet, bicubic): DINO, DINOv2
    # and DINOv3 were all trained and evaluated that way, while timm's default cfg of an
    # architecture belongs to its default weights (0.5/0.5 for the plain ViTs).
    if family == "vit":
        return ModelCard(
            arch=arch, family=family, embed_dim=model.embed_dim,
            image_size=int(model.patch_embed.img_size[0]), patch_size=int(model.patch_embed.patch_size[0]),
            num_heads=model.blocks[-1].attn.num_heads,
            num_registers=int(model.num_prefix_tokens) - (1 if model.cls_token is not None else 0),
            position="rope" if getattr(model, "rope", None) is not None else "learned",
            model_kwargs={k: v for k, v in kwargs.items() if k != "dynamic_img_size"},
        )
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    # A ConvNeXt's patch tokens are its last feature map: one per 32 x 32 pixels.
    stride = int(model.feature_info[-1]["reduction"]) if family == "convnext" else 0
    return ModelCard(arch=arch, family=family, embed_dim=model.num_features, patch_size=stride,
                     image_size=int(kwargs.get("img_size", size)), model_kwargs=dict(kwargs))


def backbone_card(model: nn.Module) -> ModelCard:
    """The :class:`~dinoserve.card.ModelCard` of a backbone made by :func:`create_backbone`."""
    card = getattr(model, "dino_card", None)
    if card is None:
        raise TypeError("model was not built by dinoserve.models.create_backbone")
    return card


def normalize_tensor(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[N, 3, H, W]`` RGB in [0, 1] minus ``mean``, over ``std``, per channel, on ``x``'s device:
    the torch side of :func:`dinoserve.images.normalize` (which starts from uint8 on the CPU)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def load_weights(model: nn.Module, source: str | os.PathLike | Weights, checkpoint_key: str = "teacher") -> Weights:
    """Load a weight source (or a :class:`Weights` record) into a backbone, strictly.

    The backbone's card then names the weights (``weights_sha256``). Returns the record.
    """
    weights = source if isinstance(source, Weights) else read_weights(source, checkpoint_key)
    card = backbone_card(model)
    load_state_dict_strict(model, weights, card.arch)
    model.dino_card = card.replace(weights_sha256=weights.sha256, fit=weights.fit)
    return weights


def load_backbone(
    weights: str | os.PathLike | Weights,
    arch: str | None = None,
    *,
    checkpoint_key: str = "teacher",
    **kwargs: Any,
) -> nn.Module:
    """Build the backbone that ``weights`` belongs to and load them.

    ``arch`` may be omitted for aliases, timm tags and checkpoints whose architecture can
    be read from their contents (dinoserve metadata or the keys). When it is given and the
    file says how that same architecture was built (image size, depth, patch size), those
    settings are used; explicit ``kwargs`` win over both.
    """
    record = weights if isinstance(weights, Weights) else read_weights(weights, checkpoint_key)
    if arch is None:
        if record.arch is None:
            raise WeightsError(f"{record.source}: {record.arch_problem}")
        arch = record.arch
    arch = ALIASES[arch].arch if arch in ALIASES else arch
    own = record.arch_kwargs if record.arch == arch else {}
    return create_backbone(arch, weights=record, **{**own, **kwargs})


def patch_token_error(card: ModelCard) -> str:
    """Why a backbone has no patch tokens (``""`` when it has): ViTs and ConvNeXts have them."""
    if card.family in ("vit", "convnext"):
        return ""
    return (f"{card.arch} is a {card.family or 'model'} without patch tokens: --patch-tokens needs a ViT "
            f"(DINO, DINOv2, DINOv3) or a DINOv3 ConvNeXt")


def patch_tokens_of(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``[B, N, D]`` final-normed patch tokens from ``model.forward_features``' output, in
    row-major patch order. A ViT's CLS and register tokens are left out. A ConvNeXt's last
    feature map gets the same LayerNorm as its pooled feature, as DINOv3 defines its patch
    tokens (the norm over ``[pooled, patches]`` is per token)."""
    card = backbone_card(model)
    if card.family == "vit":
        return features[:, model.num_prefix_tokens:]
    if card.family == "convnext":
        norm = model.head.norm
        tokens = features.flatten(2).transpose(1, 2)
        return F.layer_norm(tokens, tokens.shape[-1:], norm.weight, norm.bias, norm.eps)
    raise UnknownModelError(patch_token_error(card))


def backbone_outputs(model: nn.Module, x: torch.Tensor, tap: AttentionTap | None = None,
                     patch_tokens: bool = False) -> list[torch.Tensor]:
    """The outputs :func:`dinoserve.contract.output_names` lists, for a normalised batch
    ``x``: what export verification compares with, and what the exported graph computes.
    ``tap`` is an :class:`~dinoserve.attention.AttentionTap` installed on ``model`` (ViTs)."""
    if patch_tokens:
        features = model.forward_features(x)
        out = [model.forward_head(features)]
    else:
        out = [model(x)]
    if tap is not None:
        out.append(tap.cls_maps(x))
    if patch_tokens:
        out.append(patch_tokens_of(model, features))
    return out


@torch.no_grad()
def forward_outputs(model: nn.Module, x: torch.Tensor, patch_tokens: bool = False) -> dict[str, torch.Tensor]:
    """Every output of the backbone's exported graph, by name, computed in PyTorch."""
    card = backbone_card(model)
    if patch_tokens and patch_token_error(card):
        raise UnknownModelError(patch_token_error(card))
    tap = AttentionTap(model) if card.family == "vit" else None
    try:
        return dict(zip(output_names(card.family, patch_tokens), backbone_outputs(model, x, tap, patch_tokens)))
    finally:
        if tap is not None:
            tap.remove()


@torch.no_grad()
def forward_with_attention(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features plus the last block's CLS->patch attention, ``[B, heads, H/p, W/p]``
    (register tokens left out)."""
    card = backbone_card(model)
    if card.family != "vit":
        raise UnknownModelError(f"{card.arch} is a {_FAMILY_WORDS.get(card.family, card.family)}: attention maps "
                                f"exist for ViT models only")
    out = forward_outputs(model, x)
    return out[EMBEDDING], out[ATTENTION]


_FAMILY_WORDS = {"resnet": "ResNet", "convnext": "ConvNeXt", "vit": "ViT"}

