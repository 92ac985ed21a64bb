"""onnxruntime sessions: the one factory and the one device rule for every ONNX model dinoserve runs.

>>> from dinoserve.ort_session import open_session
>>> session = open_session("model_repository/dino_vits16/1/model.onnx", device="auto")

- :func:`execution_providers` turns a device name into onnxruntime providers: ``"auto"`` uses
  CUDA when this onnxruntime build has it, else the CPU; ``"gpu"`` requires CUDA (an error
  names the build's providers otherwise); ``"cpu"`` is the CPU only. A provider that is not
  compiled in is never requested: onnxruntime would only warn and fall back, hiding the mistake.
- :func:`open_session` checks the file first and turns onnxruntime's load failures (an empty,
  truncated or non-ONNX file) into one :class:`~dinoserve.errors.ModelFileError` line that
  names the file and the fix, instead of onnxruntime's traceback.

Imports nothing but onnxruntime (inside the functions) and :mod:`dinoserve.errors`, so the
in-process client, export verification and the Triton Python-backend runner can all use it.
No torch here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from dinoserve.errors import ConfigError, ModelFileError

DEVICES = ("auto", "cpu", "gpu")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"

#: What to do about a damaged model file, unless the caller knows better.
REEXPORT_HINT = "re-export the model with `dinoserve export` (it writes model.onnx atomically)"


def execution_providers(device: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """onnxruntime providers for ``device`` (``auto``, ``cpu`` or ``gpu``), best first."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if device == "gpu":
        if CUDA not in available:
            raise ConfigError(
                f"device 'gpu' needs onnxruntime's {CUDA}, but this onnxruntime build has only "
                f"{', '.join(available) or 'no providers'}; install onnxruntime-gpu or use device 'cpu'"
            )
        return [CUDA, CPU]
    raise ConfigError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")


def open_session(path: str | os.PathLike, *, device: str = "auto", providers: Sequence[str] | None = None,
                 threads: int = 0, hint: str = REEXPORT_HINT):
    """An ``onnxruntime.InferenceSession`` on ``path``.

    Args:
        device: ``auto``, ``cpu`` or ``gpu`` (see :func:`execution_providers`); ignored when
            ``providers`` is given.
        threads: intra-op threads; 0 is onnxruntime's default (all cores).
        hint: what the user should do when the file cannot be loaded.

    Raises:
        ModelFileError: the file is missing, empty, truncated or not an ONNX model.
        ConfigError: an unknown device, or ``gpu`` without CUDA.
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
        return ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
    except (ort_errors.InvalidProtobuf, ort_errors.InvalidArgument, ort_errors.InvalidGraph) as e:
        raise ModelFileError(
            f"{path}: not a loadable ONNX model, the file is truncated or damaged ({_first_line(e)}); {hint}"
        ) from None
    except (ort_errors.NoSuchFile, ort_errors.Fail) as e:
        raise ModelFileError(f"{path}: onnxruntime cannot load it ({_first_line(e)}); {hint}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:Protobuf parsing failed."
    return line.rsplit("failed:", 1)[-1].strip() or line
