"""Export and serve a DINO model over ONNX's 2 GB single-file limit: memory, time, files.

DINOv2 ViT-g (1.1B parameters, 4.5 GB in fp32) and DINOv3 ViT-H+ (0.84B) keep their weights
in ``model.onnx.data`` beside ``model.onnx``. For each architecture (random init: memory
and time do not depend on the weights; no hub here), in a fresh process so its peak memory
is its own:

- ``export_onnx`` with the default layout (decided by size): seconds, peak resident memory
  (VmHWM) against the fp32 weights' bytes, the files written, verification's max difference;
- the same images embedded in-process (onnxruntime) and through a real ``tritonserver``
  (HTTP): max difference between the two, and seconds per image in each.

    .venv/bin/python -m benchmarks.export_large
    .venv/bin/python -m benchmarks.export_large --arch vit_huge_plus_patch16_dinov3 --image-size 224

Writes benchmarks/results/export_large.json (runs of other architectures already there are
kept). Needs about 3.5x the fp32 weights in free memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import RESULTS, machine, write_json

DEFAULT_ARCH = "vit_giant_patch14_reg4_dinov2"


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_export(arch: str, size: int, repo: Path, int8_images: int = 0, external_data: bool | None = None) -> dict:
    """Build ``arch``, export it into ``repo`` and say what it cost (run in a fresh process).

    With ``int8_images`` the export is int8, calibrated on that many generated photos, and
    starts from a weights file as the CLI does (so the export can free the model before
    quantising). Its gate is opened: random weights say nothing of int8's quality, so the
    measured cosine and agreement are recorded, not judged.
    """
    import torch
    from safetensors.torch import save_file

    from dinoserve.export import export_onnx, weight_bytes
    from dinoserve.models import create_backbone

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = create_backbone(arch).eval()
    built_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    fp32_bytes = weight_bytes(model)
    source: dict = {"model": model}
    int8: dict = {}
    if int8_images:
        from benchmarks.client_throughput import make_jpegs

        weights = repo.parent / "weights.safetensors"
        save_file(model.state_dict(), str(weights))
        source, model = {"weights": weights, "arch": arch}, None
        photos = repo.parent / "calibration"
        make_jpegs(photos, int8_images)
        int8 = {"int8": True, "calibration": str(photos), "min_cosine": -1.0, "min_agreement": 0.0}
    t0 = time.perf_counter()
    res = export_onnx(**source, name="large", repo=repo, image_size=size, external_data=external_data, **int8)
    export_s = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    extra = {"int8_calibration_images": int8_images, "int8_quality_random_weights": res.int8.to_dict()} if int8 else {}
    return {
        **extra, "precision": res.card.precision, "external_data_forced": bool(external_data), "arch": arch,
        "image_size": size, "parameters": params, "fp32_weight_bytes": fp32_bytes,
        "build_seconds": round(built_s, 1), "export_and_verify_seconds": round(export_s, 1),
        "peak_rss_bytes": peak, "peak_rss_over_weights": round(peak / fp32_bytes, 2),
        "files": {p.name: p.stat().st_size for p in res.files},
        "max_abs_diff_vs_pytorch": res.max_abs_diff, "sizes_checked": [list(s) for s in res.sizes_checked],
    }


def measure_serving(repo: Path, images: int) -> dict:
    """The exported model embedded in-process and through tritonserver, on the same images."""
    from dinoserve.client import Client
    from dinoserve.triton import TritonServer

    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(images)]
    local = Client(repo=repo, model="large")
    t0 = time.perf_counter()
    e_local = local.embed(batch)
    local_s = (time.perf_counter() - t0) / images
    del local  # one session at a time: each holds the weights
    with TritonServer(repo, startup_timeout=900) as server:
        remote = Client(server.http_url, model="large", timeout=600)
        t0 = time.perf_counter()
        e_remote = remote.embed(batch)
        remote_s = (time.perf_counter() - t0) / images
    return {
        "images": images, "embed_dim": int(e_local.shape[1]),
        "max_abs_diff_triton_vs_in_process": float(np.max(np.abs(e_remote - e_local))),
        "seconds_per_image_in_process": round(local_s, 2), "seconds_per_image_triton": round(remote_s, 2),
    }


def _merged(rows: list[dict]) -> list[dict]:
    """Earlier runs of other architectures (each with its own machine record), then ``rows``:
    one architecture at a time fits in memory, so the file is filled over several calls."""
    path = RESULTS / "export_large.json"
    earlier = json.loads(path.read_text()).get("runs", []) if path.is_file() else []

    def key(row: dict) -> tuple:
        return row.get("arch"), row.get("precision", "fp32"), row.get("external_data_forced", False)

    done = {key(r) for r in rows}
    return [r for r in earlier if key(r) not in done and "machine" in r] + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=[DEFAULT_ARCH])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=4, help="images embedded in-process and through Triton")
    ap.add_argument("--no-triton", action="store_true", help="measure the export only")
    ap.add_argument("--int8", type=int, default=0, metavar="N",
                    help="export int8, calibrated on N generated photos (a row of its own, precision int8)")
    ap.add_argument("--external-data", action="store_true",
                    help="weights in model.onnx.data whatever their size (to measure a smaller model the same way)")
    ap.add_argument("--export-into", help=argparse.SUPPRESS)  # the fresh process's job
    args = ap.parse_args()
    if args.export_into:
        row = measure_export(args.arch[0], args.image_size, Path(args.export_into), args.int8,
                             True if args.external_data else None)
        print(json.dumps(row), flush=True)
        return
    rows = []
    for arch in args.arch:
        with tempfile.TemporaryDirectory(prefix="dinoserve-large-") as tmp:
            repo = Path(tmp) / "model_repository"
            cmd = [sys.executable, "-m", "benchmarks.export_large", "--arch", arch, "--image-size",
                   str(args.image_size), "--export-into", str(repo), "--int8", str(args.int8),
                   *(["--external-data"] if args.external_data else [])]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode != 0:
                raise SystemExit(f"{arch}: export failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if not args.no_triton:
                row["serving"] = measure_serving(repo, args.images)
            row["machine"] = machine()
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = write_json("export_large", {"runs": _merged(rows)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
