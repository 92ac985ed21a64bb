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

import pytest

from benchmarks.harness import REPO
from benchmarks.isa_mask import PROFILES, flags_under, masked_env, unavailable
from dinoserve.cpu import PORTABLE, VNNI_ONLY, int8_problem, proc_cpu_flags

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


def run_as(profile: str | None, graphs: Path, *schemes: str) -> dict:
    """:mod:`benchmarks.int8_probe` with the kernels of ``profile``'s CPU (this one's for None)."""
    env = masked_env(profile) if profile else None
    r = subprocess.run([sys.executable, "-m", "benchmarks.int8_probe", "--graphs", str(graphs), *schemes], env=env,
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_int8_rule_matches_the_kernels_of_each_cpu(profile, int8_graphs):
    """The rule refuses u8s8 exactly where the kernels onnxruntime picks saturate, and the
    portable schemes are exact everywhere; the default export passes the gate everywhere."""
    flags = flags_under(profile) if profile else proc_cpu_flags()
    got = run_as(profile, int8_graphs, PORTABLE, VNNI_ONLY)
    if profile:  # the child decides for the profile's CPU, not this one's
        assert not set(PROFILES[profile][0]) & set(got["features"])
    refused = int8_problem(VNNI_ONLY, flags, "x86_64") is not None
    assert got["exact"]["u8s8"] == (not refused) == (got["u8s8_refusal"] is None), got
    assert got["exact"]["u8s7"] and got["exact"]["u8u8"], got
    assert got["gate"][PORTABLE]["passed"], got
    if "openvino_mean_cosine" in got:  # the same rule holds for OpenVINO's kernels
        ov = got["openvino_mean_cosine"]
        assert ov[PORTABLE] >= 0.99 and (ov[VNNI_ONLY] >= 0.99) == (not refused), got


def test_full_range_weights_drift_where_refused(int8_graphs):
    """Why the rule exists, on a real model: the shipped resnet18 quantised with full-range
    weights fails the gate on AVX512 without VNNI, while 7-bit weights pass on the same kernels."""
    assert int8_problem(VNNI_ONLY, flags_under("avx512_no_vnni"), "x86_64")
    got = run_as("avx512_no_vnni", int8_graphs, VNNI_ONLY, PORTABLE)
    assert not got["gate"][VNNI_ONLY]["passed"], got
    assert got["gate"][PORTABLE]["mean_cosine"] - got["gate"][VNNI_ONLY]["mean_cosine"] > 0.01, got


def test_a_real_crash_under_the_mask_still_crashes():
    """The mask's SIGSEGV handler only answers CPUID: any other fault ends the process as
    it would have (instead of looping on the faulting instruction)."""
    r = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], env=masked_env("avx2"),
                       capture_output=True, timeout=60)
    assert r.returncode == -11
