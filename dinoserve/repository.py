"""A Triton model repository, both ways: layout, and each model's ``config.pbtxt``.

Layout (see docs/DESIGN.md)::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/model.onnx

This module is the only one that reads or writes ``config.pbtxt``:

- :func:`render_config` / :func:`write_model_config` write an exported backbone's config,
  with its :class:`~dinoserve.card.ModelCard` in ``parameters``;
- :func:`read_model_config` parses one into a :class:`ModelConfig`, whose ``card`` is the
  model's description read back (parameter sets of older exports included);
- :func:`python_backend_config` gives the variant that the pip-bundled tritonserver (Python
  backend only) serves the same model with;
- :func:`choose_model` / :func:`model_choice_error` are the one model-selection error, for
  a repository on disk and a Triton server's listing alike.

No torch and no protobuf here: the client, the index and the app read repositories with
numpy-only installs. ``config.pbtxt`` is protobuf text format; the small parser and writer
below handle the subset Triton model configurations use (messages, repeated fields, lists,
strings, numbers, identifiers, ``#`` comments), and a parsed config writes back as it was.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dinoserve.atomic import atomic_write_text
from dinoserve.card import ModelCard
from dinoserve.errors import ModelNotFoundError, ServerError

__all__ = [
    "TensorConfig",
    "ModelConfig",
    "ConfigParseError",
    "Word",
    "list_models",
    "choose_model",
    "model_choice_error",
    "latest_version",
    "list_versions",
    "model_onnx_path",
    "read_model_config",
    "config_from_dict",
    "render_config",
    "write_model_config",
    "python_backend_config",
    "parse_pbtxt",
    "format_pbtxt",
    "ONNX_FILENAME",
    "CONFIG_FILENAME",
]

ONNX_FILENAME = "model.onnx"
CONFIG_FILENAME = "config.pbtxt"

#: The graph's tensors (see docs/DESIGN.md, "ONNX and Triton contract").
INPUT, EMBEDDING, ATTENTION, PATCH_TOKENS = "images", "embedding", "attention", "patch_tokens"

#: Parameters that the Python-backend runner (dinoserve/triton_runner.py) reads.
RUNNER_DEVICE, RUNNER_THREADS, RUNNER_RUNTIME = "runner_device", "runner_intra_op_threads", "runner_runtime"
#: Marks the runner's server-log line that names the onnxruntime provider it runs on.
PROVIDER_LOG = "dinoserve-runner:"


class ConfigParseError(ServerError):
    """A ``config.pbtxt`` is not valid protobuf text format."""


class Word(str):
    """A bare protobuf-text identifier (an enum value such as ``TYPE_FP32``, or ``true``):
    equal to its text, but written back without quotes."""


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
    """A model's ``config.pbtxt``: its tensors, its ``parameters`` (strings, as Triton keeps
    them) and, as :attr:`card`, the model description that export put there."""

    name: str
    max_batch_size: int
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    parameters: dict[str, str] = field(default_factory=dict)
    backend: str = ""
    platform: str = ""
    model_dir: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def card(self) -> ModelCard:
        """The :class:`~dinoserve.card.ModelCard` in ``parameters``.

        A field that an older export did not write takes its default, and the embedding
        size may come from the ``embedding`` output's dims. Raises
        :class:`~dinoserve.errors.ModelError` when the config does not say enough (e.g. a
        hand-written config without dinoserve's parameters).
        """
        where = f"model {self.name!r}" + (f" ({self.model_dir / CONFIG_FILENAME})" if self.model_dir else "")
        return ModelCard.from_params(self.parameters, source=where, embed_dim=output_dim(self.outputs))

    @property
    def has_attention(self) -> bool:
        """True when the model has an ``attention`` output (ViTs)."""
        return any(o.name == ATTENTION for o in self.outputs)

    @property
    def has_patch_tokens(self) -> bool:
        """True when the model was exported with a ``patch_tokens`` output."""
        return any(o.name == PATCH_TOKENS for o in self.outputs)

    def input(self, name: str) -> TensorConfig:
        return _by_name(self.inputs, name, self.name, "input")

    def output(self, name: str) -> TensorConfig:
        return _by_name(self.outputs, name, self.name, "output")


def output_dim(outputs: list) -> int | None:
    """The embedding size the ``embedding`` output declares (from :class:`TensorConfig`\\ s or
    Triton's JSON dicts); None when it is dynamic or absent."""
    for o in outputs:
        name = o["name"] if isinstance(o, dict) else o.name
        dims = list(o.get("dims") or []) if isinstance(o, dict) else list(o.dims)
        if name == EMBEDDING and dims and int(dims[-1]) > 0:
            return int(dims[-1])
    return None


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


#: What to do when there is no model to choose.
EXPORT_HINT = "export one with `dinoserve export --onnx --weights ... --name NAME --repo REPO`"


def choose_model(asked: str | None, available: Sequence[str], where: str, option: str = "--model") -> str:
    """``asked`` when ``where`` has it, or the only model there when nothing was asked;
    otherwise raise :func:`model_choice_error`."""
    if asked is None and len(available) == 1:
        return available[0]
    if asked is not None and asked in available:
        return asked
    raise model_choice_error([] if asked is None else [asked], available, where, option)


def model_choice_error(asked: Sequence[str], available: Sequence[str], where: str,
                       option: str = "--model") -> ModelNotFoundError:
    """The one model-selection error: ``<where> has <what is wrong>; available: <models>;
    <the option to pass, or how to get a model>``. ``asked`` are the names asked for (none:
    the choice was left to ``where``, which has several models or none)."""
    available = sorted(available)
    unknown = [m for m in asked if m not in available]
    if unknown:
        what = f"no model {', '.join(map(repr, unknown))}"
    elif available:
        what = "several models and none was chosen"
    else:
        return ModelNotFoundError(f"{where} has no models; {EXPORT_HINT}")
    fix = f"pass one of them with {option}" if available else EXPORT_HINT
    return ModelNotFoundError(f"{where} has {what}; available: {', '.join(available) or 'none'}; {fix}")


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
        where = f"model repository {Path(repo)}"
        if not Path(repo).is_dir():
            raise ModelNotFoundError(
                f"{where} does not exist; export a model first (dinoserve export --onnx ... --repo {repo})"
            )
        raise model_choice_error([name], list_models(repo), where)
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
        raise model_choice_error([d.name], list_models(d.parent), f"model repository {d.parent} (no {path})")
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

    params: dict[str, str] = {}
    for entry in _as_list(raw.get("parameters", [])):
        value = entry.get("value", {})
        params[str(entry.get("key", ""))] = str(value.get("string_value", "") if isinstance(value, dict) else value)
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


# --------------------------------------------------------------------------------------
# Writing: an exported backbone's config, and its Python-backend variant
# --------------------------------------------------------------------------------------


def config_dict(
    name: str,
    card: ModelCard,
    *,
    max_batch: int,
    device: str = "cpu",
    trt_fp16: bool = False,
    queue_delay_us: int = 500,
    patch_tokens: bool = False,
) -> dict[str, Any]:
    """The ``config.pbtxt`` of an exported backbone, as the dict :func:`format_pbtxt` writes.

    Dims exclude the batch; a ViT's and a ConvNeXt's height and width are dynamic (-1), a
    ResNet's are ``card.image_size``. ``device`` picks the instance kind (``cpu``/``gpu``);
    ``trt_fp16`` adds Triton's TensorRT FP16 accelerator; ``patch_tokens`` declares the
    ``patch_tokens`` output ``[N, D]``. The card goes into ``parameters``.
    """
    vit = card.family == "vit"
    hw = [-1, -1] if card.family in ("vit", "convnext") else [card.image_size, card.image_size]
    outputs = [{"name": EMBEDDING, "data_type": Word("TYPE_FP32"), "dims": [card.embed_dim]}]
    if vit:
        outputs.append({"name": ATTENTION, "data_type": Word("TYPE_FP32"), "dims": [card.num_heads, -1, -1]})
    if patch_tokens:
        outputs.append({"name": PATCH_TOKENS, "data_type": Word("TYPE_FP32"), "dims": [-1, card.embed_dim]})
    config: dict[str, Any] = {
        "name": name,
        "backend": "onnxruntime",
        "max_batch_size": max_batch,
        "input": [{"name": INPUT, "data_type": Word("TYPE_UINT8"), "dims": [3, *hw]}],
        "output": outputs,
        "dynamic_batching": {"max_queue_delay_microseconds": queue_delay_us},
        "instance_group": [{"kind": Word("KIND_GPU" if device == "gpu" else "KIND_CPU"), "count": 1}],
    }
    if trt_fp16:
        # TensorRT builds its engine at load time; cache it so restarts are fast.
        trt = {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824",
               "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"/tmp/triton_trt_cache/{name}"}
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "tensorrt", "parameters": [{"key": k, "value": v} for k, v in trt.items()]}]}}
    config["parameters"] = _string_params(card.to_params())
    return config


def render_config(name: str, card: ModelCard, **options: Any) -> str:
    """The ``config.pbtxt`` text of an exported backbone (options: see :func:`config_dict`)."""
    return format_pbtxt(config_dict(name, card, **options))


def write_model_config(model_dir: str | os.PathLike, name: str, card: ModelCard, **options: Any) -> Path:
    """Write ``<model_dir>/config.pbtxt`` atomically (options: see :func:`config_dict`)."""
    return atomic_write_text(Path(model_dir) / CONFIG_FILENAME, render_config(name, card, **options))


def python_backend_config(model_dir: str | os.PathLike, *, intra_op_threads: int = 0, device: str | None = None,
                          runtime: str = "onnxruntime") -> str:
    """``<model_dir>/config.pbtxt`` rewritten for Triton's Python backend.

    The backend becomes ``python`` (no ``platform``), instances run on the CPU, execution
    accelerators are dropped, and two parameters tell the runner where onnxruntime runs
    (``runner_device``: ``device`` when given, one of :data:`dinoserve.ort_session.DEVICES`;
    otherwise ``auto`` when the original asked for GPU instances, so TensorRT or CUDA when
    they can run and the CPU when not, and ``cpu`` for CPU instances) and with how many
    threads (0: onnxruntime's default); a third, ``runner_runtime``, names the runtime
    (``onnxruntime`` or ``openvino``; :mod:`dinoserve.openvino_session`). Everything else (name, inputs, outputs,
    max_batch_size, dynamic_batching, the card's parameters) is kept, so clients see the
    same model.
    """
    path = Path(model_dir) / CONFIG_FILENAME
    raw = parse_pbtxt(path.read_text(encoding="utf-8"), source=str(path))
    groups = _as_list(raw.get("instance_group", []))
    if device is None:
        device = "auto" if any(g.get("kind") == "KIND_GPU" for g in groups) else "cpu"
    out = {"backend": "python", **{k: v for k, v in raw.items() if k not in ("backend", "platform")}}
    out["instance_group"] = [{"kind": Word("KIND_CPU"), "count": 1}]
    optimization = {k: v for k, v in (out.pop("optimization", None) or {}).items() if k != "execution_accelerators"}
    if optimization:
        out["optimization"] = optimization
    runner_keys = (RUNNER_DEVICE, RUNNER_THREADS, RUNNER_RUNTIME)
    kept = [p for p in _as_list(out.get("parameters", [])) if p.get("key") not in runner_keys]
    out["parameters"] = kept + _string_params({RUNNER_DEVICE: device, RUNNER_THREADS: str(intra_op_threads),
                                               RUNNER_RUNTIME: runtime})
    return format_pbtxt(out)


def _string_params(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"string_value": v}} for k, v in values.items()]


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
    (enum names, true/false) -> :class:`Word`. ``parameters`` maps keep Triton's
    ``key``/``value`` form. :func:`format_pbtxt` writes the result back.
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
    return _Parser(tokens, source).message(end=None)


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
            return Word(text)


def format_pbtxt(message: dict[str, Any]) -> str:
    """Write nested dicts (as :func:`parse_pbtxt` returns them) as protobuf text format.

    One top-level field per line; a repeated message field as a ``[ ... ]`` list with one
    message per line; nested messages inline. Strings are quoted and escaped, :class:`Word`
    identifiers are not, numbers are written as Python writes them.
    """
    lines = []
    for key, value in message.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n".join(f"  {_message(v)}" for v in value)
            lines.append(f"{key} [\n{items}\n]")
        else:
            lines.append(_field(key, value))
    return "\n".join(lines) + "\n"


def _field(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return f"{key} {_message(value)}"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"{key} [ {', '.join(_message(v) for v in value)} ]"
    return f"{key}: {_scalar(value)}"


def _message(message: dict[str, Any]) -> str:
    return "{ " + " ".join(_field(k, v) for k, v in message.items()) + " }" if message else "{ }"


def _scalar(value: Any) -> str:
    if isinstance(value, list):
        return "[ " + ", ".join(_scalar(v) for v in value) + " ]"
    if isinstance(value, Word) or isinstance(value, bool):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as protobuf text")
