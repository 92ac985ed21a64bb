"""int8 schemes on x86 CPUs with and without VNNI, and on ARM64: accuracy to fp32 and speed.

onnxruntime picks its int8 kernels from CPUID (HWCAP on ARM64) at start and has no setting
to choose another instruction set (``core/mlas/lib/platform.cpp``). Three ways to run another
CPU's kernels here:

* :mod:`benchmarks.isa_mask` (Linux, a CPU with ``cpuid_fault``): CPUID answers with the
  profile's features hidden, so onnxruntime runs the AVX2, AVX-VNNI, AVX512-without-VNNI or
  AVX512-VNNI kernels natively; accuracy and speed (the speed of those kernels on *this*
  core, not of the CPUs the profile stands for);
* ``qemu-x86_64 -cpu Haswell`` (user-mode emulation of an AVX2 CPU without AVX512 or VNNI,
  any x86 machine): accuracy only, emulated timings are not speed and are not recorded;
* :mod:`benchmarks.arm64_qemu`: the aarch64 wheels under ``qemu-aarch64`` as a Cortex-A72
  (no dot product), a Neoverse N1 (dot product) or ``max`` (i8mm, SVE2): accuracy only.

Three steps, one work folder:

    .venv/bin/python -m benchmarks.int8_portable prepare --work /tmp/int8w
    .venv/bin/python -m benchmarks.int8_portable measure --work /tmp/int8w --tag native --speed
    .venv/bin/python -m benchmarks.isa_mask avx512_no_vnni -- .venv/bin/python -m benchmarks.int8_portable \\
        measure --work /tmp/int8w --tag masked_avx512_no_vnni --speed
    qemu-x86_64 -cpu Haswell .venv/bin/python -m benchmarks.int8_portable measure --work /tmp/int8w \\
        --tag avx2_qemu_haswell --reference native
    .venv/bin/python -m benchmarks.arm64_qemu cortex-a72 -- -m benchmarks.int8_portable measure \\
        --work /tmp/int8w --tag arm64_qemu_cortex-a72 --reference native
    .venv/bin/python -m benchmarks.int8_portable report --work /tmp/int8w

``prepare`` exports fp32 graphs (the shipped resnet18 at 64 px; a random-init ViT-S/16 at
112 px, no hub here) and quantises each with every scheme of :mod:`dinoserve.cpu` on
seeded openclipart calibration images. ``measure`` runs the gate's comparison (mean/min
cosine to fp32, top-10 neighbour agreement) for each and, with ``--speed``, times batch 32
on one thread with fp32 and the schemes interleaved round by round. ``report`` writes
``benchmarks/results/int8_portable.json`` and ``.png``, keeping the runs that file already
holds from other CPUs (earlier sessions) for the same weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import OPENCLIPART_CSV, REPO, RESULTS, machine, median_seconds_in_turns, plot_path, write_json
from benchmarks.isa_mask import PROFILES, flags_under
from dinoserve.contract import EMBEDDING, INPUT
from dinoserve.cpu import INT8_SCHEMES, VNNI_ONLY, cpu_features, cpu_name, int8_problem

NAME = "int8_portable"
SHIPPED = REPO / "weights" / "dinoserve_resnet18_openclipart.safetensors"
#: model -> (weights or "" for random init, arch, image size, calibration images)
MODELS = {
    "resnet18_shipped_64px": (str(SHIPPED), "resnet18", 64, 200),
    # 112 px and 32 images: the AVX2 run is emulated, ~100x slower than native.
    "vit_small_patch16_224_random_112px": ("", "vit_small_patch16_224", 112, 32),
}


def prepare(work: Path) -> None:
    import torch

    from dinoserve.export import export_onnx
    from dinoserve.models import create_backbone, file_sha256, load_backbone
    from dinoserve.quantize import calibration_batch, quantize_int8

    torch.manual_seed(0)
    for key, (weights, arch, size, n_calib) in MODELS.items():
        d = work / key
        d.mkdir(parents=True, exist_ok=True)
        model = load_backbone(weights) if weights else create_backbone(arch)
        res = export_onnx(model=model, name="m", repo=d / "repo", image_size=size)
        fp32 = d / "fp32.onnx"
        fp32.write_bytes(res.onnx_path.read_bytes())
        batch, source = calibration_batch(OPENCLIPART_CSV, size, limit=n_calib)
        np.save(d / "calibration.npy", batch)
        family = "vit" if arch.startswith("vit") else "resnet"
        for scheme in INT8_SCHEMES:
            t = time.perf_counter()
            quantize_int8(fp32, d / f"{scheme}.onnx", batch, family=family, scheme=scheme)
            print(f"{key}: {scheme} quantised in {time.perf_counter() - t:.0f} s ({source})", flush=True)
        (d / "source.txt").write_text(source)
        # which model: the shipped file changes when a better one is trained
        (d / "weights.txt").write_text(f"{Path(weights).name} sha256 {file_sha256(weights)}" if weights
                                       else f"{arch}, random init (seed 0)")


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(work: Path, tag: str, speed: bool, rounds: int, batch: int, reference: str | None,
            openvino: bool = True) -> None:
    """``reference``: take the fp32 embeddings of that earlier run's tag (fp32 kernels do not
    saturate, and an emulated run saves a quarter of its time)."""
    # under benchmarks.isa_mask, cpu_features() are the profile's (it sets DINOSERVE_CPU_FLAGS)
    out = {"tag": tag, "cpu": cpu_name(), "cpu_features_proc": cpu_features(), "fp32_reference": reference or tag,
           "hidden_from_cpuid": os.environ.get("ISA_MASK_HIDE", "").split(), "models": {}}
    for key in MODELS:
        d = work / key
        calib = np.load(d / "calibration.npy")
        graphs = {"fp32": d / "fp32.onnx", **{s: d / f"{s}.onnx" for s in INT8_SCHEMES}}
        emb = {}
        for g, path in graphs.items():
            if g == "fp32" and reference:
                emb[g] = np.load(d / f"emb_{reference}_fp32.npy")
                continue
            t = time.perf_counter()
            emb[g] = _embed(_session(path, threads=2), calib)
            np.save(d / f"emb_{tag}_{g}.npy", emb[g])
            print(f"{tag} {key} {g}: embedded {len(calib)} in {time.perf_counter() - t:.0f} s", flush=True)
        row = {"images": int(len(calib)), "weights": (d / "weights.txt").read_text(),
               "calibration": (d / "source.txt").read_text(), "schemes": _gate_figures(emb)}
        if openvino:
            row["openvino_schemes"] = _openvino_figures(graphs, calib)
        if speed:
            row["speed"] = _speed(graphs, calib, rounds, batch)
        out["models"][key] = row
        print(json.dumps({key: row}), flush=True)
        (work / f"measure_{tag}.json").write_text(json.dumps(out, indent=2))  # after each model


def _openvino_figures(graphs: dict[str, Path], calib: np.ndarray) -> dict:
    """The gate's figures for each int8 scheme run by OpenVINO's CPU plugin, against OpenVINO's
    own fp32 (its oneDNN kernels are picked from CPUID like onnxruntime's); empty without it."""
    if importlib.util.find_spec("openvino") is None:
        return {}
    from dinoserve.openvino_session import OpenVINOSession

    emb, failed = {}, {}
    for g, path in graphs.items():
        try:
            emb[g] = _embed(OpenVINOSession(path, threads=2), calib)
        except RuntimeError as e:  # seen for int8 graphs under qemu as a Cortex-A72: recorded, not fatal
            failed[g] = {"error": str(e).strip().splitlines()[-1]}
    if "fp32" in failed:
        return {s: failed["fp32"] for s in INT8_SCHEMES}
    return {**_gate_figures(emb), **failed}


def _embed(session, calib: np.ndarray) -> np.ndarray:
    """``calib``'s embeddings from an onnxruntime or OpenVINO session, 16 images a run, float64."""
    return np.concatenate([session.run([EMBEDDING], {INPUT: calib[i:i + 16]})[0]
                           for i in range(0, len(calib), 16)]).astype(np.float64)


def _gate_figures(emb: dict[str, np.ndarray]) -> dict:
    """The gate figures of each int8 scheme in ``emb`` against its fp32 embeddings."""
    from dinoserve.quantize import neighbour_agreement, row_cosines

    out = {}
    for scheme in (s for s in INT8_SCHEMES if s in emb):
        cos = row_cosines(emb["fp32"], emb[scheme])
        out[scheme] = {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5),
                       "top10_agreement": round(neighbour_agreement(emb["fp32"], emb[scheme]), 4)}
    return out


def _speed(graphs: dict[str, Path], calib: np.ndarray, rounds: int, batch: int) -> dict:
    """Median seconds per batch on one thread, graphs interleaved round by round (a busy
    neighbour slows every graph of a round alike), and each int8 scheme's ratio to fp32."""
    sessions = {g: _session(p, threads=1) for g, p in graphs.items()}
    x = calib[:batch]
    # the warm-up round lets the first runs allocate and pack weights
    med = median_seconds_in_turns({g: lambda _round, s=s: s.run([EMBEDDING], {INPUT: x})
                                   for g, s in sessions.items()}, rounds, warmup=1)
    return {"batch": batch, "threads": 1, "rounds": rounds, "median_s_per_batch": {g: round(v, 4) for g, v in med.items()},
            "speedup_vs_fp32": {g: round(med["fp32"] / v, 2) for g, v in med.items() if g != "fp32"}}


def _earlier_runs(work: Path, measured: set[str]) -> dict:
    """The committed JSON's runs on other CPUs (earlier sessions, other machines) of the very
    same models, so that one file holds every CPU measured; a tag measured again replaces its
    old run, and a run of other weights (the shipped model changed) is dropped."""
    path = RESULTS / f"{NAME}.json"
    if not path.exists():
        return {}
    now = {key: (work / key / "weights.txt").read_text() for key in MODELS}
    return {tag: run for tag, run in json.loads(path.read_text()).get("runs", {}).items()
            if tag not in measured and {k: r["weights"] for k, r in run["models"].items()} == now}


def report(work: Path, gate_cosine: float = 0.99, gate_agreement: float = 0.8) -> None:
    runs = {p.stem.removeprefix("measure_"): json.loads(p.read_text()) for p in sorted(work.glob("measure_*.json"))}
    runs = {**_earlier_runs(work, set(runs)), **runs}
    verdicts: dict = {"onnxruntime": {}, "openvino": {}}
    for tag, run in runs.items():
        for key, row in run["models"].items():
            for runtime, figures in (("onnxruntime", row["schemes"]), ("openvino", row.get("openvino_schemes", {}))):
                for scheme, q in figures.items():
                    verdicts[runtime].setdefault(key, {}).setdefault(scheme, {})[tag] = (
                        "error" not in q and q["mean_cosine"] >= gate_cosine and q["top10_agreement"] >= gate_agreement)
    flags_avx2 = {"avx2", "fma"}
    out = write_json(NAME, {
        "benchmark": "int8 schemes (u8s7 = reduce_range 7-bit weights, u8u8, u8s8 full range) vs fp32: "
                     "gate figures on CPUs with and without VNNI, speed on this CPU",
        "how_other_cpus_were_measured": {
            "masked_*": "natively on this CPU under benchmarks.isa_mask: CPUID faulting hides the features in "
                        "the run's hidden_from_cpuid, so MLAS dispatches the kernels of a CPU without them; "
                        "accuracy, and the speed of those kernels on this core",
            "avx2_qemu_haswell": "the same onnxruntime under `qemu-x86_64 -cpu Haswell` (AVX2+FMA, no AVX512, "
                                 "no VNNI): MLAS dispatches on CPUID, so it runs its AVX2 int8 kernels; "
                                 "accuracy only, emulated timings are not speed",
            "arm64_qemu_*": "onnxruntime's and OpenVINO's aarch64 wheels (same versions) in an aarch64 Python under "
                            "qemu-aarch64 -cpu cortex-a72 (NEON, no dot product), neoverse-n1 (dot product) or max "
                            "(dot product, i8mm, SVE2), benchmarks/arm64_qemu.py; MLAS dispatches on HWCAP, so it "
                            "runs that CPU's int8 kernels; compared with the x86 fp32 embeddings (--reference native); "
                            "accuracy only. OpenVINO's figures there are the emulator's word, not yet a real ARM "
                            "CPU's: it could not run the int8 graphs as cortex-a72 and its fp32 as max disagrees "
                            "with every other CPU's"},
        "gate": {"min_mean_cosine": gate_cosine, "min_top10_agreement": gate_agreement},
        "machine": machine(),
        "runs": runs,
        "gate_passes": verdicts,
        "int8_problem_on_avx2": {s: int8_problem(s, flags_avx2, "x86_64") for s in INT8_SCHEMES},
        "int8_problem_by_masked_profile": {p: int8_problem(VNNI_ONLY, flags_under(p), "x86_64") for p in PROFILES},
        "earlier_avx2_report": "issue 21: u8s8 resnet18 on a 2-core AVX2 AMD EPYC, 200 openclipart images: "
                               "mean cosine 0.9821, min 0.8065 (refused); reduce_range (u8s7): 0.9998, min 0.9990, "
                               "top-10 agreement 0.976, 2.05x fp32 (batch 32, 64 px, one thread)",
    })
    _plot(runs)
    print(f"wrote {out}")


def _plot(runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(next(iter(runs.values()))["models"])
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.8))
    for ax, key in zip(np.atleast_1d(axes), keys):
        width = 0.8 / len(runs)
        for i, (tag, run) in enumerate(runs.items()):
            vals = [run["models"][key]["schemes"][s]["min_cosine"] for s in INT8_SCHEMES]
            ax.bar(np.arange(len(INT8_SCHEMES)) + i * width, vals, width, label=tag)
        ax.set_xticks(np.arange(len(INT8_SCHEMES)) + width * (len(runs) - 1) / 2, INT8_SCHEMES)
        # saturated u8s8 reaches ~0.5 on resnet18; the right ones sit above 0.99
        ax.set_ylim(0.4, 1.0)
        ax.set_title(key)
        ax.set_ylabel("min cosine to fp32 over calibration images")
    # one legend for both panels, under them, so that no bar is hidden behind it
    fig.legend(*np.atleast_1d(axes)[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(plot_path(NAME), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "measure", "report"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--tag", default="native")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reference", default=None, help="tag of an earlier run whose fp32 embeddings to compare with")
    ap.add_argument("--no-openvino", action="store_true",
                    help="onnxruntime only (OpenVINO under qemu-aarch64 takes ~10 minutes a model)")
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.work)
    elif args.step == "measure":
        measure(args.work, args.tag, args.speed, args.rounds, args.batch, args.reference, not args.no_openvino)
    else:
        report(args.work)


if __name__ == "__main__":
    main()
