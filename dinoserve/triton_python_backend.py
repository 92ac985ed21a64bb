"""Serving ONNX models on the pip-bundled tritonserver, which has only the Python backend.

The server in the ``nvidia-pytriton`` wheel cannot load ``backend: "onnxruntime"`` models, so
:class:`dinoserve.triton.TritonServer` gives it a serving folder outside the user's repository:

- a twin of the repository (:func:`prepare_serving_repository`): each ONNX model keeps its
  name, inputs, outputs and card, gets ``backend: "python"`` (:func:`python_backend_config`)
  and, per version, the runner :mod:`dinoserve.triton_runner` as ``model.py`` beside a link
  to the very same ``model.onnx``;
- a backend directory holding the Python backend and the stub for this interpreter;
- a folder that puts this dinoserve package on the runners' import path, and the
  environment the server needs (:func:`prepare_bundled_serving` does all three).

The ``runner_*`` parameters written here are what the runner reads.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Sequence

from dinoserve.errors import ServerError
from dinoserve.pbtxt import Word, as_list, format_pbtxt, parse_pbtxt
from dinoserve.repository import (CONFIG_FILENAME, ONNX_FILENAME, choose_models, list_versions, read_model_config,
                                  string_parameters)

__all__ = ["RUNNER_DEVICE", "RUNNER_RUNTIME", "RUNNER_THREADS", "prepare_bundled_serving",
           "prepare_serving_repository", "python_backend_config"]

#: Parameters that the Python-backend runner (dinoserve/triton_runner.py) reads.
RUNNER_DEVICE, RUNNER_THREADS, RUNNER_RUNTIME = "runner_device", "runner_intra_op_threads", "runner_runtime"

RUNNER_TEMPLATE = Path(__file__).with_name("triton_runner.py")


def python_backend_config(model_dir: str | os.PathLike, *, intra_op_threads: int = 0, device: str | None = None,
                          runtime: str = "onnxruntime") -> str:
    """``<model_dir>/config.pbtxt`` rewritten for Triton's Python backend.

    The backend becomes ``python`` (no ``platform``), instances run on the CPU, execution
    accelerators are dropped, and two parameters tell the runner where onnxruntime runs
    (``runner_device``: ``device`` when given, one of :data:`dinoserve.ort_session.DEVICES`;
    otherwise ``auto`` when the original asked for GPU instances, so TensorRT or CUDA when
    they can run and the CPU when not, and ``cpu`` for CPU instances) and with how many
    threads (0: onnxruntime's default); a third, ``runner_runtime``, names the runtime
    (``onnxruntime`` or ``openvino``; :mod:`dinoserve.openvino_session`). Everything else
    (name, inputs, outputs, max_batch_size, dynamic_batching, the card's parameters) is
    kept, so clients see the same model.
    """
    path = Path(model_dir) / CONFIG_FILENAME
    raw = parse_pbtxt(path.read_text(encoding="utf-8"), source=str(path))
    groups = as_list(raw.get("instance_group", []))
    if device is None:
        device = "auto" if any(g.get("kind") == "KIND_GPU" for g in groups) else "cpu"
    out = {"backend": "python", **{k: v for k, v in raw.items() if k not in ("backend", "platform")}}
    out["instance_group"] = [{"kind": Word("KIND_CPU"), "count": 1}]
    optimization = {k: v for k, v in (out.pop("optimization", None) or {}).items() if k != "execution_accelerators"}
    if optimization:
        out["optimization"] = optimization
    runner_keys = (RUNNER_DEVICE, RUNNER_THREADS, RUNNER_RUNTIME)
    kept = [p for p in as_list(out.get("parameters", [])) if p.get("key") not in runner_keys]
    out["parameters"] = kept + string_parameters({RUNNER_DEVICE: device, RUNNER_THREADS: str(intra_op_threads),
                                                  RUNNER_RUNTIME: runtime})
    return format_pbtxt(out)


def prepare_serving_repository(
    repo: str | os.PathLike, target: str | os.PathLike, models: Sequence[str] | None = None,
    *, intra_op_threads: int = 0, device: str | None = None, runtime: str = "onnxruntime",
) -> list[str]:
    """Write a Python-backend twin of ``repo`` into ``target`` for the pip-bundled server.

    Each ONNX model (``backend: "onnxruntime"``) gets the same ``config.pbtxt`` with
    ``backend: "python"``, and per version a ``model.py`` runner next to a link to the
    original ``model.onnx`` (and to the version's other files: ``model.onnx.data`` holds the
    weights of a model over 2 GB). Other models are linked as they are. ``repo`` is not touched.
    Returns the model names written.
    """
    repo, target = Path(repo).absolute(), Path(target)
    names = choose_models(repo, models)
    for name in names:
        src = repo / name
        config = read_model_config(src)
        if config.backend != "onnxruntime" and config.platform != "onnxruntime_onnx":
            os.symlink(src, target / name)
            continue
        dst = target / name
        dst.mkdir(parents=True)
        text = python_backend_config(src, intra_op_threads=intra_op_threads, device=device, runtime=runtime)
        (dst / CONFIG_FILENAME).write_text(text, encoding="utf-8")
        for version in list_versions(src):
            onnx = src / str(version) / ONNX_FILENAME
            if not onnx.is_file():
                continue  # Triton would reject the version; the latest complete one serves
            (dst / str(version)).mkdir()
            shutil.copyfile(RUNNER_TEMPLATE, dst / str(version) / "model.py")
            # model.onnx names its external data file (model.onnx.data) relative to itself, so
            # every file of the version is linked side by side; no graph is parsed at start-up.
            for path in sorted(onnx.parent.iterdir()):
                if path.is_file() and path.name != "model.py":
                    os.symlink(path, dst / str(version) / path.name)
    return names


def prepare_bundled_serving(
    server_root: Path, workdir: Path, repo: Path, models: Sequence[str], *,
    intra_op_threads: int = 0, device: str | None = None, runtime: str = "onnxruntime",
) -> tuple[Path, Path, dict[str, str]]:
    """Everything the pip server needs to serve ``models`` of ``repo``, written under ``workdir``.

    ``server_root`` is the wheel's ``tritonserver`` folder (``bin/``, ``backends/``, the
    stubs). Returns the serving repository, the backend directory and the environment to
    start the server with.
    """
    serving = workdir / "model_repository"
    serving.mkdir()
    prepare_serving_repository(repo, serving, models, intra_op_threads=intra_op_threads, device=device,
                               runtime=runtime)
    backends = _backend_dir(server_root, workdir / "backends")
    env = _bundled_env(server_root, [_runner_python_path(workdir / "python")])
    return serving, backends, env


def _stub_path(root: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version} (looked at {stub})")
    return stub


def _backend_dir(root: Path, target: Path) -> Path:
    """A backend directory with ``python/`` holding the backend and this Python's stub."""
    python = target / "python"
    python.mkdir(parents=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(root / "backends" / "python" / f, python / f)
    shutil.copy2(_stub_path(root), python / "triton_python_backend_stub")
    return target


def _runner_python_path(target: Path) -> Path:
    """A folder holding only a link to this dinoserve package, for the runners' import path
    (an editable install is not importable from a bare site-packages path)."""
    target.mkdir(parents=True)
    os.symlink(Path(__file__).resolve().parent, target / "dinoserve")
    return target


def _bundled_env(root: Path, python_path: Sequence[Path] = ()) -> dict[str, str]:
    """Environment for the pip server: this Python's libpython first (else the stub picks
    the system's, another patch level, and crashes), the wheel's libraries, the venv on PATH,
    and ``python_path`` first on the runners' import path."""
    env = dict(os.environ)
    site = root.parent.parent  # <site-packages>/pytriton/tritonserver
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(site / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    paths = [str(p) for p in python_path] + [p for p in sys.path if p.endswith("site-packages")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env
