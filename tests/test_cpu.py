"""Which CPUs an int8 model is right on: the decision of :mod:`dinoserve.cpu`, fed with the
feature sets of real CPUs (flags as /proc/cpuinfo spells them)."""

from __future__ import annotations

import pytest

from dinoserve.cpu import (ALLOW_ENV, FLAGS_ENV, PORTABLE, VNNI_ONLY, check_int8_model, cpu_features, cpu_flags,
                           cpu_name, int8_problem, int8_scheme_of)
from dinoserve.errors import ModelError

#: Feature sets of CPUs this project has met or users run (subsets of their real flags).
ZEN2_EPYC = {"sse4_2", "avx", "avx2", "fma"}  # the AMD EPYC: AVX2, no AVX512, no VNNI
SKYLAKE_SP = {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl"}  # AVX512 before VNNI
CASCADE_LAKE = SKYLAKE_SP | {"avx512_vnni"}
ALDER_LAKE = {"avx", "avx2", "fma", "avx_vnni"}  # AVX-VNNI without AVX512
SAPPHIRE_RAPIDS = CASCADE_LAKE | {"avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"}
GENOA_EPYC = CASCADE_LAKE | {"avx512_bf16"}  # this session's CPU: VNNI, no AMX
# ARM64 servers, as /proc/cpuinfo's Features line spells them
CORTEX_A72 = {"fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "cpuid"}  # Graviton 1, Raspberry Pi 4
NEOVERSE_N1 = CORTEX_A72 | {"atomics", "asimdrdm", "lrcpc", "dcpop", "asimddp", "ssbs"}  # Graviton 2, Ampere Altra
NEOVERSE_V1 = NEOVERSE_N1 | {"sve", "i8mm", "bf16", "svei8mm"}  # Graviton 3


@pytest.mark.parametrize("flags", [ZEN2_EPYC, SKYLAKE_SP], ids=["avx2-epyc", "avx512-no-vnni"])
def test_full_range_int8_is_a_problem_without_vnni(flags):
    why = int8_problem(VNNI_ONLY, flags, "x86_64")
    assert why is not None and "avx512_vnni" in why and "saturate" in why
    assert "avx2" in why  # says what the CPU does have


@pytest.mark.parametrize("flags", [CASCADE_LAKE, ALDER_LAKE, SAPPHIRE_RAPIDS, GENOA_EPYC],
                         ids=["cascade-lake", "alder-lake", "sapphire-rapids", "genoa"])
def test_full_range_int8_is_fine_with_vnni_or_amx(flags):
    assert int8_problem(VNNI_ONLY, flags, "x86_64") is None


def test_avx_vnni_does_not_help_an_avx512_cpu_without_avx512_vnni():
    """MLAS prefers its AVX512-core kernel (saturating) over the AVX-VNNI one on such a CPU."""
    assert int8_problem(VNNI_ONLY, SKYLAKE_SP | {"avx_vnni"}, "x86_64") is not None
    assert int8_problem(VNNI_ONLY, ZEN2_EPYC | {"amx_int8"}, "x86_64") is not None  # AMX needs its tiles too


@pytest.mark.parametrize("scheme", [PORTABLE, "u8u8", ""])
def test_portable_and_float_models_are_fine_everywhere(scheme):
    for flags in (ZEN2_EPYC, SKYLAKE_SP, set()):
        assert int8_problem(scheme, flags, "x86_64") is None


def test_unknown_cpu_or_other_architecture_claims_nothing():
    assert int8_problem(VNNI_ONLY, set(), "x86_64") is None  # flags unreadable
    assert int8_problem(VNNI_ONLY, set(), "aarch64") is None
    assert int8_problem(VNNI_ONLY, {"zba", "zbb"}, "riscv64") is None


def test_every_scheme_is_fine_on_arm64():
    """With or without the dot product: the NEON kernel's int16 pair sums wrap only on a -128
    weight, which symmetric quantisation never makes (measured under qemu: tests/test_int8_arm64.py)."""
    for flags in (CORTEX_A72, NEOVERSE_N1, NEOVERSE_V1):
        for scheme in (PORTABLE, "u8u8", VNNI_ONLY):
            assert int8_problem(scheme, flags, "aarch64") is None
    check_int8_model("dino_int8", "int8", VNNI_ONLY, flags=CORTEX_A72, machine="aarch64")


def test_old_int8_cards_count_as_full_range():
    assert int8_scheme_of("int8", "") == VNNI_ONLY  # exported before the card recorded it
    assert int8_scheme_of("int8", PORTABLE) == PORTABLE
    assert int8_scheme_of("fp32", "") == ""


def test_check_refuses_in_one_line_naming_feature_and_fix(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(ModelError) as e:
        check_int8_model("dino_int8", "int8", VNNI_ONLY, flags=ZEN2_EPYC, machine="x86_64")
    msg = str(e.value)
    assert "\n" not in msg and "'dino_int8'" in msg and "avx512_vnni" in msg
    assert "--int8-scheme u8s7" in msg and ALLOW_ENV in msg
    check_int8_model("dino_int8", "int8", PORTABLE, flags=ZEN2_EPYC, machine="x86_64")
    check_int8_model("dino_int8", "int8", VNNI_ONLY, flags=GENOA_EPYC, machine="x86_64")


def test_check_warns_instead_when_allowed(monkeypatch, caplog):
    monkeypatch.setenv(ALLOW_ENV, "1")
    with caplog.at_level("WARNING", logger="dinoserve.cpu"):
        check_int8_model("dino_int8", "int8", VNNI_ONLY, flags=ZEN2_EPYC, machine="x86_64")
    assert len(caplog.records) == 1 and "avx512_vnni" in caplog.records[0].getMessage()


def test_cpu_features_reads_proc_cpuinfo_format(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 fma avx512f avx512_vnni\n")
    flags = cpu_flags(info)
    assert {"avx2", "avx512_vnni"} <= flags
    assert cpu_features(flags) == ["avx2", "fma", "avx512f", "avx512_vnni"]
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu_name(info) == "Test CPU"


def test_arm64_cpuinfo_gives_features_and_a_core_name(tmp_path):
    """Linux on ARM64 lists "Features" instead of "flags", and names no model: the core comes
    from "CPU part"."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes asimddp ssbs\n"
                    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\n"
                    "CPU revision\t: 1\n\nprocessor\t: 1\nFeatures\t: fp asimd evtstrm aes asimddp ssbs\n")
    assert "asimddp" in cpu_flags(info)
    assert cpu_features(cpu_flags(info)) == ["asimd", "asimddp"]
    assert cpu_name(info) == "Neoverse N1"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x61\nCPU part\t: 0x022\n")
    assert cpu_name(info) == "ARM64 implementer 0x61 part 0x22"  # Apple's, not in the table


def test_flags_from_the_environment_decide_for_another_cpu(monkeypatch):
    monkeypatch.setenv(FLAGS_ENV, "sse4_2 avx avx2 fma")
    assert cpu_flags() == frozenset({"sse4_2", "avx", "avx2", "fma"})
    assert int8_problem(VNNI_ONLY, cpu_flags(), "x86_64") is not None
