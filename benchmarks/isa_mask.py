"""Run a command as if on an older x86 CPU: the CPU features it would lack are hidden from CPUID.

onnxruntime (MLAS), oneDNN and OpenVINO choose their kernels from CPUID when they start, and
none has a setting to choose a lower instruction set. On a Linux machine whose CPU can fault
on CPUID (flag ``cpuid_fault``), ``isa_mask.c``, preloaded, answers CPUID with the profile's
features cleared, so those libraries pick the kernels they would pick on that CPU and run
them natively (qemu-user emulates AVX2 only, at ~1 % of the speed). Profiles are CPUs users
serve on::

    .venv/bin/python -m benchmarks.isa_mask avx512_no_vnni -- .venv/bin/python -c "import onnxruntime"
    .venv/bin/python -m benchmarks.isa_mask --list

A masked process still reads this machine's ``/proc/cpuinfo``, so :func:`masked_env` also sets
``DINOSERVE_CPU_FLAGS`` to the flags the profile leaves: dinoserve's int8 rule then decides for
the CPU the kernels are picked for.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from dinoserve.cpu import FLAGS_ENV, proc_cpu_flags

SOURCE = Path(__file__).with_name("isa_mask.c")

_AVX512 = ("avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512ifma", "avx512vbmi", "avx512_vbmi2",
           "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_fp16", "avx512_bf16")
_AMX = ("amx_tile", "amx_int8", "amx_bf16")

#: profile -> (the features it hides, the CPUs it stands for)
PROFILES: dict[str, tuple[tuple[str, ...], str]] = {
    "avx2": (_AVX512 + _AMX + ("avx_vnni",),
             "AVX2 + FMA only: Intel Haswell to Comet Lake, AMD Zen 1-3 (many EPYC cloud machines)"),
    "avx_vnni": (_AVX512 + _AMX,
                 "AVX2 with AVX-VNNI, no AVX512: Intel Alder Lake and later client CPUs"),
    "avx512_no_vnni": (("avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni") + _AMX,
                       "AVX512 F/BW/DQ/VL without VNNI: Intel Skylake-SP and Skylake-X (first Xeon Scalable)"),
    "avx512_vnni": (("avx512_bf16", "avx512_fp16", "avx_vnni") + _AMX,
                    "AVX512 with VNNI, no AMX: Intel Cascade Lake and Ice Lake, AMD Zen 4"),
}


def unavailable() -> str | None:
    """Why masking cannot work on this machine, or None when it can."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"CPUID masking needs Linux on x86_64 (this is {platform.system()} {platform.machine()})"
    if "cpuid_fault" not in proc_cpu_flags():
        return "this CPU (or its hypervisor) does not offer CPUID faulting (no cpuid_fault in /proc/cpuinfo)"
    if not shutil.which("gcc"):
        return "no gcc to build isa_mask.c (apt-get install gcc)"
    return None


def library(cache: Path | None = None) -> Path:
    """The preload library, built once per source version into ``cache``."""
    source = SOURCE.read_bytes()
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinoserve"
    target = cache / f"isa_mask-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(partial), str(SOURCE)], check=True)
        partial.replace(target)
    return target


def flags_under(profile: str) -> frozenset[str]:
    """This CPU's flags (as /proc/cpuinfo lists them) less those ``profile`` hides."""
    return proc_cpu_flags() - set(PROFILES[profile][0])


def masked_env(profile: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (this process's by default) for a child that sees the CPU as ``profile``."""
    env = dict(os.environ if env is None else env)
    preload = " ".join(filter(None, [str(library()), env.get("LD_PRELOAD", "")]))
    return {**env, "LD_PRELOAD": preload, "ISA_MASK_HIDE": " ".join(PROFILES[profile][0]),
            FLAGS_ENV: " ".join(sorted(flags_under(profile)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", nargs="?", choices=list(PROFILES))
    ap.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command to run")
    ap.add_argument("--list", action="store_true", help="print the profiles and exit")
    args = ap.parse_args()
    if args.list or not args.profile:
        for name, (hidden, cpus) in PROFILES.items():
            print(f"{name:15} {cpus}\n{'':15} hides: {' '.join(hidden)}")
        return
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    if reason := unavailable():
        sys.exit(f"isa_mask: {reason}")
    os.execvpe(command[0], command, masked_env(args.profile))


if __name__ == "__main__":
    main()
