"""The files an ONNX model is stored in: one ``model.onnx``, or ``model.onnx`` beside the
external data file that holds its weights.

Protobuf caps one message at 2 GiB, so a graph whose weights are larger (DINOv2 ViT-g,
DINOv3 ViT-H+) keeps them in ``model.onnx.data`` in the same folder; ``model.onnx`` then
names that file by a path relative to itself. onnxruntime, OpenVINO and Triton's
onnxruntime backend all resolve it that way, so the two files must stay side by side:
:func:`model_files` lists what to move, link or fsync together.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SINGLE_FILE_MAX_BYTES", "external_data_name", "missing_files", "missing_files_problem", "model_files",
           "needs_external_data", "save_model"]

#: Weights above this many bytes go to an external data file. Protobuf refuses messages of
#: 2 GiB and more; the margin leaves room for the graph itself and inline constants.
SINGLE_FILE_MAX_BYTES = 1_800_000_000


def needs_external_data(weight_bytes: int) -> bool:
    """Whether weights of this many bytes must live outside ``model.onnx``."""
    return weight_bytes > SINGLE_FILE_MAX_BYTES


def external_data_name(onnx_path: str | os.PathLike) -> str:
    """The external data file's name for ``onnx_path``: ``model.onnx`` -> ``model.onnx.data``,
    the name torch's exporter gives it."""
    return Path(onnx_path).name + ".data"


def _tensors(graph):
    """Every tensor stored in ``graph``: initializers and constant attributes, subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _locations(onnx_path: Path) -> list[str]:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    # External data stays on disk; a single-file model's weights are parsed with its graph.
    model = onnx.load(str(onnx_path), load_external_data=False)
    return sorted({ExternalDataInfo(t).location for t in _tensors(model.graph) if uses_external_data(t)})


def model_files(onnx_path: str | os.PathLike) -> list[Path]:
    """``onnx_path`` followed by every external data file it names (paths beside it). A file
    that cannot be read as ONNX names none: reporting the damage is the loader's job, with
    its own words, when the model is opened."""
    onnx_path = Path(onnx_path)
    try:
        locations = _locations(onnx_path)
    except Exception:  # noqa: BLE001 - protobuf and onnx raise many types for a damaged file
        locations = []
    return [onnx_path, *(onnx_path.parent / loc for loc in locations)]


def missing_files(onnx_path: str | os.PathLike) -> list[Path]:
    """The external data files ``onnx_path`` names that are not there; ``[]`` when the model
    is whole (or cannot be read as ONNX at all)."""
    return [p for p in model_files(onnx_path)[1:] if not p.is_file()]


def missing_files_problem(onnx_path: str | os.PathLike) -> str:
    """What is wrong when a runtime cannot load ``onnx_path`` because its weights file is
    gone, in words; ``""`` when nothing is missing."""
    missing = missing_files(onnx_path)
    if not missing:
        return ""
    return f"its weights file {missing[0]} is missing (a model over 2 GB keeps them in a file beside model.onnx)"


def save_model(model, onnx_path: str | os.PathLike) -> list[Path]:
    """Write the ``onnx.ModelProto`` ``model`` to ``onnx_path``: one file when its tensors fit
    under :data:`SINGLE_FILE_MAX_BYTES`, else with every weight in ``<name>.data`` beside it.
    An old data file of that name is replaced or, when no longer needed, removed. Returns
    the files written."""
    import onnx

    onnx_path = Path(onnx_path)
    data = onnx_path.with_name(external_data_name(onnx_path))
    weight_bytes = sum(len(t.raw_data) for t in _tensors(model.graph))
    if data.exists():
        data.unlink()
    if not needs_external_data(weight_bytes):
        onnx.save_model(model, str(onnx_path))
        return [onnx_path]
    onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [onnx_path, data]
