"""What int8 computes on the CPU this process runs on, as JSON: run it under
:mod:`benchmarks.isa_mask` (another x86 CPU's kernels) or :mod:`benchmarks.arm64_qemu` (an
ARM CPU's) to see what a user's server would compute::

    .venv/bin/python -m benchmarks.int8_probe
    .venv/bin/python -m benchmarks.int8_probe --graphs WORK u8s7 u8s8   # WORK: fp32.onnx, <scheme>.onnx, calibration.npy

* ``exact``: per int8 scheme, whether onnxruntime's MatMulInteger gives the exact int32 sum
  for every extreme pair of operands that scheme's weights can hold (activations 0 and
  255; onnxruntime quantises weights symmetrically, so -127..127 and -64..64 for 7 bits),
  over K = 256 products. x86's ``vpmaddubsw`` saturates 255 x 127 + 255 x 127 here;
* ``exact_at_minus_128``: the same for activation 0 against weight -128, which no scheme's
  weights hold: ARM's NEON kernel without dot product turns uint8 into int8 first and adds
  (0 - 128) x -128 twice into an int16, which wraps. Recorded so that a quantiser that
  starts to use -128 is caught;
* ``refusal``: what :func:`dinoserve.cpu.check_int8_model` says of a u8s8 model here (None
  when it serves it), so the rule can be checked against ``exact``;
* with ``--graphs``: the int8 gate's figures of each scheme's graph against fp32 on the
  calibration images, and OpenVINO's mean cosine where OpenVINO is installed.

Needs numpy, onnx and onnxruntime, not torch: it runs in the aarch64 Python too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
from pathlib import Path

import numpy as np

from dinoserve.cpu import INT8_SCHEMES, VNNI_ONLY, check_int8_model, cpu_features, cpu_name
from dinoserve.errors import ModelError

#: scheme -> (activation dtype, weight dtype, the extreme weights it may hold)
EXTREMES: dict[str, tuple[type, type, tuple[int, ...]]] = {
    "u8s8": (np.uint8, np.int8, (-127, 127)),
    "u8s7": (np.uint8, np.int8, (-64, 64)),  # reduce_range: 7-bit weights
    "u8u8": (np.uint8, np.uint8, (0, 255)),
}
ACTIVATIONS = (0, 255)
K = 256


def matmul_is_exact(activation: int, weight: int, a_dtype: type, b_dtype: type) -> bool:
    """Whether onnxruntime's MatMulInteger of a constant ``[K, 8]`` weight (packed, as a
    quantised model's is) gives ``activation * weight * K`` exactly."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    onnx_type = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}
    weights = numpy_helper.from_array(np.full((K, 8), weight, b_dtype), "B")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
                              [helper.make_tensor_value_info("A", onnx_type[a_dtype], [None, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, 8])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"A": np.full((4, K), activation, a_dtype)})[0]
    return bool((y == activation * weight * K).all())


def exactness() -> dict[str, bool]:
    """Per scheme: exact for every extreme pair of its operands."""
    return {scheme: all(matmul_is_exact(a, w, a_dtype, b_dtype) for a in ACTIVATIONS for w in weights)
            for scheme, (a_dtype, b_dtype, weights) in EXTREMES.items()}


def refusal() -> str | None:
    """dinoserve's word on serving a full-range u8s8 model on this CPU."""
    try:
        check_int8_model("probe", "int8", VNNI_ONLY)
    except ModelError as e:
        return str(e)
    return None


def graph_figures(work: Path, schemes: list[str], openvino: bool = True) -> dict:
    """The gate's figures for each scheme's graph in ``work``, and OpenVINO's mean cosines
    (where it is installed and ``openvino``)."""
    from dinoserve.quantize import int8_quality, row_cosines

    images = np.load(work / "calibration.npy")
    out: dict = {"gate": {}}
    for scheme in schemes:
        q = int8_quality(work / "fp32.onnx", work / f"{scheme}.onnx", images, scheme=scheme)
        out["gate"][scheme] = {"passed": q.passed, "mean_cosine": q.mean_cosine, "min_cosine": q.min_cosine}
    if openvino and importlib.util.find_spec("openvino"):  # its CPU plugin picks kernels from the CPU's features too
        from dinoserve.contract import EMBEDDING, INPUT
        from dinoserve.openvino_session import OpenVINOSession

        def embed(name: str) -> np.ndarray:
            return OpenVINOSession(work / f"{name}.onnx").run([EMBEDDING], {INPUT: images})[0]

        fp32 = embed("fp32")
        out["openvino_mean_cosine"] = {s: float(row_cosines(fp32, embed(s)).mean()) for s in schemes}
    return out


def probe(work: Path | None = None, schemes: list[str] | None = None, openvino: bool = True) -> dict:
    """Everything above for this CPU, as one JSON-ready dict."""
    out = {"machine": platform.machine(), "cpu": cpu_name(), "features": cpu_features(), "exact": exactness(),
           "exact_at_minus_128": matmul_is_exact(0, -128, np.uint8, np.int8), "u8s8_refusal": refusal()}
    if work is not None:
        out.update(graph_figures(work, schemes or list(INT8_SCHEMES), openvino))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", nargs="+", metavar=("WORK", "SCHEME"),
                    help="a folder with fp32.onnx, <scheme>.onnx and calibration.npy, then the schemes to score")
    ap.add_argument("--no-openvino", action="store_true", help="score the graphs with onnxruntime only")
    args = ap.parse_args()
    work, schemes = (Path(args.graphs[0]), args.graphs[1:]) if args.graphs else (None, None)
    print(json.dumps(probe(work, schemes, openvino=not args.no_openvino)))


if __name__ == "__main__":
    main()
