"""Embedding throughput and latency on this machine, side by side in one run.

Backends, all on the same exported model and the same preprocessed uint8 images:

- PyTorch eager (float32, ``torch.no_grad``), in-process, batch ``--batch``: the reference
  every other row is a ratio to; for ViTs also eager with the attention maps
  (``pytorch_eager_attention``), the same two outputs the exported graph computes;
- onnxruntime in-process on the exported ``model.onnx`` (fp32), and on the ``--int8``
  export of the same model (static QDQ, calibrated on ``--calibration`` images, default a
  sample of openclipart's ``pool`` split, gated against fp32), batch ``--batch``;
- OpenVINO (``pip install openvino``, when importable) on the same two ONNX files: fp32
  with the f32 precision hint, the same file with OpenVINO's default precision (bf16 on
  CPUs with AMX), and the int8 file;
- a real tritonserver (:class:`dinoserve.triton.TritonServer`) serving the fp32 and the int8
  export (rows ``triton_http``/``triton_grpc`` and ``..._int8``) over HTTP and gRPC, sending
  requests of ``--request-batch`` images at concurrency 1, 4 and 16 (one client per
  thread); the server's dynamic batcher merges concurrent requests, and the mean batch
  size it actually ran is read from its metrics (``nv_inference_count / nv_inference_exec_count``).

For each: requests/s, images/s, latency p50/p95/p99 per request, and achieved GFLOP/s
(model FLOPs per image, counted by ``torch.utils.flop_counter``, times images/s) as a
fraction of this CPU's measured float32 matmul peak.

    python -m benchmarks.serving_throughput                      # resnet18 at 224
    python -m benchmarks.serving_throughput --arch vit_small_patch16_224 --seconds 8
    python -m benchmarks.serving_throughput --arch resnet50 --no-triton --rounds 5   # in-process rows only
    python -m benchmarks.serving_throughput --arch vit_small_patch16_dinov3 --no-triton --no-int8 --no-openvino
        # any DINO generation: vit_small_patch14_dinov2, vit_small_patch14_reg4_dinov2,
        # vit_small_patch16_dinov3[_qkvb], convnext_tiny (`dinoserve models dino`)

The in-process backends are measured interleaved (``--rounds`` rounds, each backend for
``--seconds / --rounds`` per round), so load from other jobs hits them alike; each ratio is
the median of the per-round ratios to PyTorch eager.

Writes ``benchmarks/results/serving_throughput[_<arch>].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from benchmarks.harness import (OPENCLIPART_CSV, machine, percentiles, plot_path, scrape_metrics, timed,
                                timed_concurrently, write_json)
from dinoserve.contract import EMBEDDING, INPUT

NAME = "serving_throughput"


def matmul_peak_gflops(seconds: float = 2.0, n: int = 2048) -> float:
    """Measured float32 matmul GFLOP/s of this CPU with torch's default threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


def flops_per_image(model, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18", help="timm architecture (random init, fixed seed)")
    ap.add_argument("--weights", default=None, help="a weight source instead of random init")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8, help="batch of the in-process backends")
    ap.add_argument("--request-batch", type=int, default=1, help="images per Triton request")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured time per configuration")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000, help="Triton dynamic batcher delay")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of every in-process backend (torch, onnxruntime, OpenVINO); 1 is robust on a "
                         "shared machine, where OpenMP barriers stall under load")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the in-process backends")
    ap.add_argument("--calibration", default=None, help="int8 calibration images [default: openclipart pool sample]")
    ap.add_argument("--calibration-images", type=int, default=128)
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--name", default=None, help="results file name [default: serving_throughput, "
                                                   "or serving_throughput_<arch> for other archs]")
    args = ap.parse_args()
    name = args.name or (NAME if args.arch == "resnet18" else f"{NAME}_{args.arch}")

    import onnxruntime as ort
    import torch

    from dinoserve.export import export_onnx, sample_images
    from dinoserve.images import normalize, preprocess_batch
    from dinoserve.models import backbone_card, create_backbone, load_backbone, forward_with_attention
    from dinoserve.triton import TritonServer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = (load_backbone(args.weights, args.arch) if args.weights else create_backbone(args.arch)).eval()
    size = args.image_size
    work = Path(tempfile.mkdtemp(prefix="dinoserve-bench-"))
    repo = work / "model_repository"
    print(f"exporting {args.arch} at {size} px ...", flush=True)
    res = export_onnx(model=model, name="bench", repo=repo, image_size=size, max_batch=64)
    cfg = repo / "bench" / "config.pbtxt"  # a longer batcher delay lets concurrent requests merge
    cfg.write_text(cfg.read_text().replace("max_queue_delay_microseconds: 500",
                                           f"max_queue_delay_microseconds: {args.max_queue_delay_us}"))

    int8 = None
    if not args.no_int8:
        calib = args.calibration or _openclipart_pool(args.calibration_images)
        print(f"exporting int8, calibrated on {calib if isinstance(calib, str) else f'{len(calib)} images'} ...",
              flush=True)
        int8 = export_onnx(model=model, name="bench_int8", repo=repo, image_size=size, max_batch=64, int8=True,
                           calibration=calib)
        print("int8 gate:", int8.int8.describe(), flush=True)

    pool, _, _ = preprocess_batch(sample_images(16, size=size + 32, seed=1), size)
    batch = np.ascontiguousarray(np.resize(pool, (args.batch, 3, size, size)))
    request = np.ascontiguousarray(pool[: args.request_batch])
    flops = flops_per_image(model, size)
    # The machine is shared: measure the peak now and again at the end, and keep the higher.
    peaks = [matmul_peak_gflops()]
    peak = peaks[0]
    print(f"{flops / 1e9:.2f} GFLOP/image (2 per multiply-add), matmul peak {peak:.1f} GFLOP/s", flush=True)

    rows: list[dict] = []

    def record(backend: str, concurrency: int, images_per_call: int, lat: list[float], wall: float,
               extra: dict | None = None) -> None:
        ips = len(lat) * images_per_call / wall
        row = {"backend": backend, "concurrency": concurrency, "images_per_request": images_per_call,
               "requests": len(lat), "req_per_s": len(lat) / wall, "img_per_s": ips, **percentiles(lat),
               "mean_ms": float((np.asarray(lat) * 1e3).mean()),
               "gflops": ips * flops / 1e9, "fraction_of_peak": ips * flops / 1e9 / peak, **(extra or {})}
        rows.append(row)
        print(f"{backend:<14} c={concurrency:<3} {ips:8.1f} img/s  p50 {row['p50_ms']:7.1f} ms  "
              f"p99 {row['p99_ms']:7.1f} ms  {row['fraction_of_peak']:.1%} of peak"
              + (f"  mean batch {row['mean_server_batch']:.2f}" if "mean_server_batch" in row else ""), flush=True)

    # -- in-process, interleaved ----------------------------------------------------------
    x = torch.from_numpy(normalize(batch))

    def eager():
        with torch.no_grad():
            model(x)

    backends: dict[str, object] = {"pytorch_eager": eager}
    if backbone_card(model).family == "vit":
        # The exported ViT graph also computes the attention maps: this row does the same work.
        def eager_attention():
            with torch.no_grad():
                forward_with_attention(model, x)

        backends["pytorch_eager_attention"] = eager_attention
    sessions = {"onnxruntime": res.onnx_path}
    if int8 is not None:
        sessions["onnxruntime_int8"] = int8.onnx_path
    for label, path in sessions.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        backends[label] = (lambda s: lambda: s.run(None, {INPUT: batch}))(sess)
    if not args.no_openvino:
        backends.update(openvino_backends(res.onnx_path, int8.onnx_path if int8 else None, batch, args.threads))
    per_round = interleaved(backends, args.rounds, args.seconds / args.rounds)
    for label, runs in per_round.items():
        lat = [t for r in runs for t in r["latencies"]]
        wall = sum(r["wall"] for r in runs)
        record(label, 1, args.batch, lat, wall)
    eager_ips = [len(r["latencies"]) / r["wall"] for r in per_round["pytorch_eager"]]
    ratios_vs_eager = {}
    for label, runs in per_round.items():
        ips = [len(r["latencies"]) / r["wall"] for r in runs]
        ratios_vs_eager[label] = float(np.median(np.array(ips) / np.array(eager_ips)))
    for r in rows:
        r["vs_pytorch_eager"] = ratios_vs_eager.get(r["backend"])
    print("ratios to PyTorch eager (median of per-round ratios):",
          {k: round(v, 2) for k, v in ratios_vs_eager.items()}, flush=True)
    del backends, per_round

    # -- Triton ----------------------------------------------------------------------------
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    def triton_call(lib, url, model_name):
        def make():
            client = lib.InferenceServerClient(url)
            inp = lib.InferInput(INPUT, list(request.shape), "UINT8")
            inp.set_data_from_numpy(request)
            out = [lib.InferRequestedOutput(EMBEDDING)]

            def call():
                r = client.infer(model_name, [inp], outputs=out)
                if r.as_numpy(EMBEDDING).shape[0] != len(request):
                    raise RuntimeError("server returned the wrong number of rows")
            return call
        return make

    concurrencies = [int(c) for c in args.concurrency.split(",")] if not args.no_triton else []
    served = {"": "bench"} if int8 is None else {"": "bench", "_int8": "bench_int8"}
    with (TritonServer(repo, models=list(served.values())) if concurrencies else nullcontext()) as server:
        protocols = [] if server is None else [("triton_http", thttp, server.http_url),
                                                ("triton_grpc", tgrpc, server.grpc_url)]
        for (suffix, model_name), (protocol, lib, url) in itertools.product(served.items(), protocols):
            for c in concurrencies:
                before = scrape_metrics(server.metrics_url, model_name)
                lat, wall = timed_concurrently(triton_call(lib, url.split("://", 1)[1], model_name), c, args.seconds)
                after = scrape_metrics(server.metrics_url, model_name)
                count = after["nv_inference_count"] - before["nv_inference_count"]
                execs = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
                queue = after["nv_inference_queue_duration_us"] - before["nv_inference_queue_duration_us"]
                reqs = after["nv_inference_request_success"] - before["nv_inference_request_success"]
                record(protocol + suffix, c, args.request_batch, lat, wall, {
                    "mean_server_batch": count / max(execs, 1),
                    "mean_queue_ms": queue / max(reqs, 1) / 1e3,
                })

    peaks.append(matmul_peak_gflops())
    peak = max(peaks)
    for r in rows:
        r["fraction_of_peak"] = r["gflops"] / peak
    print(f"matmul peak at the end {peaks[-1]:.1f} GFLOP/s; fractions use {peak:.1f}", flush=True)
    by = {(r["backend"], r["concurrency"]): r for r in rows}
    onnx_ips = by[("onnxruntime", 1)]["img_per_s"]
    ratios = {f"{b}_c{c}_vs_onnxruntime": r["img_per_s"] / onnx_ips for (b, c), r in by.items()}
    ratios["onnxruntime_vs_pytorch_eager"] = ratios_vs_eager["onnxruntime"]
    for label, v in ratios_vs_eager.items():
        ratios[f"{label}_vs_pytorch_eager"] = v
    if "onnxruntime_int8" in ratios_vs_eager:
        ratios["onnxruntime_int8_vs_onnxruntime"] = ratios_vs_eager["onnxruntime_int8"] / ratios_vs_eager["onnxruntime"]
    for ov in ("openvino_fp32", "openvino_int8"):
        base = "onnxruntime" if ov == "openvino_fp32" else "onnxruntime_int8"
        if ov in ratios_vs_eager and base in ratios_vs_eager:
            ratios[f"{ov}_vs_{base}"] = ratios_vs_eager[ov] / ratios_vs_eager[base]
    data = {
        "what": "embedding throughput/latency: PyTorch eager vs onnxruntime in-process vs Triton HTTP/gRPC",
        "model": {"arch": args.arch, "weights": args.weights or "random init (seed 0)", "image_size": size,
                  "gflop_per_image": flops / 1e9, "onnx_max_abs_diff_vs_pytorch": res.max_abs_diff},
        "int8": None if int8 is None else {"gate": int8.int8.to_dict(), "calibration": int8.calibration,
                                           "quantisation": "onnxruntime quantize_static, QDQ, uint8 activations, "
                                                           "int8 per-channel weights, MinMax"},
        "ratios_vs_pytorch_eager": ratios_vs_eager,
        "openvino": _openvino_version(),
        "in_process_batch": args.batch, "in_process_threads": args.threads, "triton_request_batch": args.request_batch,
        "triton_max_queue_delay_us": args.max_queue_delay_us, "seconds_per_config": args.seconds,
        "matmul_peak_gflops": peak, "matmul_peak_measurements": peaks, "machine": machine(), "rows": rows, "ratios": ratios,
        "command": "python -m benchmarks.serving_throughput " + " ".join(sys.argv[1:]),
    }
    path = write_json(name, data)
    plot(rows, data, plot_path(name))
    print(f"wrote {path} and {plot_path(name)}")


def interleaved(backends: dict, rounds: int, seconds: float) -> dict[str, list[dict]]:
    """Each backend for ``seconds`` per round, in turn, ``rounds`` times (after one warm-up call)."""
    for call in backends.values():
        call()
    out: dict[str, list[dict]] = {k: [] for k in backends}
    for _ in range(rounds):
        for label, call in backends.items():
            lat, wall = timed(call, seconds)
            out[label].append({"latencies": lat, "wall": wall})
    return out


def openvino_backends(fp32_path: Path, int8_path: Path | None, batch: np.ndarray, threads: int) -> dict:
    """OpenVINO on the same ONNX files: fp32 (f32 hint), its default precision, and int8."""
    try:
        import openvino as ov
    except ImportError:
        print("openvino is not installed: no OpenVINO rows (pip install openvino)", flush=True)
        return {}
    core = ov.Core()
    out = {}
    variants = [("openvino_fp32", fp32_path, {"INFERENCE_PRECISION_HINT": "f32"}),
                ("openvino_default_precision", fp32_path, {})]
    if int8_path is not None:
        variants.append(("openvino_int8", int8_path, {}))
    for label, path, config in variants:
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {**config, "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        out[label] = (lambda r: lambda: r.infer({"images": batch}))(request)
    return out


def _openvino_version() -> str | None:
    try:
        import openvino as ov

        return ov.__version__
    except ImportError:
        return None


def _openclipart_pool(n: int) -> list[str] | str:
    """``n`` images of openclipart's ``pool`` split (never the k-NN queries), else generated ones."""
    from dinoserve.filelist import read_file_list

    try:
        paths = [str(e.path) for e in read_file_list(OPENCLIPART_CSV, splits="pool") if e.path.is_file()]
    except Exception:  # noqa: BLE001 - no openclipart here: calibrate on generated pictures
        paths = []
    if not paths:
        from dinoserve.export import sample_images

        folder = Path(tempfile.mkdtemp(prefix="dinoserve-calib-"))
        for i, data in enumerate(sample_images(n, size=256, seed=7)):
            (folder / f"{i}.png").write_bytes(data)
        return str(folder)
    import random

    return sorted(random.Random(0).sample(paths, min(n, len(paths))))


def plot(rows: list[dict], data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['backend']}\nc={r['concurrency']}" for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 4.8))
    colours = ["#888" if "triton" not in r["backend"] else ("#1f77b4" if "http" in r["backend"] else "#ff7f0e")
               for r in rows]
    a1.bar(range(len(rows)), [r["img_per_s"] for r in rows], color=colours)
    a1.set_xticks(range(len(rows)), labels, fontsize=7)
    a1.set_ylabel("images / s")
    for i, r in enumerate(rows):
        a1.text(i, r["img_per_s"], f"{r['fraction_of_peak']:.0%}", ha="center", va="bottom", fontsize=7)
    a1.set_title("throughput (label: fraction of matmul peak)")
    x = np.arange(len(rows))
    for key, marker in (("p50_ms", "o"), ("p95_ms", "s"), ("p99_ms", "^")):
        a2.plot(x, [r[key] for r in rows], marker=marker, linestyle="", label=key)
    a2.set_xticks(x, labels, fontsize=7)
    a2.set_yscale("log")
    a2.set_ylabel("latency per request (ms)")
    a2.legend()
    m = data["model"]
    fig.suptitle(f"{m['arch']} @ {m['image_size']} px, in-process batch {data['in_process_batch']}, "
                 f"Triton requests of {data['triton_request_batch']} image(s); {data['machine']['cpu']}, "
                 f"{data['machine']['cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
