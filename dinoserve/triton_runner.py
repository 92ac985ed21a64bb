"""Triton Python-backend runner for an ONNX model: copied as ``model.py`` into a serving folder.

The tritonserver in the ``nvidia-pytriton`` wheel has no onnxruntime backend, so
``dinoserve serve`` gives each ONNX model this runner instead: same name, inputs and
outputs, running the very same ``model.onnx`` (linked beside this file) with onnxruntime.
Triton's dynamic batcher hands ``execute`` several requests at once; they are
concatenated, run in one onnxruntime call and split back, so batching still pays.

This file is loaded by Triton's Python stub, not imported by dinoserve. Besides the
standard library, numpy and ``triton_python_backend_utils`` it uses dinoserve's one
onnxruntime session factory (:func:`dinoserve.ort_session.open_session`): the serving
folder puts the very dinoserve that runs ``serve`` on the stub's path.

If tritonserver dies (``kill -9``, the OOM killer), the runner must not outlive it: a
watchdog thread sees the runner re-parented, unlinks the server's shared-memory region that
this runner was given, and exits. (A parent-death signal would fire when the *thread* of
tritonserver that started the stub ends, which is not the server's death.)
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from dinoserve.cpu import CPU_PROVIDERS, check_int8_model
from dinoserve.errors import ModelError
from dinoserve.ort_session import DEVICES, open_runtime_session, session_provider
from dinoserve.triton_log import provider_line
from dinoserve.triton_process import SHM_PREFIX
from dinoserve.triton_python_backend import RUNNER_DEVICE, RUNNER_RUNTIME, RUNNER_THREADS


def _stub_arguments() -> list[str]:
    """The stub's command line: model.py, shm region, sizes, server pid, ... (see
    :mod:`dinoserve.triton_process`)."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def watch_parent(interval: float = 0.5) -> threading.Thread:
    """Exit this runner, after unlinking its shared-memory region, once tritonserver is gone."""
    argv = _stub_arguments()
    region = argv[2] if len(argv) > 2 and argv[2].startswith(SHM_PREFIX) and "/" not in argv[2] else None
    parent = os.getppid()

    def run() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        if region is not None:
            try:
                os.unlink(os.path.join("/dev/shm", region))
            except OSError:
                pass
        os._exit(1)

    thread = threading.Thread(target=run, name="dinoserve-runner-watchdog", daemon=True)
    thread.start()
    return thread


def _parameter(model_config: dict, key: str, default: str = "") -> str:
    value = model_config.get("parameters", {}).get(key, {})
    return value.get("string_value", default) if isinstance(value, dict) else default


class TritonPythonModel:
    """Runs ``<version>/model.onnx`` with onnxruntime for every batch Triton schedules."""

    def initialize(self, args: dict) -> None:
        watch_parent()
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        threads = int(_parameter(config, RUNNER_THREADS, "0") or 0)  # 0: onnxruntime's default (all cores)
        # "auto" (GPU instances, or serve --device auto): TensorRT, CUDA, then the CPU; "gpu",
        # "cuda", "tensorrt": fail to load, naming what is missing, rather than run on the CPU.
        device = _parameter(config, RUNNER_DEVICE, "cpu") or "cpu"
        if device not in DEVICES:
            device = "cpu"
        self.runtime = runtime = _parameter(config, RUNNER_RUNTIME, "onnxruntime") or "onnxruntime"
        self.session = open_runtime_session(path, runtime, device=device, threads=threads,
                                            hint="re-export the model with `dinoserve export`, then start serve again")
        if session_provider(self.session) in CPU_PROVIDERS:
            try:  # a u8s8 int8 model on a CPU without VNNI: refuse to load (one line in the server log)
                check_int8_model(config["name"], _parameter(config, "precision", "fp32"),
                                 _parameter(config, "int8_scheme", ""))
            except ModelError as e:
                raise pb_utils.TritonModelException(str(e)) from None
        # One line in the server log that `dinoserve serve` reports (TritonServer.runner_providers).
        print(provider_line(config["name"], args["model_version"], device, session_provider(self.session)),
              flush=True)
        graph_outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in self.output_names if n not in graph_outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"{path}: outputs {missing} declared in config.pbtxt are not in the ONNX graph {graph_outputs}"
            )

    def execute(self, requests: list) -> list:
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        responses: list = [None] * len(requests)
        # Requests of one shape run together (ViTs accept several image sizes).
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape[1:], []).append(i)
        for members in groups.values():
            batch = np.concatenate([arrays[i] for i in members]) if len(members) > 1 else arrays[members[0]]
            try:
                outputs = self.session.run(self.output_names, {self.input_name: batch})
            except Exception as e:  # onnxruntime's error types; each request gets the message
                error = pb_utils.TritonError(f"{self.runtime} failed on input {tuple(batch.shape)}: {e}")
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=error)
                continue
            start = 0
            for i in members:
                n = arrays[i].shape[0]
                tensors = [
                    pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + n], dtype=self.output_dtypes[name]))
                    for name, out in zip(self.output_names, outputs)
                ]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += n
        return responses

    def finalize(self) -> None:
        self.session = None
