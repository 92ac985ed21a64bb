"""What this CPU can do for int8, and whether an int8 model is right on it.

Why this exists: onnxruntime's int8 kernels (MLAS) multiply uint8 activations by int8
weights. On x86 CPUs without a VNNI instruction (AVX2-only machines such as many AMD EPYCs,
and AVX512 CPUs before Cascade Lake) they use ``vpmaddubsw``, which adds two u8 x s8
products into a *saturating* int16: with full-range weights (-128..127) the sum can pass
32767 and is clipped, so the embeddings drift from fp32 without any error (a user measured
mean cosine 0.9821, min 0.8065 on an AVX2 EPYC for a model that gave 0.9998 on a VNNI CPU).
With VNNI (``vpdpbusd``, AVX512-VNNI or AVX-VNNI) or AMX-INT8 the products go straight
into int32 and nothing saturates. MLAS picks its kernels from CPUID at start, with no
setting to override that (onnxruntime ``core/mlas/lib/platform.cpp``), so the only
portable fix is in the model: weights quantised to 7 bits (``reduce_range``), whose pair
sums stay under 255 * 64 * 2 = 32640.

OpenVINO's CPU plugin has the same limit (its documentation: 8-bit products on SSE, AVX2
and AVX-512 without VNNI saturate; the workaround is 7-bit weights), so the same rule holds
for a model that OpenVINO runs on the CPU.

On ARM64 every scheme is right. Without the dot-product instructions (``asimddp``:
Cortex-A53/A72, so Raspberry Pi 4 and AWS Graviton 1) MLAS turns uint8 activations into int8
by flipping their top bit and adds pairs of int8 x int8 products into an int16, which wraps
only for two pairs of -128 x -128: an activation of 0 against a weight of -128. onnxruntime
quantises weights symmetrically, to -127..127 (-64..64 for 7 bits), so no dinoserve export
holds a -128 weight; with ``asimddp`` (Cortex-A76, Neoverse N1 and later) or ``i8mm`` the
products go into int32 anyway.

Measured, not assumed: ``tests/test_int8_isa.py`` runs onnxruntime and OpenVINO with the
kernels of AVX2, AVX-VNNI, AVX512-without-VNNI and AVX512-VNNI CPUs (``benchmarks/isa_mask``
hides features from CPUID), and ``tests/test_int8_arm64.py`` the aarch64 builds under
qemu-user as a Cortex-A72, a Neoverse N1 and an i8mm/SVE CPU (``benchmarks/arm64_qemu``);
both check that u8s8 is exact, or drifts, exactly where :func:`int8_problem` says.

So an int8 export records its scheme in the model card (``int8_scheme``):

- ``u8s7`` (:data:`PORTABLE`): 7-bit weights; right on every x86 and ARM64 CPU. The default.
- ``u8u8``: uint8 weights; MLAS's u8u8 kernels widen to int16 first, so right everywhere too.
- ``u8s8`` (:data:`VNNI_ONLY`): full 8-bit weights; right on x86 only with VNNI or
  AMX-INT8, and on every ARM64 CPU.

and the serving side asks :func:`int8_problem` before it loads one. No torch, no onnxruntime
here: the decision is a pure function of the scheme and the CPU's feature flags.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Iterable

from dinoserve.errors import ModelError
from dinoserve.openvino_session import OPENVINO_PROVIDER
from dinoserve.ort_session import CPU

#: The session providers whose int8 kernels are this CPU's (and so need :func:`check_int8_model`).
CPU_PROVIDERS = (CPU, OPENVINO_PROVIDER)

log = logging.getLogger(__name__)

#: Set to 1 to serve a u8s8 model on a CPU without VNNI anyway (a warning instead of a refusal).
ALLOW_ENV = "DINOSERVE_INT8_ANY_CPU"
#: Space-separated CPU flags to decide for instead of this CPU's: checks a model against
#: another machine's CPU (paste its /proc/cpuinfo flags line), and lets tests exercise a
#: Triton runner's refusal on this machine.
FLAGS_ENV = "DINOSERVE_CPU_FLAGS"

__all__ = ["CPU_PROVIDERS", "PORTABLE", "VNNI_ONLY", "INT8_SCHEMES", "ISA_FEATURES", "ALLOW_ENV", "FLAGS_ENV",
           "cpu_flags", "proc_cpu_flags", "cpu_features", "cpu_name", "int8_problem", "int8_scheme_of", "check_int8_model"]

#: int8 scheme names as the model card stores them.
PORTABLE = "u8s7"
VNNI_ONLY = "u8s8"
INT8_SCHEMES = (PORTABLE, "u8u8", VNNI_ONLY)

#: Instruction-set features that change what is fast (or right) on a CPU, in /proc/cpuinfo's
#: spelling; benchmark JSON and the int8 gate record the ones a CPU has.
ISA_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
                "amx_tile", "amx_bf16", "amx_int8",
                # ARM64 (/proc/cpuinfo's "Features"): NEON, dot product, int8 matrix multiply, SVE
                "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
#: ARM's own cores by /proc/cpuinfo "CPU part" (implementer 0x41), for benchmark records;
#: Linux on ARM64 has no "model name" line.
_ARM_PARTS = {0xD03: "Cortex-A53", 0xD07: "Cortex-A57", 0xD08: "Cortex-A72", 0xD0B: "Cortex-A76",
              0xD0C: "Neoverse N1", 0xD40: "Neoverse V1", 0xD49: "Neoverse N2", 0xD4F: "Neoverse V2"}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of this CPU (empty when /proc/cpuinfo cannot be read, e.g. not Linux),
    or those :data:`FLAGS_ENV` names."""
    if os.environ.get(FLAGS_ENV, "").strip():
        return frozenset(os.environ[FLAGS_ENV].split())
    return proc_cpu_flags(cpuinfo)


def proc_cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags /proc/cpuinfo lists (empty when it cannot be read), whatever
    :data:`FLAGS_ENV` says."""
    for key, value in _cpuinfo_fields(cpuinfo):
        if key in ("flags", "Features"):  # x86, ARM64
            return frozenset(value.split())
    return frozenset()


def _cpuinfo_fields(cpuinfo: str | Path) -> list[tuple[str, str]]:
    """(key, value) of each ``key : value`` line of /proc/cpuinfo (empty when unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    return [(k.strip(), v.strip()) for k, sep, v in (line.partition(":") for line in text.splitlines()) if sep]


def cpu_features(flags: Iterable[str] | None = None) -> list[str]:
    """The :data:`ISA_FEATURES` among ``flags`` (this CPU's by default), in that order."""
    have = set(cpu_flags() if flags is None else flags)
    return [f for f in ISA_FEATURES if f in have]


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name: /proc/cpuinfo's, or on ARM64 its core named from "CPU part"
    (``platform.processor()`` when neither is there)."""
    fields = dict(reversed(_cpuinfo_fields(cpuinfo)))  # the first CPU's value of each key
    if "model name" in fields:
        return fields["model name"]
    if "CPU part" in fields:
        implementer, part = int(fields.get("CPU implementer", "0"), 16), int(fields["CPU part"], 16)
        return (_ARM_PARTS.get(part, f"ARM part {part:#x}") if implementer == 0x41
                else f"ARM64 implementer {implementer:#x} part {part:#x}")
    return platform.processor() or platform.machine()


def int8_scheme_of(precision: str, int8_scheme: str) -> str:
    """The int8 scheme a model card describes: ``""`` for float models; an int8 card written
    before the field existed was quantised with full-range weights, so it is :data:`VNNI_ONLY`."""
    if precision != "int8":
        return ""
    return int8_scheme or VNNI_ONLY


def _has_int32_dot(flags: set[str]) -> str | None:
    """The feature through which MLAS's u8s8 kernels accumulate without saturating, or None.

    Mirrors MLAS's choice: AMX-INT8 replaces the whole u8s8 GEMM; otherwise an AVX512 core
    CPU (avx512bw) uses its AVX512 kernel, which is exact only with avx512_vnni; a CPU
    without AVX512 uses the AVX-VNNI kernel when it has avx_vnni.
    """
    if {"amx_tile", "amx_int8"} <= flags:
        return "amx_int8"
    if "avx512bw" in flags:
        return "avx512_vnni" if "avx512_vnni" in flags else None
    return "avx_vnni" if "avx_vnni" in flags else None


def int8_problem(scheme: str, flags: Iterable[str], machine: str | None = None) -> str | None:
    """Why an int8 model quantised with ``scheme`` would give wrong embeddings on a CPU with
    feature ``flags`` (architecture ``machine``, this one's by default), or None if it is fine.

    Only full-range ``u8s8`` models on x86 CPUs without VNNI or AMX-INT8 are a problem
    (measured right on ARM64 with and without the dot product). With no flags known (not
    Linux) or on other architectures nothing is claimed.
    """
    if scheme != VNNI_ONLY:
        return None
    machine = (machine or platform.machine()).lower()
    flags = set(flags)
    if machine not in _X86 or not flags or _has_int32_dot(flags):
        return None
    has = ", ".join(cpu_features(flags)) or "none of " + ", ".join(ISA_FEATURES[:3])
    return (f"this CPU has no avx512_vnni, avx_vnni or amx_int8 (it has {has}), and the model's full-range "
            f"u8s8 int8 weights saturate the CPU's int8 kernels there (vpmaddubsw, in onnxruntime and "
            f"OpenVINO), so its embeddings would silently drift from fp32")


def check_int8_model(model: str, precision: str, int8_scheme: str, *, flags: Iterable[str] | None = None,
                     machine: str | None = None) -> None:
    """Refuse, in one line, to serve the int8 model ``model`` on this CPU (or one with
    ``flags``) if its embeddings would be wrong here; only a warning when :data:`ALLOW_ENV`
    is 1. Float models and portable schemes always pass.

    Raises:
        ModelError: naming the model, the missing CPU feature and the fix.
    """
    problem = int8_problem(int8_scheme_of(precision, int8_scheme), cpu_flags() if flags is None else flags, machine)
    if problem is None:
        return
    message = (f"int8 model {model!r} needs VNNI: {problem}; re-export it with `dinoserve export --int8` "
               f"(its default --int8-scheme {PORTABLE} is right on every CPU)")
    if os.environ.get(ALLOW_ENV) == "1":
        log.warning("%s (served anyway: %s=1)", message, ALLOW_ENV)
        return
    raise ModelError(f"{message}, or set {ALLOW_ENV}=1 to serve it anyway")
