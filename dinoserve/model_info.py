"""A served model as a client sees it: its card plus what the server says about it.

Both backends describe their model with one :class:`ModelInfo`: the embedded backend
from the repository's ``config.pbtxt`` (:func:`from_repository_config`), the Triton backend
from the server's model-config JSON (:func:`from_triton_json`). The description itself is
the model's :class:`~dinoserve.card.ModelCard`, read from the config ``parameters``;
preprocessing is derived from it, never retyped. No torch here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from dinoserve.card import ModelCard
from dinoserve.contract import ATTENTION, EMBEDDING, PATCH_TOKENS
from dinoserve.repository import output_dim

__all__ = ["ModelInfo", "from_repository_config", "from_triton_json"]

_CARD_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelCard))


@dataclass(frozen=True)
class ModelInfo:
    """A served backbone: its :class:`~dinoserve.card.ModelCard` plus the serving facts.

    The card's fields read through (``info.image_size`` is ``info.card.image_size``), so a
    field added to the card needs no change here.
    """

    name: str
    card: ModelCard
    max_batch_size: int = 0  # 0: the server does not batch (one image per request)
    outputs: tuple[str, ...] = (EMBEDDING,)
    version: str = ""
    #: Where the model runs: the onnxruntime provider of an in-process session (e.g.
    #: ``CUDAExecutionProvider``), ``"triton"`` for a server (its own log names the runner's).
    provider: str = ""

    def __getattr__(self, attr: str) -> Any:
        # Only called for names that are not ModelInfo's own: read the card's fields through.
        if attr in _CARD_FIELDS:
            return getattr(self.card, attr)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    @property
    def has_attention(self) -> bool:
        """True when the model has an ``attention`` output (ViTs)."""
        return ATTENTION in self.outputs

    @property
    def has_patch_tokens(self) -> bool:
        """True when the model was exported with a ``patch_tokens`` output."""
        return PATCH_TOKENS in self.outputs

    def preprocessing(self) -> dict:
        """The preprocessing that produced an embedding (stored in index metadata)."""
        return self.card.preprocessing()

    def identity(self) -> dict:
        """What makes two models' embeddings comparable (stored in index metadata)."""
        return {"name": self.name, "arch": self.card.arch, "family": self.card.family,
                "weights_sha256": self.card.weights_sha256, "dim": self.card.embed_dim}

    def to_dict(self) -> dict:
        """The serving facts and the card, for printing as JSON."""
        return {"name": self.name, "max_batch_size": self.max_batch_size, "outputs": list(self.outputs),
                "version": self.version, "provider": self.provider, **self.card.to_dict()}


def from_repository_config(cfg: Any, version: str = "") -> ModelInfo:
    """From a :func:`dinoserve.repository.read_model_config` result."""
    outputs = tuple(o.name for o in cfg.outputs) or (EMBEDDING,)
    return ModelInfo(cfg.name, cfg.card, max_batch_size=int(cfg.max_batch_size or 0), outputs=outputs,
                     version=str(version or ""))


def from_triton_json(config: Mapping[str, Any], version: str = "") -> ModelInfo:
    """From Triton's model-config JSON (HTTP body, or gRPC ``as_json`` with its ``config`` key)."""
    config = config.get("config", config)
    outputs = config.get("output", []) or []
    name = config["name"]
    params = {k: _param_value(v) for k, v in dict(config.get("parameters", {}) or {}).items()}
    card = ModelCard.from_params(params, source=f"model {name!r}", embed_dim=output_dim(outputs))
    return ModelInfo(name, card, max_batch_size=int(config.get("max_batch_size", 0) or 0),
                     outputs=tuple(o["name"] for o in outputs) or (EMBEDDING,), version=str(version or ""),
                     provider="triton")


def _param_value(v: Any) -> Any:
    if isinstance(v, Mapping):  # Triton JSON: {"string_value": "..."}
        return v.get("string_value", v.get("stringValue", ""))
    return v
