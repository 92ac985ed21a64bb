"""int8 on ARM64 servers, run on this x86 machine: the aarch64 wheels of onnxruntime (and
OpenVINO) under qemu-user as a Cortex-A72 (NEON only), a Neoverse N1 (dot product) and an
i8mm/SVE2 CPU (:mod:`benchmarks.arm64_qemu`), each picking the int8 kernels of that CPU.
dinoserve's int8 rule, decided in the guest from its own /proc/cpuinfo, must agree with what
those kernels compute. (OpenVINO is left out: under qemu its ARM build could not run the int8
graphs as a Cortex-A72 and gave wrong fp32 as ``max``; see benchmarks/int8_portable.py.)

Needs ``bash benchmarks/arm64_qemu.sh`` (the README's test command runs it); emulated, so
the graphs are scored on few images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.arm64_qemu import CPUS, command, guest_env, guest_flags, unavailable
from benchmarks.harness import REPO
from dinoserve.cpu import PORTABLE, VNNI_ONLY, int8_problem

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


def run_as(cpu: str, *args: str) -> dict:
    """:mod:`benchmarks.int8_probe` in the aarch64 Python as ``cpu``."""
    r = subprocess.run(command(cpu, "-m", "benchmarks.int8_probe", *args), env=guest_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def few_graphs(int8_graphs: Path, tmp_path_factory) -> Path:
    """The shipped resnet18's graphs with 16 of the calibration pictures (emulation is tens of times slower)."""
    import numpy as np

    work = tmp_path_factory.mktemp("arm64")
    for f in int8_graphs.glob("*.onnx"):
        (work / f.name).symlink_to(f)
    np.save(work / "calibration.npy", np.load(int8_graphs / "calibration.npy")[:16])
    return work


@pytest.mark.parametrize("cpu", list(CPUS))
def test_every_int8_scheme_is_exact_on_each_arm_cpu(cpu, few_graphs):
    """Every scheme is exact for every extreme operand pair its weights can hold, and dinoserve
    serves all of them there (decided in the guest, from its own /proc/cpuinfo); the shipped
    resnet18 passes the gate with the default and the full-range scheme. Only a -128 weight,
    which symmetric quantisation never makes, wraps, and only without the dot product."""
    got = run_as(cpu, "--graphs", str(few_graphs), PORTABLE, VNNI_ONLY, "--no-openvino")
    assert got["machine"] == "aarch64" and got["features"], got
    assert all(got["exact"].values()) and got["u8s8_refusal"] is None, got
    assert int8_problem(VNNI_ONLY, guest_flags(cpu), "aarch64") is None
    assert got["gate"][PORTABLE]["passed"] and got["gate"][VNNI_ONLY]["passed"], got
    flags = guest_flags(cpu)
    assert got["exact_at_minus_128"] == ("asimddp" in flags), got
