"""The model card: one torch-free description of a backbone, read and written everywhere.

A :class:`ModelCard` says what a model is (timm architecture, family, sizes, heads) and what
a consumer must do to feed it (image size, crop, interpolation, mean/std), plus which
weights and precision it holds. It is the only place these fields are defined:

- the backbone carries it (``model.dino_card``, set by :func:`dinoserve.models.create_backbone`);
- training checkpoints store :meth:`ModelCard.to_dict` in ``meta``;
- export writes :meth:`ModelCard.to_params` into ``config.pbtxt`` ``parameters``, and
  :mod:`dinoserve.repository` reads them back with :meth:`ModelCard.from_params`;
- the client, the index (``meta.preprocessing``) and the app read it from there.

Each field's type decides how it is written as a Triton parameter (always a string) and
read back, so adding a field means adding one line below. Parameter names are the field
names; configs written before a field existed load with the field's default.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from dinoserve.errors import ModelError
from dinoserve.images import DEFAULT_CROP_PCT, FITS, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ModelCard", "family_of", "FAMILIES"]

#: The backbone families dinoserve builds, by timm architecture prefix. ``vit`` covers DINO,
#: DINOv2 (learned position table) and DINOv3 (RoPE) ViTs; ``convnext`` the DINOv3 ConvNeXts.
FAMILIES = ("vit", "resnet", "convnext")

#: Field metadata key: False keeps a field out of ``config.pbtxt`` (build details only the
#: PyTorch side needs).
_PARAM = "param"


def family_of(arch: str) -> str:
    """``"vit"``, ``"resnet"`` or ``"convnext"`` for a timm architecture name; ``""`` for anything else."""
    for family in FAMILIES:
        if arch.startswith(family):
            return family
    return ""


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """What serving, indexing and display need to know about a backbone.

    Only ``image_size`` and ``embed_dim`` are required: a config written by hand or by an
    older dinoserve may say no more, and a client can still preprocess for it.
    """

    arch: str = ""  # timm architecture, e.g. "vit_small_patch16_224"
    family: str = ""  # "vit", "resnet" or "convnext"; worked out from arch when not given
    image_size: int  # square input side a client sends, in pixels
    patch_size: int = 0  # ViT patch side; a ConvNeXt's patch-token stride (32); 0 for ResNets
    num_heads: int = 0  # ViT attention heads of the last block; 0 for ResNets
    # ViT tokens before the patches that are neither CLS nor a patch (DINOv2-reg, DINOv3): they
    # are left out of the attention map and the patch tokens, so a client must know them.
    num_registers: int = 0
    position: str = ""  # how a ViT encodes position: "learned" (DINO, DINOv2) or "rope" (DINOv3)
    embed_dim: int  # length of the ``embedding`` output
    mean: tuple[float, ...] = IMAGENET_MEAN  # normalisation the graph applies to [0, 1] RGB
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = DEFAULT_CROP_PCT  # resize the shorter side to image_size / crop_pct, centre-crop
    fit: str = "crop"  # "crop" (shorter side, crop_pct) or "pad" (border trimmed, padded): images.fit_image
    interpolation: str = "bicubic"  # resize filter of that preprocessing
    weights_sha256: str = ""  # hex sha256 of the weights file loaded; "" when random or unknown
    precision: str = "fp32"  # compute precision of an exported graph: "fp32", "fp16" or "int8"
    # int8 only: how it was quantised, which decides the CPUs it is right on (dinoserve.cpu):
    # "u8s7" (7-bit weights, every CPU), "u8u8", or "u8s8" (needs VNNI/AMX-INT8). An int8
    # config without it predates the field and was u8s8.
    int8_scheme: str = ""
    # timm constructor options that rebuild the architecture (depth, img_size ...); checkpoint
    # meta only. Not hashed, so the card stays hashable.
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, metadata={_PARAM: False})

    def __post_init__(self) -> None:
        if not self.family and self.arch:
            object.__setattr__(self, "family", family_of(self.arch))
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))

    # --- views ------------------------------------------------------------------------------
    def preprocessing(self) -> dict[str, Any]:
        """How images become this model's input (stored in index metadata, shown to users)."""
        return {"image_size": self.image_size, "crop_pct": self.crop_pct, "fit": self.fit,
                "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}

    def replace(self, **changes: Any) -> "ModelCard":
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # --- checkpoint meta and index meta -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, not tuples), for ``torch.save(weights_only)`` and JSON."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "model card", **defaults: Any) -> "ModelCard":
        """Read :meth:`to_dict` output (other keys ignored; missing fields take ``defaults``,
        then the field's own default)."""
        values = {**defaults, **{k: v for k, v in d.items() if k in _fields()}}
        return _build(cls, values, source)

    # --- config.pbtxt parameters ------------------------------------------------------------
    def to_params(self) -> dict[str, str]:
        """Triton ``parameters`` (every value a string), one per field, named as the field."""
        return {name: _encode(getattr(self, name), kind) for name, kind in _param_fields().items()}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, source: str = "model config", **defaults: Any) -> "ModelCard":
        """Read :meth:`to_params` output. Unknown keys are ignored; a parameter missing from an
        older config takes ``defaults`` (e.g. ``embed_dim`` from the output dims), then the
        field's default. Raises :class:`~dinoserve.errors.ModelError` naming ``source`` when
        a required field is missing or a value is malformed."""
        values = dict(defaults)
        kinds = _param_fields()
        for name, raw in params.items():
            if name not in kinds or raw is None or (isinstance(raw, str) and raw == "" and kinds[name] is not str):
                continue
            try:
                values[name] = _decode(raw, kinds[name])
            except (TypeError, ValueError) as e:
                raise ModelError(f"{source}: malformed parameter {name}={raw!r} ({e}); re-export it "
                                 f"with `dinoserve export`") from None
        return _build(cls, values, source)


# --- one codec per field type ------------------------------------------------------------------


def _fields() -> dict[str, Any]:
    """Field name -> resolved type (tuple, int, float, str or dict)."""
    hints = typing.get_type_hints(ModelCard)
    return {f.name: typing.get_origin(hints[f.name]) or hints[f.name] for f in dataclasses.fields(ModelCard)}


def _param_fields() -> dict[str, Any]:
    kinds = _fields()
    return {f.name: kinds[f.name] for f in dataclasses.fields(ModelCard) if f.metadata.get(_PARAM, True)}


def _encode(value: Any, kind: Any) -> str:
    if kind is tuple:
        return ",".join(repr(float(v)) for v in value)
    if kind is float:
        return repr(float(value))
    if kind is dict:
        return json.dumps(value, sort_keys=True)
    return str(value)


def _decode(raw: Any, kind: Any) -> Any:
    if kind is tuple:
        items = raw.strip("[]() ").split(",") if isinstance(raw, str) else raw
        return tuple(float(v) for v in items)
    if kind is dict:
        return dict(json.loads(raw) if isinstance(raw, str) else raw)
    return kind(raw)


def _build(cls: type[ModelCard], values: dict[str, Any], source: str) -> ModelCard:
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if values.get(name) in (None, "", -1)]
    if missing:
        raise ModelError(
            f"{source}: no {' or '.join(repr(m) for m in missing)} given, so a client can neither "
            f"preprocess for this model nor size its output; re-export it with `dinoserve export`"
        )
    kinds = _fields()
    try:
        return cls(**{k: _decode(v, kinds[k]) if kinds[k] in (int, float) else v for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise ModelError(f"{source}: malformed model description ({e}); re-export it with `dinoserve export`") from None
