"""onnxruntime sessions: the one factory and the one device rule for every ONNX model dinoserve runs.

>>> from dinoserve.ort_session import open_session
>>> session = open_session("model_repository/dino_vits16/1/model.onnx", device="auto")

- :func:`execution_providers` turns a device name into onnxruntime providers, best first:
  ``"auto"`` asks for TensorRT, then CUDA, then the CPU, each only when this onnxruntime
  build has it, and may end on the CPU; ``"gpu"`` is TensorRT/CUDA and never the CPU;
  ``"cuda"`` and ``"tensorrt"`` ask for exactly that; ``"cpu"`` is the CPU only. A provider
  that is not compiled in is never requested.
- onnxruntime itself falls back to the CPU, with a log line only, when a GPU provider is
  compiled in but cannot start (no GPU, no driver, no TensorRT libraries). So
  :func:`open_session` checks the provider the session really got: a GPU device that ended
  on the CPU is an error naming what is missing (:func:`gpu_problem`), unless the caller
  allowed the fallback with ``"auto"``. :func:`session_provider` says which one runs.
- GPU providers come only with the ``onnxruntime-gpu`` wheel (``pip install -e ".[gpu]"``),
  which replaces ``onnxruntime``: the two share one module and must never be installed together.
- :func:`open_session` checks the file first and turns onnxruntime's load failures (an empty,
  truncated or non-ONNX file) into one :class:`~dinoserve.errors.ModelFileError` line that
  names the file and the fix, instead of onnxruntime's traceback.

Imports nothing but onnxruntime (inside the functions) and :mod:`dinoserve.errors`, so the
in-process client, export verification and the Triton Python-backend runner can all use it.
No torch here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from dinoserve.errors import ConfigError, ModelFileError
from dinoserve.onnx_files import missing_files_problem

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu", "cuda", "tensorrt")
#: Runtimes that run an exported ONNX graph, in-process and in the serving runner
#: (:func:`open_runtime_session`); OpenVINO is CPU only.
RUNTIMES = ("onnxruntime", "openvino")
TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
#: Where TensorRT keeps the engines it builds (building one takes minutes for a ViT).
TRT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinoserve" / "tensorrt"
GPU_EXTRA_HINT = 'install the GPU build with `pip install -e ".[gpu]"` (onnxruntime-gpu replaces onnxruntime)'

#: What to do about a damaged model file, unless the caller knows better.
REEXPORT_HINT = "re-export the model with `dinoserve export` (it writes model.onnx atomically)"


def execution_providers(device: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """onnxruntime providers for ``device`` (see :data:`DEVICES`), best first.

    Raises:
        ConfigError: an unknown device, or a GPU device this onnxruntime build cannot serve
            (the message names the build's providers and the fix).
    """
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    have = [p for p in GPU_PROVIDERS if p in available]
    if device == "cpu":
        return [CPU]
    if device == "auto":
        return have + [CPU]
    wanted = {"gpu": CUDA, "cuda": CUDA, "tensorrt": TENSORRT}[device]
    if wanted not in available:
        raise ConfigError(
            f"device {device!r} needs onnxruntime's {wanted}, but this onnxruntime build has only "
            f"{', '.join(available) or 'no providers'}; {GPU_EXTRA_HINT}, or use device 'auto' to allow the CPU"
        )
    # TensorRT hands the operators it cannot build to CUDA, and CUDA the rest to the CPU.
    return {"gpu": have, "cuda": [CUDA], "tensorrt": [TENSORRT] + ([CUDA] if CUDA in available else [])}[device] + [CPU]


def gpu_problem() -> str | None:
    """Why a GPU provider cannot run here (no onnxruntime-gpu, no NVIDIA driver), or None."""
    import onnxruntime as ort
    from importlib import metadata

    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            installed.append(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        return ("both onnxruntime and onnxruntime-gpu are installed and overwrite each other's module; "
                "`pip uninstall -y onnxruntime onnxruntime-gpu`, then " + GPU_EXTRA_HINT)
    if CUDA not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} is the CPU build (no {CUDA}); {GPU_EXTRA_HINT}"
    if not Path("/proc/driver/nvidia/version").exists() and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return "onnxruntime-gpu is installed but this machine has no NVIDIA GPU driver (/proc/driver/nvidia missing)"
    return None


def session_provider(session) -> str:
    """The execution provider a session really runs on first (e.g. ``CUDAExecutionProvider``)."""
    return session.get_providers()[0]


def _with_options(providers: Sequence[str], trt_fp16: bool) -> list:
    out: list = []
    for p in providers:
        if p == TENSORRT:
            out.append((p, {"trt_fp16_enable": bool(trt_fp16), "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": str(TRT_CACHE), "trt_timing_cache_enable": True}))
        else:
            out.append(p)
    return out


def open_session(path: str | os.PathLike, *, device: str = "auto", providers: Sequence[str] | None = None,
                 threads: int = 0, hint: str = REEXPORT_HINT, trt_fp16: bool = False):
    """An ``onnxruntime.InferenceSession`` on ``path``.

    Args:
        device: one of :data:`DEVICES` (see :func:`execution_providers`); ignored when
            ``providers`` is given.
        threads: intra-op threads; 0 is onnxruntime's default (all cores).
        hint: what the user should do when the file cannot be loaded.
        trt_fp16: let TensorRT build fp16 engines (TensorRT only).

    Raises:
        ModelFileError: the file is missing, empty, truncated or not an ONNX model.
        ConfigError: an unknown device, or a GPU device (``gpu``, ``cuda``, ``tensorrt``)
            that this build or machine cannot serve; ``auto`` falls back to the CPU instead.
    """
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such ONNX model file; {hint}")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: the ONNX model file is empty (0 bytes); {hint}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only; onnxruntime's warnings are noise for users
    opts.intra_op_num_threads = int(threads)
    chosen = list(providers) if providers is not None else execution_providers(device)
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=_with_options(chosen, trt_fp16))
    except (ort_errors.InvalidProtobuf, ort_errors.InvalidArgument, ort_errors.InvalidGraph,
            ort_errors.NoSuchFile, ort_errors.Fail) as e:
        raise _load_error(path, e, hint) from None
    got = session_provider(session)
    if got != chosen[0] and not (device == "gpu" and providers is None and got in GPU_PROVIDERS):
        # onnxruntime fell back by itself (a GPU provider compiled in but unable to start).
        why = gpu_problem() or f"{chosen[0]} did not start"
        if providers is None and device not in ("auto", "cpu"):
            raise ConfigError(f"device {device!r} for {path}: {why}; use device 'auto' to allow the CPU")
        log.warning("%s: %s, running on %s instead (%s)", path, chosen[0], got, why)
    return session


def check_runtime(runtime: str, device: str = "auto") -> str:
    """``runtime`` if it is one of :data:`RUNTIMES` and can run on ``device``; a
    :class:`~dinoserve.errors.ConfigError` naming the choices otherwise."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "openvino" and device not in ("auto", "cpu"):
        raise ConfigError(f"runtime 'openvino' runs on the CPU only, not device {device!r}; "
                          f"use runtime 'onnxruntime' for GPUs")
    return runtime


def open_runtime_session(path: str | os.PathLike, runtime: str = "onnxruntime", *, device: str = "auto",
                         providers: Sequence[str] | None = None, threads: int = 0, hint: str = REEXPORT_HINT):
    """A session on ``path`` in ``runtime``: :func:`open_session` for ``"onnxruntime"``, an
    :class:`~dinoserve.openvino_session.OpenVINOSession` (CPU only) for ``"openvino"``.
    Both answer ``run``, ``get_outputs`` and :func:`session_provider`."""
    if check_runtime(runtime, device) == "openvino":
        from dinoserve.openvino_session import OpenVINOSession

        if providers is not None:
            raise ConfigError("onnxruntime providers were given for runtime 'openvino'")
        return OpenVINOSession(path, threads=threads, hint=hint)
    return open_session(path, device=device, providers=providers, threads=threads, hint=hint)


def _load_error(path: Path, e: BaseException, hint: str) -> ModelFileError:
    """What to tell the user when onnxruntime cannot load ``path``."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    missing = missing_files_problem(path)
    if missing:  # onnxruntime's own message names neither the file nor why it matters
        return ModelFileError(f"{path}: {missing}; {hint}")
    if isinstance(e, (ort_errors.NoSuchFile, ort_errors.Fail)):
        return ModelFileError(f"{path}: onnxruntime cannot load it ({_first_line(e)}); {hint}")
    return ModelFileError(f"{path}: not a loadable ONNX model, the file is truncated or damaged "
                          f"({_first_line(e)}); {hint}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:Protobuf parsing failed."
    return line.rsplit("failed:", 1)[-1].strip() or line
