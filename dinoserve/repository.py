"""A Triton model repository, both ways: layout, model choice, and each model's ``config.pbtxt``.

Layout (see docs/DESIGN.md)::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/model.onnx

- :func:`render_config` / :func:`write_model_config` write an exported backbone's config,
  with its :class:`~dinoserve.card.ModelCard` in ``parameters``;
- :func:`read_model_config` parses one into a :class:`ModelConfig`, whose ``card`` is the
  model's description read back (parameter sets of older exports included);
- :func:`choose_model` / :func:`choose_models` / :func:`model_choice_error` are the one
  model-selection error, for a repository on disk and a Triton server's listing alike;
- :func:`staging_folder` and :func:`commit_version` add a version whole or not at all.

The variant of a config that the pip-bundled tritonserver serves is written by
:mod:`dinoserve.triton_python_backend`; the protobuf text itself is read and written by
:mod:`dinoserve.pbtxt`. No torch and no protobuf here: the client, the index and the app
read repositories with numpy-only installs.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from dinoserve.atomic import atomic_write_text, fsync_path
from dinoserve.card import ModelCard
from dinoserve.contract import ATTENTION, EMBEDDING, INPUT, PATCH_TOKENS, output_names
from dinoserve.errors import ExportError, ModelNotFoundError
from dinoserve.pbtxt import Word, as_list, format_pbtxt, parse_pbtxt

__all__ = [
    "TensorConfig",
    "ModelConfig",
    "list_models",
    "choose_model",
    "choose_models",
    "model_choice_error",
    "latest_version",
    "list_versions",
    "model_onnx_path",
    "check_writable",
    "staging_folder",
    "commit_version",
    "output_dim",
    "read_model_config",
    "config_from_dict",
    "config_dict",
    "render_config",
    "write_model_config",
    "string_parameters",
    "ONNX_FILENAME",
    "CONFIG_FILENAME",
]

ONNX_FILENAME = "model.onnx"
CONFIG_FILENAME = "config.pbtxt"


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
        """The input ``name``; :class:`~dinoserve.errors.ModelNotFoundError` naming the inputs there are."""
        return _by_name(self.inputs, name, self.name, "input")

    def output(self, name: str) -> TensorConfig:
        """The output ``name``; :class:`~dinoserve.errors.ModelNotFoundError` naming the outputs there are."""
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


def choose_models(repo: Path, asked: Sequence[str] | None, option: str = "--model (repeatable)") -> list[str]:
    """The models of ``repo`` to serve: ``asked`` when ``repo`` has every one of them, or all
    of its models when nothing was asked; otherwise raise :func:`model_choice_error`."""
    if not repo.is_dir():
        raise ModelNotFoundError(f"model repository {repo} does not exist; export a model into it first")
    available = list_models(repo)
    where = f"model repository {repo}"
    if asked is None:
        if not available:
            raise model_choice_error([], available, where, option)
        return available
    if any(m not in available for m in asked):
        raise model_choice_error(asked, available, where, option)
    return list(asked)


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


# --------------------------------------------------------------------------------------
# Reading a model's config
# --------------------------------------------------------------------------------------


def read_model_config(model_dir: str | os.PathLike) -> ModelConfig:
    """Parse ``<model_dir>/config.pbtxt`` into a :class:`ModelConfig`."""
    d = Path(model_dir)
    path = d / CONFIG_FILENAME
    if not path.is_file():
        raise model_choice_error([d.name], list_models(d.parent), f"model repository {d.parent} (no {path})")
    raw = parse_pbtxt(path.read_text(encoding="utf-8"), source=str(path))
    return config_from_dict(raw, model_dir=d)


def config_from_dict(raw: dict[str, Any], model_dir: Path | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from a parsed pbtxt dict (see :func:`dinoserve.pbtxt.parse_pbtxt`)."""

    def tensors(key: str) -> list[TensorConfig]:
        return [
            TensorConfig(str(t.get("name", "")), str(t.get("data_type", "")),
                         tuple(int(x) for x in as_list(t.get("dims", []))))
            for t in as_list(raw.get(key, []))
        ]

    params: dict[str, str] = {}
    for entry in as_list(raw.get("parameters", [])):
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
# Writing an exported backbone's config
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
    """The ``config.pbtxt`` of an exported backbone, as the dict that
    :func:`dinoserve.pbtxt.format_pbtxt` writes.

    Dims exclude the batch; a ViT's and a ConvNeXt's height and width are dynamic (-1), a
    ResNet's are ``card.image_size``. ``device`` picks the instance kind (``cpu``/``gpu``);
    ``trt_fp16`` adds Triton's TensorRT FP16 accelerator; ``patch_tokens`` declares the
    ``patch_tokens`` output ``[N, D]``. The card goes into ``parameters``.
    """
    hw = [-1, -1] if card.family in ("vit", "convnext") else [card.image_size, card.image_size]
    dims = {EMBEDDING: [card.embed_dim], ATTENTION: [card.num_heads, -1, -1], PATCH_TOKENS: [-1, card.embed_dim]}
    outputs = [{"name": out, "data_type": Word("TYPE_FP32"), "dims": dims[out]}
               for out in output_names(card.family, patch_tokens)]
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
    config["parameters"] = string_parameters(card.to_params())
    return config


def render_config(name: str, card: ModelCard, **options: Any) -> str:
    """The ``config.pbtxt`` text of an exported backbone (options: see :func:`config_dict`)."""
    return format_pbtxt(config_dict(name, card, **options))


def write_model_config(model_dir: str | os.PathLike, name: str, card: ModelCard, **options: Any) -> Path:
    """Write ``<model_dir>/config.pbtxt`` atomically (options: see :func:`config_dict`)."""
    return atomic_write_text(Path(model_dir) / CONFIG_FILENAME, render_config(name, card, **options))


def string_parameters(values: dict[str, str]) -> list[dict[str, Any]]:
    """``values`` in Triton's ``parameters`` form: ``{key, value: {string_value}}`` entries."""
    return [{"key": k, "value": {"string_value": v}} for k, v in values.items()]


# --------------------------------------------------------------------------------------
# Adding a version: whole or not at all
# --------------------------------------------------------------------------------------


def check_writable(repo: Path) -> None:
    """Fail before any work when the repository (or the folder it would go in) is not writable."""
    probe = repo if repo.exists() else repo.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ExportError(f"repository {repo}: {probe} is a file, not a folder; pass another --repo")
    if repo.exists() and not repo.is_dir():
        raise ExportError(f"repository {repo} is a file, not a folder; pass another --repo")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"repository {repo}: {probe} is not writable; fix its permissions or pass another --repo")


@contextmanager
def staging_folder(repo: Path) -> Iterator[Path]:
    """A temporary folder beside ``repo`` to build a version in (same file system, so
    :func:`commit_version` renames atomically), removed afterwards whatever happens; folders
    created for it are removed again when the block fails."""
    parent = repo.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]  # ours to remove on failure
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{repo.name}.export-", dir=parent))
    except OSError as e:
        raise ExportError(f"repository {repo}: cannot create a staging folder in {parent} ({e}); "
                          f"fix its permissions or pass another --repo") from None
    ok = False
    try:
        yield stage
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok:
            for folder in created:  # deepest first; only if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def commit_version(staged_model: Path, model_dir: Path, version: int) -> None:
    """Move a staged model folder (``config.pbtxt`` and ``<version>/``) into the repository
    with renames only, so readers see the old version or the new one, never a part."""
    try:
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        if not model_dir.exists():
            os.replace(staged_model, model_dir)  # a new model appears whole or not at all
        else:
            target = model_dir / str(version)
            if target.exists():
                raise ExportError(f"{target} appeared during the export (another export running?); nothing written")
            os.replace(staged_model / str(version), target)
            os.replace(staged_model / CONFIG_FILENAME, model_dir / CONFIG_FILENAME)
        fsync_path(model_dir)
        fsync_path(model_dir.parent)
    except OSError as e:
        raise ExportError(f"cannot write into {model_dir} ({e}); the verified export was discarded") from None
