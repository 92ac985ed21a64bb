"""What a client needs to know about a served model, read from its configuration.

Both backends describe their model with one :class:`ModelInfo`: the embedded backend
builds it from the repository's ``config.pbtxt`` (through :mod:`dinoserve.repository`),
the Triton backend from the server's model-config endpoint (JSON). Preprocessing is
derived from it, never retyped (image size and crop from the config ``parameters``).
No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from dinoserve.errors import ModelError
from dinoserve.images import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD

EMBEDDING = "embedding"
ATTENTION = "attention"


@dataclass(frozen=True)
class ModelInfo:
    """A served backbone as a client sees it."""

    name: str
    image_size: int
    embed_dim: int
    family: str = "vit"  # 'vit' | 'resnet'
    arch: str = ""
    crop_pct: float = DEFAULT_CROP_PCT
    patch_size: int = 0
    num_heads: int = 0
    weights_sha256: str = ""
    max_batch_size: int = 0  # 0: the server does not batch (one image per request)
    outputs: tuple[str, ...] = (EMBEDDING,)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    version: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def has_attention(self) -> bool:
        return ATTENTION in self.outputs

    def preprocessing(self) -> dict:
        """The preprocessing that produced an embedding (stored in index metadata)."""
        return {"image_size": self.image_size, "crop_pct": self.crop_pct,
                "mean": list(self.mean), "std": list(self.std), "resize": "bicubic-shorter-side+center-crop"}

    def identity(self) -> dict:
        """What makes two models' embeddings comparable (stored in index metadata)."""
        return {"name": self.name, "arch": self.arch, "family": self.family,
                "weights_sha256": self.weights_sha256, "dim": self.embed_dim}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def from_parameters(name: str, parameters: Mapping[str, Any], *, outputs: tuple[str, ...],
                    max_batch_size: int, version: str = "", embed_dim: int | None = None) -> ModelInfo:
    """Build a :class:`ModelInfo` from a Triton ``parameters`` map (plain or ``string_value``)."""
    params = {k: _param_value(v) for k, v in dict(parameters or {}).items()}
    if "image_size" not in params:
        raise ModelError(
            f"model {name!r}: its config has no 'image_size' parameter, so the client cannot "
            "preprocess for it; re-export it with `dinoserve export`"
        )
    dim = params.get("embed_dim", embed_dim)
    if dim in (None, "", -1, "-1"):
        raise ModelError(f"model {name!r}: its config gives no embedding size ('embed_dim'); re-export it")
    try:
        return ModelInfo(
            name=name,
            image_size=int(params["image_size"]),
            embed_dim=int(dim),
            family=str(params.get("family", "vit")),
            arch=str(params.get("arch", "")),
            crop_pct=float(params.get("crop_pct", DEFAULT_CROP_PCT)),
            patch_size=int(params.get("patch_size", 0) or 0),
            num_heads=int(params.get("num_heads", 0) or 0),
            weights_sha256=str(params.get("weights_sha256", "")),
            max_batch_size=int(max_batch_size or 0),
            outputs=tuple(outputs),
            mean=_floats(params.get("mean"), IMAGENET_MEAN),
            std=_floats(params.get("std"), IMAGENET_STD),
            version=str(version or ""),
            extra=params,
        )
    except (TypeError, ValueError) as e:
        raise ModelError(f"model {name!r}: malformed parameter in its config ({e}); re-export it") from None


def from_repository_config(cfg: Any, version: str = "") -> ModelInfo:
    """From a :func:`dinoserve.repository.read_model_config` result."""
    outputs = tuple(_name_of(o) for o in (getattr(cfg, "outputs", None) or ()))
    return from_parameters(cfg.name, getattr(cfg, "parameters", {}) or {}, outputs=outputs or (EMBEDDING,),
                           max_batch_size=getattr(cfg, "max_batch_size", 0), version=version,
                           embed_dim=_output_dim(getattr(cfg, "outputs", None) or ()))


def from_triton_json(config: Mapping[str, Any], version: str = "") -> ModelInfo:
    """From Triton's model-config JSON (HTTP body, or gRPC ``as_json`` with its ``config`` key)."""
    config = config.get("config", config)
    outputs = config.get("output", []) or []
    return from_parameters(
        config["name"], config.get("parameters", {}), outputs=tuple(o["name"] for o in outputs),
        max_batch_size=int(config.get("max_batch_size", 0) or 0), version=version,
        embed_dim=_output_dim(outputs),
    )


def _param_value(v: Any) -> Any:
    if isinstance(v, Mapping):  # Triton JSON: {"string_value": "..."}
        return v.get("string_value", v.get("stringValue", ""))
    return v


def _floats(v: Any, default: tuple[float, ...]) -> tuple[float, ...]:
    if v in (None, ""):
        return tuple(default)
    if isinstance(v, str):
        v = v.strip("[]() ").replace(" ", "").split(",")
    return tuple(float(x) for x in v)


def _name_of(o: Any) -> str:
    return o["name"] if isinstance(o, Mapping) else o.name


def _output_dim(outputs) -> int | None:
    for o in outputs:
        if _name_of(o) != EMBEDDING:
            continue
        dims = o.get("dims") if isinstance(o, Mapping) else getattr(o, "dims", None)
        if dims:
            d = int(list(dims)[-1])
            return d if d > 0 else None
    return None
