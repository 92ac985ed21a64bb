"""Run onnxruntime and OpenVINO's ARM64 builds on this x86 machine, as a chosen ARM CPU.

onnxruntime (MLAS) picks its ARM64 int8 kernels from the CPU's features (HWCAP) at start:
plain NEON, the dot-product instructions (``asimddp``: ``sdot``/``udot``) or the int8 matrix
multiply (``i8mm``). qemu-user runs aarch64 programs here and gives each ``-cpu`` model its
own HWCAP, so the very wheels an ARM server installs run the kernels of that CPU, exactly
(emulated: tens of times slower than native, so accuracy only, never speed)::

    bash benchmarks/arm64_qemu.sh        # once: aarch64 Python + wheels (~360 MB, ~1 min)
    .venv/bin/python -m benchmarks.arm64_qemu cortex-a72 -- -c "import onnxruntime"
    .venv/bin/python -m benchmarks.arm64_qemu --list

The guest runs this repository's code (``dinoserve`` without torch) from ``PYTHONPATH``.
qemu 7.2 shows the guest the host's x86 ``/proc/cpuinfo``, on which onnxruntime's CPU
probe crashes; each CPU model therefore gets a prefix folder (qemu's ``-L``) with an ARM64
``/proc/cpuinfo`` written by the guest itself from its HWCAP, which is also what
:func:`dinoserve.cpu.cpu_flags` reads there.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import REPO
from dinoserve.cpu import FLAGS_ENV, proc_cpu_flags

QEMU = "/usr/bin/qemu-aarch64"
SETUP = Path(__file__).with_name("arm64_qemu.sh")

#: qemu -cpu model -> the CPUs whose int8 kernels it picks
CPUS: dict[str, str] = {
    "cortex-a72": "NEON without dot product: Cortex-A53/A72 (Raspberry Pi 3 and 4, AWS Graviton 1)",
    "neoverse-n1": "NEON with dot product (asimddp): Cortex-A76, Neoverse N1 (AWS Graviton 2, Ampere Altra)",
    "max": "dot product, i8mm, SVE2 (qemu's every feature): as Neoverse V1/V2 (AWS Graviton 3 and 4)",
}

# Runs in the guest: an ARM64 /proc/cpuinfo (and the MIDR files OpenVINO reads) from the
# HWCAP qemu gives this -cpu model, into the prefix folder argv[1].
_WRITE_CPUINFO = r"""
import ctypes, mmap, os, sys
root = sys.argv[1]
libc = ctypes.CDLL(None)
libc.getauxval.restype, libc.getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
hwcap, hwcap2 = libc.getauxval(16), libc.getauxval(26)  # AT_HWCAP, AT_HWCAP2: Linux's bit order below
HW = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
      "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HW2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 "
       "i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 smeb16f32 "
       "smef32f32 smefa64 wfxt ebf16 sveebf16").split()
features = [n for i, n in enumerate(HW) if hwcap >> i & 1] + [n for i, n in enumerate(HW2) if hwcap2 >> i & 1]
midr = 0
if hwcap >> 11 & 1:  # HWCAP_CPUID: user space may read ID registers; run `mrs x0, midr_el1; ret`
    code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write((0xD5380000).to_bytes(4, "little") + (0xD65F03C0).to_bytes(4, "little"))
    midr = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(code)))()
text = ""
for cpu in range(os.cpu_count() or 1):
    text += (f"processor\t: {cpu}\nFeatures\t: {' '.join(features)}\nCPU implementer\t: {midr >> 24 & 0xFF:#04x}\n"
             f"CPU architecture: 8\nCPU variant\t: {midr >> 20 & 0xF:#x}\nCPU part\t: {midr >> 4 & 0xFFF:#05x}\n"
             f"CPU revision\t: {midr & 0xF}\n\n")
    ident = os.path.join(root, f"sys/devices/system/cpu/cpu{cpu}/regs/identification")
    os.makedirs(ident, exist_ok=True)
    for name in ("midr_el1", "revidr_el1"):
        with open(os.path.join(ident, name), "w") as f:
            f.write(f"{midr if name == 'midr_el1' else 0:#018x}\n")
os.makedirs(os.path.join(root, "proc"), exist_ok=True)
with open(os.path.join(root, "proc", "cpuinfo"), "w") as f:
    f.write(text)
"""


def home() -> Path:
    """Where ``arm64_qemu.sh`` builds the aarch64 Python."""
    return Path(os.environ.get("DINOSERVE_ARM64", Path.home() / ".cache" / "dinoserve" / "arm64"))


def _python() -> Path:
    return home() / "sysroot" / "usr" / "bin" / "python3.11"


def unavailable() -> str | None:
    """Why ARM64 builds cannot run here, or None when they can."""
    if platform.system() != "Linux":
        return f"qemu-user needs Linux (this is {platform.system()})"
    if not Path(QEMU).is_file():
        return f"no {QEMU} (apt-get install qemu-user)"
    if not _python().is_file() or not (home() / "site-packages" / "onnxruntime").is_dir():
        return f"no aarch64 Python in {home()}: run `bash {SETUP.relative_to(REPO)}` first"
    return None


def prefix(cpu: str) -> Path:
    """qemu's ``-L`` folder for ``cpu``: the sysroot, plus the ARM64 /proc/cpuinfo of that
    model (made once, by the guest)."""
    root = home() / "roots" / cpu
    if (root / "proc" / "cpuinfo").is_file():
        return root
    partial = root.with_name(f".{cpu}.{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for entry in (home() / "sysroot").iterdir():
        (partial / entry.name).symlink_to(Path("..", "..", "sysroot", entry.name))
    subprocess.run([QEMU, "-L", str(home() / "sysroot"), "-cpu", cpu, str(_python()), "-I", "-c", _WRITE_CPUINFO,
                    str(partial)], check=True, env={}, timeout=120)
    try:
        partial.rename(root)
    except OSError:  # another process made it first
        shutil.rmtree(partial)
    return root


def guest_flags(cpu: str) -> frozenset[str]:
    """The features (HWCAP names) the guest sees as ``cpu``."""
    return proc_cpu_flags(prefix(cpu) / "proc" / "cpuinfo")


def command(cpu: str, *python_args: str) -> list[str]:
    """The command line that runs the aarch64 Python as ``cpu`` with ``python_args``."""
    if cpu not in CPUS:
        raise ValueError(f"unknown ARM CPU model {cpu!r}; known: {', '.join(CPUS)}")
    return [QEMU, "-L", str(prefix(cpu)), "-cpu", cpu, str(_python()), *python_args]


def guest_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (this process's by default) for the guest: its own site-packages and this
    repository on the path, nothing of the host's Python, and its own /proc/cpuinfo's flags
    (not a host override) for dinoserve's int8 rule."""
    env = {k: v for k, v in (os.environ if env is None else env).items()
           if k not in ("PYTHONHOME", "PYTHONSTARTUP", "QEMU_LD_PREFIX", FLAGS_ENV, "LD_PRELOAD")}
    return {**env, "PYTHONPATH": f"{home() / 'site-packages'}{os.pathsep}{REPO}", "PYTHONNOUSERSITE": "1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cpu", nargs="?", choices=list(CPUS))
    ap.add_argument("args", nargs=argparse.REMAINDER, help="after --: the aarch64 Python's arguments")
    ap.add_argument("--list", action="store_true", help="print the CPU models, with the features each shows, and exit")
    args = ap.parse_args()
    if reason := unavailable():
        sys.exit(f"arm64_qemu: {reason}")
    if args.list or not args.cpu:
        for cpu, what in CPUS.items():
            flags = guest_flags(cpu)
            print(f"{cpu:12} {what}\n{'':12} int8: {' '.join(f for f in ('asimddp', 'i8mm', 'sve', 'sve2') if f in flags)}")
        return
    python_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    os.execve(QEMU, command(args.cpu, *python_args), guest_env())


if __name__ == "__main__":
    main()
