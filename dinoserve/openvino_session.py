"""OpenVINO as a second CPU runtime for the same exported ``model.onnx``.

``benchmarks/serving_throughput.py`` measured OpenVINO against onnxruntime on this
project's exports: 1.36x for ResNet-50 fp32 and 2.87x for its int8 (QDQ) graph, but
1.21x / 0.89x for ViT-S/16 (benchmarks/results/serving_throughput.json). So it is offered as a choice
(``Client(runtime="openvino")``, ``dinoserve serve --runtime openvino``), never the default.

:class:`OpenVINOSession` has the part of ``onnxruntime.InferenceSession`` that the client
and the serving runner use (``run``, ``get_outputs``), so both take either runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from dinoserve.errors import ConfigError, ModelFileError
from dinoserve.onnx_files import missing_files_problem

#: What a user without the package should do.
OPENVINO_HINT = 'install it with `pip install -e ".[openvino]"` (or `pip install openvino`)'

#: The provider name reported in ``Client.info.provider`` and the serve log.
OPENVINO_PROVIDER = "OpenVINO-CPU"


class OpenVINOSession:
    """An OpenVINO CPU model compiled from an ONNX file, with onnxruntime's ``run`` surface.

    Compiled with the f32 precision hint: on CPUs with AMX OpenVINO would otherwise run
    bf16, which is not the precision the model card promises (an int8 graph still runs its
    quantised operators in int8).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 0, hint: str = ""):
        try:
            import openvino as ov
        except ImportError:
            raise ConfigError(f"runtime 'openvino' needs the openvino package, which is not installed; "
                              f"{OPENVINO_HINT}") from None
        path = Path(path)
        if not path.is_file() or path.stat().st_size == 0:
            what = "no such ONNX model file" if not path.is_file() else "the ONNX model file is empty (0 bytes)"
            raise ModelFileError(f"{path}: {what}; {hint}")
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        try:
            self._compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            missing = missing_files_problem(path)
            if missing:
                raise ModelFileError(f"{path}: {missing}; {hint}") from None
            raise ModelFileError(f"{path}: OpenVINO cannot load it, the file is truncated or damaged ({first}); "
                                 f"{hint}") from None
        self._outputs = {o.get_any_name(): o for o in self._compiled.outputs}

    def get_outputs(self) -> list[SimpleNamespace]:
        """The graph's outputs, as objects with a ``name`` (onnxruntime's shape)."""
        return [SimpleNamespace(name=name) for name in self._outputs]

    def get_providers(self) -> list[str]:
        return [OPENVINO_PROVIDER]

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs ``output_names`` (all when None) for ``feeds``. Thread-safe: each call
        gets its own infer request, whose results are copied out before it is dropped."""
        names = list(output_names) if output_names else list(self._outputs)
        unknown = [n for n in names if n not in self._outputs]
        if unknown:
            raise ValueError(f"outputs {unknown} are not in the graph ({', '.join(self._outputs)})")
        result = self._compiled.create_infer_request().infer(feeds)
        return [np.array(result[self._outputs[n]], copy=True) for n in names]
