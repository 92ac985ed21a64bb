"""Read a Triton model repository: models, versions, and each model's ``config.pbtxt``.

Layout (see DESIGN.md)::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/model.onnx

No torch and no protobuf here: the client, the index and the app read repositories
with numpy-only installs. ``config.pbtxt`` is protobuf text format; the small parser
below reads the subset Triton model configurations use (messages, repeated fields,
lists, strings, numbers, identifiers, ``#`` comments).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinoserve.errors import ModelNotFoundError, ServerError

__all__ = [
    "TensorConfig",
    "ModelConfig",
    "ConfigParseError",
    "list_models",
    "latest_version",
    "list_versions",
    "read_model_config",
    "parse_pbtxt",
    "model_onnx_path",
    "ONNX_FILENAME",
]

ONNX_FILENAME = "model.onnx"
CONFIG_FILENAME = "config.pbtxt"

#: How each ``parameters`` entry written by dinoserve's export is typed when read back.
_INT_PARAMS = ("image_size", "patch_size", "embed_dim", "num_heads")
_FLOAT_PARAMS = ("crop_pct",)
_TUPLE_PARAMS = ("mean", "std")


class ConfigParseError(ServerError):
    """A ``config.pbtxt`` is not valid protobuf text format."""


@dataclass(frozen=True)
class TensorConfig:
    """One input or output of a model: name, Triton data type and dims (batch dim excluded)."""

    name: str
    data_type: str  # e.g. "TYPE_UINT8", "TYPE_FP32"
    dims: tuple[int, ...]  # -1 where dynamic

    @property
    def numpy_dtype(self) -> str:
        """The numpy dtype name of :attr:`data_type` (``TYPE_FP32`` -> ``float32``)."""
        return _TRITON_TO_NUMPY.get(self.data_type, "object")


_TRITON_TO_NUMPY = {
    "TYPE_BOOL": "bool", "TYPE_UINT8": "uint8", "TYPE_UINT16": "uint16", "TYPE_UINT32": "uint32",
    "TYPE_UINT64": "uint64", "TYPE_INT8": "int8", "TYPE_INT16": "int16", "TYPE_INT32": "int32",
    "TYPE_INT64": "int64", "TYPE_FP16": "float16", "TYPE_FP32": "float32", "TYPE_FP64": "float64",
    "TYPE_STRING": "object",
}


@dataclass
class ModelConfig:
    """A model's ``config.pbtxt``, with dinoserve's ``parameters`` typed.

    ``parameters`` holds, for models written by ``dinoserve export``: ``arch`` (timm name),
    ``family`` (``"vit"`` or ``"resnet"``), ``image_size``, ``crop_pct``, ``patch_size``,
    ``embed_dim``, ``num_heads`` (ints/float), ``weights_sha256``, and ``mean``/``std``
    (3-tuples of floats). Unknown parameters are kept as strings.
    """

    name: str
    max_batch_size: int
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    parameters: dict[str, Any] = field(default_factory=dict)
    backend: str = ""
    platform: str = ""
    model_dir: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    # Convenience views of the parameters that every consumer needs.
    @property
    def arch(self) -> str | None:
        return self.parameters.get("arch")

    @property
    def family(self) -> str | None:
        return self.parameters.get("family")

    @property
    def image_size(self) -> int | None:
        return self.parameters.get("image_size")

    @property
    def crop_pct(self) -> float:
        return self.parameters.get("crop_pct", 0.875)

    @property
    def patch_size(self) -> int:
        return self.parameters.get("patch_size", 0)

    @property
    def embed_dim(self) -> int | None:
        return self.parameters.get("embed_dim")

    @property
    def num_heads(self) -> int:
        return self.parameters.get("num_heads", 0)

    @property
    def weights_sha256(self) -> str | None:
        return self.parameters.get("weights_sha256")

    @property
    def mean(self) -> tuple[float, ...]:
        """Normalisation mean the graph applies (ImageNet's unless the weights say otherwise)."""
        return self.parameters.get("mean", (0.485, 0.456, 0.406))

    @property
    def std(self) -> tuple[float, ...]:
        return self.parameters.get("std", (0.229, 0.224, 0.225))

    @property
    def has_attention(self) -> bool:
        """True when the model has an ``attention`` output (ViTs)."""
        return any(o.name == "attention" for o in self.outputs)

    def input(self, name: str) -> TensorConfig:
        return _by_name(self.inputs, name, self.name, "input")

    def output(self, name: str) -> TensorConfig:
        return _by_name(self.outputs, name, self.name, "output")


def _by_name(items: list[TensorConfig], name: str, model: str, kind: str) -> TensorConfig:
    for t in items:
        if t.name == name:
            return t
    raise ModelNotFoundError(f"model {model!r} has no {kind} {name!r}; it has {[t.name for t in items]}")


# --------------------------------------------------------------------------------------
# Repository layout
# --------------------------------------------------------------------------------------


def list_models(repo: str | os.PathLike) -> list[str]:
    """Names of the models in ``repo`` (folders holding a ``config.pbtxt``), sorted."""
    root = Path(repo)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILENAME).is_file())


def list_versions(model_dir: str | os.PathLike) -> list[int]:
    """Integer version folders of a model, ascending (hidden or non-numeric folders ignored)."""
    d = Path(model_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version(model_dir: str | os.PathLike) -> int | None:
    """The highest integer version folder of a model, or None when it has none."""
    versions = list_versions(model_dir)
    return versions[-1] if versions else None


def _model_dir(repo: str | os.PathLike, name: str) -> Path:
    d = Path(repo) / name
    if not (d / CONFIG_FILENAME).is_file():
        available = list_models(repo)
        where = f"repository {Path(repo)}"
        if not Path(repo).is_dir():
            raise ModelNotFoundError(
                f"{where} does not exist; export a model first (dinoserve export --onnx ... --repo {repo})"
            )
        raise ModelNotFoundError(
            f"no model {name!r} in {where}; available: {', '.join(available) or 'none'} "
            f"(export one with dinoserve export --onnx --name {name})"
        )
    return d


def model_onnx_path(repo: str | os.PathLike, name: str, version: int | None = None) -> Path:
    """Path of ``<repo>/<name>/<version>/model.onnx``; the latest version by default."""
    d = _model_dir(repo, name)
    if version is None:
        version = latest_version(d)
        if version is None:
            raise ModelNotFoundError(f"model {name!r} in {Path(repo)} has no version folder with {ONNX_FILENAME}")
    path = d / str(version) / ONNX_FILENAME
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} does not exist; versions of {name!r}: {list_versions(d) or 'none'}"
        )
    return path


def read_model_config(model_dir: str | os.PathLike) -> ModelConfig:
    """Parse ``<model_dir>/config.pbtxt`` into a :class:`ModelConfig`."""
    d = Path(model_dir)
    path = d / CONFIG_FILENAME
    if not path.is_file():
        available = list_models(d.parent)
        raise ModelNotFoundError(
            f"{path} does not exist; models in {d.parent}: {', '.join(available) or 'none'}"
        )
    raw = parse_pbtxt(path.read_text(encoding="utf-8"), source=str(path))
    return config_from_dict(raw, model_dir=d)


def config_from_dict(raw: dict[str, Any], model_dir: Path | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from a parsed pbtxt dict (see :func:`parse_pbtxt`)."""

    def tensors(key: str) -> list[TensorConfig]:
        return [
            TensorConfig(str(t.get("name", "")), str(t.get("data_type", "")),
                         tuple(int(x) for x in _as_list(t.get("dims", []))))
            for t in _as_list(raw.get(key, []))
        ]

    params: dict[str, Any] = {}
    for entry in _as_list(raw.get("parameters", [])):
        key = str(entry.get("key", ""))
        value = entry.get("value", {})
        text = value.get("string_value", "") if isinstance(value, dict) else str(value)
        params[key] = _typed_param(key, str(text))
    name = str(raw.get("name") or (model_dir.name if model_dir else ""))
    return ModelConfig(
        name=name,
        max_batch_size=int(raw.get("max_batch_size", 0)),
        inputs=tensors("input"),
        outputs=tensors("output"),
        parameters=params,
        backend=str(raw.get("backend", "")),
        platform=str(raw.get("platform", "")),
        model_dir=model_dir,
        raw=raw,
    )


def _typed_param(key: str, text: str) -> Any:
    try:
        if key in _INT_PARAMS:
            return int(text)
        if key in _FLOAT_PARAMS:
            return float(text)
        if key in _TUPLE_PARAMS:
            return tuple(float(x) for x in text.split(","))
    except ValueError:
        pass  # keep the text; a consumer that needs the number reports it
    return text


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


# --------------------------------------------------------------------------------------
# Protobuf text format (the subset model configurations use)
# --------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<punct>[{}\[\]:,;<>])|(?P<word>[^\s{}\[\]:,;<>"'#]+)""",
    re.VERBOSE,
)

#: Fields that Triton declares ``repeated``; they always parse to lists, even with one entry.
_REPEATED = {"input", "output", "instance_group", "parameters", "dims", "gpus", "model_warmup",
             "gpu_execution_accelerator", "cpu_execution_accelerator", "preferred_batch_size",
             "ensemble_scheduling", "step", "cc_model_filenames", "metric_tags"}


def parse_pbtxt(text: str, source: str = "config.pbtxt") -> dict[str, Any]:
    """Parse protobuf text format into nested dicts; repeated fields become lists.

    Scalars: quoted strings -> str, integers -> int, other numbers -> float, anything else
    (enum names, true/false) -> str. ``parameters`` maps keep Triton's ``key``/``value`` form.
    """
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ConfigParseError(f"{source}: cannot parse near {text[pos:pos + 30]!r}")
        pos = m.end()
        if m.lastgroup:
            tokens.append((m.lastgroup, m.group(m.lastgroup)))
    parser = _Parser(tokens, source)
    result = parser.message(end=None)
    return result


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], source: str):
        self.tokens, self.i, self.source = tokens, 0, source

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise ConfigParseError(f"{self.source}: unexpected end of file")
        self.i += 1
        return tok

    def fail(self, what: str) -> ConfigParseError:
        near = " ".join(t[1] for t in self.tokens[max(0, self.i - 3): self.i + 3])
        return ConfigParseError(f"{self.source}: {what} near {near!r}")

    def message(self, end: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            tok = self.peek()
            if tok is None:
                if end is not None:
                    raise self.fail(f"missing {end!r}")
                return out
            if tok[0] == "punct" and tok[1] in ("}", ">"):
                if end is None or tok[1] != end:
                    raise self.fail(f"unexpected {tok[1]!r}")
                self.take()
                return out
            if tok[0] == "punct" and tok[1] in (",", ";"):
                self.take()
                continue
            if tok[0] != "word":
                raise self.fail("expected a field name")
            key = self.take()[1]
            value = self.value()
            if key in _REPEATED:
                values = value if isinstance(value, list) else [value]
                out.setdefault(key, []).extend(values)
            elif key in out:  # a repeated field we did not list: keep every entry
                prev = out[key]
                out[key] = (prev if isinstance(prev, list) else [prev]) + (value if isinstance(value, list) else [value])
            else:
                out[key] = value

    def value(self) -> Any:
        tok = self.peek()
        if tok == ("punct", ":"):
            self.take()
            tok = self.peek()
        if tok is None:
            raise self.fail("missing value")
        if tok[0] == "punct" and tok[1] in ("{", "<"):
            self.take()
            return self.message(end="}" if tok[1] == "{" else ">")
        if tok == ("punct", "["):
            self.take()
            items = []
            while self.peek() != ("punct", "]"):
                if self.peek() == ("punct", ","):
                    self.take()
                    continue
                items.append(self.value())
            self.take()
            return items
        return self.scalar()

    def scalar(self) -> Any:
        kind, text = self.take()
        if kind == "str":
            s = text[1:-1]
            # Adjacent string literals concatenate, as in protobuf.
            while self.peek() is not None and self.peek()[0] == "str":
                s += self.take()[1][1:-1]
            return bytes(s, "utf-8").decode("unicode_escape") if "\\" in s else s
        if kind != "word":
            raise self.fail(f"unexpected {text!r}")
        try:
            return int(text, 0)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return text
