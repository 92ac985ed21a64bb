"""int8 on the CPUs users serve on, run natively on this one: each profile of
:mod:`benchmarks.isa_mask` hides CPU features from CPUID, so onnxruntime picks the int8 kernels
of an AVX2, AVX-VNNI, AVX512-without-VNNI or AVX512-VNNI CPU. dinoserve's int8 rule
(:func:`dinoserve.cpu.int8_problem`, a pure function of CPU flags) must agree with what those
kernels really compute, and the default export scheme must pass the gate on every one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.isa_mask import PROFILES, flags_under, masked_env, unavailable
from benchmarks.synthetic import make_image_folder
from dinoserve.cpu import INT8_SCHEMES, PORTABLE, VNNI_ONLY, int8_problem, proc_cpu_flags
from dinoserve.export import export_onnx
from dinoserve.models import load_backbone
from dinoserve.quantize import calibration_batch, quantize_int8

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "dinoserve_resnet18_openclipart.safetensors"

# Worst-case operands for each scheme's weight range: every uint8 activation 255, every weight
# at its scheme's extreme. A kernel that adds u8 x s8 pairs into a saturating int16
# (vpmaddubsw) clips 255 * 127 * 2 = 64770 to 32767; 7-bit weights (63) stay under it.
CHILD = r"""
import json, sys
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from dinoserve.cpu import cpu_features
from dinoserve.quantize import int8_quality

K = 256
def gemm(weight, dtype):
    b = numpy_helper.from_array(np.full((K, 8), weight, dtype), "B")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, 8])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = s.run(None, {"A": np.full((4, K), 255, np.uint8)})[0]
    return int(y[0, 0]) == 255 * weight * K
work = sys.argv[1]
images = np.load(f"{work}/calibration.npy")
out = {"features": cpu_features(),
       "exact": {"u8s8": gemm(127, np.int8), "u8s7": gemm(63, np.int8), "u8u8": gemm(255, np.uint8)},
       "gate": {}}
for scheme in sys.argv[2:]:
    q = int8_quality(f"{work}/fp32.onnx", f"{work}/{scheme}.onnx", images, scheme=scheme)
    out["gate"][scheme] = {"passed": q.passed, "mean_cosine": q.mean_cosine}
import importlib.util
if importlib.util.find_spec("openvino"):  # OpenVINO's CPU plugin (oneDNN) picks its kernels from CPUID too
    from dinoserve.contract import EMBEDDING, INPUT
    from dinoserve.openvino_session import OpenVINOSession
    from dinoserve.quantize import row_cosines
    def ov(name):
        return OpenVINOSession(f"{work}/{name}.onnx").run([EMBEDDING], {INPUT: images})[0]
    fp32 = ov("fp32")
    out["openvino_mean_cosine"] = {s: float(row_cosines(fp32, ov(s)).mean()) for s in ("u8s7", "u8s8")}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Path:
    """The shipped resnet18 at 64 px: fp32 and each int8 scheme, calibrated on 48 pictures."""
    work = tmp_path_factory.mktemp("isa")
    make_image_folder(work / "images", per_class=16, seed=5)
    batch, _ = calibration_batch(work / "images", 64)
    np.save(work / "calibration.npy", batch)
    res = export_onnx(model=load_backbone(SHIPPED), name="m", repo=work / "repo", image_size=64)
    (work / "fp32.onnx").write_bytes(res.onnx_path.read_bytes())
    for scheme in INT8_SCHEMES:
        quantize_int8(work / "fp32.onnx", work / f"{scheme}.onnx", batch, family="resnet", scheme=scheme)
    return work


def run_as(profile: str | None, work: Path, *schemes: str) -> dict:
    env = masked_env(profile) if profile else None
    r = subprocess.run([sys.executable, "-c", CHILD, str(work), *schemes], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_int8_rule_matches_the_kernels_of_each_cpu(profile, graphs):
    """The rule refuses u8s8 exactly where the kernels onnxruntime picks saturate, and the
    portable schemes are exact everywhere; the default export passes the gate everywhere."""
    flags = flags_under(profile) if profile else proc_cpu_flags()
    got = run_as(profile, graphs, PORTABLE)
    if profile:  # the child decides for the profile's CPU, not this one's
        assert not set(PROFILES[profile][0]) & set(got["features"])
    refused = int8_problem(VNNI_ONLY, flags, "x86_64") is not None
    assert got["exact"]["u8s8"] == (not refused), got
    assert got["exact"]["u8s7"] and got["exact"]["u8u8"], got
    assert got["gate"][PORTABLE]["passed"], got
    if "openvino_mean_cosine" in got:  # the same rule holds for OpenVINO's kernels
        ov = got["openvino_mean_cosine"]
        assert ov[PORTABLE] >= 0.99 and (ov[VNNI_ONLY] >= 0.99) == (not refused), got


def test_full_range_weights_drift_where_refused(graphs):
    """Why the rule exists, on a real model: the shipped resnet18 quantised with full-range
    weights fails the gate on AVX512 without VNNI, while 7-bit weights pass on the same kernels."""
    assert int8_problem(VNNI_ONLY, flags_under("avx512_no_vnni"), "x86_64")
    got = run_as("avx512_no_vnni", graphs, VNNI_ONLY, PORTABLE)
    assert not got["gate"][VNNI_ONLY]["passed"], got
    assert got["gate"][PORTABLE]["mean_cosine"] - got["gate"][VNNI_ONLY]["mean_cosine"] > 0.01, got


def test_a_real_crash_under_the_mask_still_crashes():
    """The mask's SIGSEGV handler only answers CPUID: any other fault ends the process as
    it would have (instead of looping on the faulting instruction)."""
    r = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], env=masked_env("avx2"),
                       capture_output=True, timeout=60)
    assert r.returncode == -11
