"""Embedding throughput and latency on this machine, side by side in one run.

Backends, all on the same exported model and the same preprocessed uint8 images:

- PyTorch eager (float32, ``torch.no_grad``), in-process, batch ``--batch``;
- onnxruntime in-process on the exported ``model.onnx``, batch ``--batch``;
- a real tritonserver (:class:`dinoserve.triton.TritonServer`) over HTTP and gRPC, sending
  requests of ``--request-batch`` images at concurrency 1, 4 and 16 (one client per
  thread); the server's dynamic batcher merges concurrent requests, and the mean batch
  size it actually ran is read from its metrics (``nv_inference_count / nv_inference_exec_count``).

For each: requests/s, images/s, latency p50/p95/p99 per request, and achieved GFLOP/s
(model FLOPs per image, counted by ``torch.utils.flop_counter``, times images/s) as a
fraction of this CPU's measured float32 matmul peak.

    python benchmarks/serving_throughput.py                      # resnet18 at 224
    python benchmarks/serving_throughput.py --arch vit_small_patch16_224 --seconds 8

Writes ``benchmarks/results/serving_throughput.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _results import machine, plot_path, scrape_metrics, write_json  # noqa: E402

NAME = "serving_throughput"


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def run_for(seconds: float, concurrency: int, make_call) -> tuple[list[float], float]:
    """Run ``call()`` from ``concurrency`` threads for ``seconds``; per-call latencies and wall time.

    ``make_call()`` is invoked once per thread (clients are per thread: tritonclient's
    HTTP client is not thread-safe).
    """
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    start_barrier = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        call = make_call()
        call()  # warm this thread's connection
        start_barrier.wait()
        while time.perf_counter() < stop_at[0]:
            t = time.perf_counter()
            call()
            latencies[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600  # set properly once every thread is warm
    start_barrier.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return [x for lat in latencies for x in lat], wall


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
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from dinoserve.export import export_onnx, sample_images
    from dinoserve.images import normalize, preprocess_batch
    from dinoserve.models import create_backbone, load_backbone
    from dinoserve.triton import TritonServer

    torch.manual_seed(0)
    model = (load_backbone(args.weights, args.arch) if args.weights else create_backbone(args.arch)).eval()
    size = args.image_size
    work = Path(tempfile.mkdtemp(prefix="dinoserve-bench-"))
    repo = work / "model_repository"
    print(f"exporting {args.arch} at {size} px ...", flush=True)
    res = export_onnx(model=model, name="bench", repo=repo, image_size=size, max_batch=64)
    cfg = repo / "bench" / "config.pbtxt"  # a longer batcher delay lets concurrent requests merge
    cfg.write_text(cfg.read_text().replace("max_queue_delay_microseconds: 500",
                                           f"max_queue_delay_microseconds: {args.max_queue_delay_us}"))

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
               "gflops": ips * flops / 1e9, "fraction_of_peak": ips * flops / 1e9 / peak, **(extra or {})}
        rows.append(row)
        print(f"{backend:<14} c={concurrency:<3} {ips:8.1f} img/s  p50 {row['p50_ms']:7.1f} ms  "
              f"p99 {row['p99_ms']:7.1f} ms  {row['fraction_of_peak']:.1%} of peak"
              + (f"  mean batch {row['mean_server_batch']:.2f}" if "mean_server_batch" in row else ""), flush=True)

    # -- in-process ---------------------------------------------------------------------
    x = torch.from_numpy(normalize(batch))

    def torch_call():
        def call():
            with torch.no_grad():
                model(x)
        return call

    record("pytorch_eager", 1, args.batch, *run_for(args.seconds, 1, torch_call))

    session = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
    record("onnxruntime", 1, args.batch, *run_for(args.seconds, 1, lambda: lambda: session.run(None, {"images": batch})))
    del session

    # -- Triton ----------------------------------------------------------------------------
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    def triton_call(lib, url):
        def make():
            client = lib.InferenceServerClient(url)
            inp = lib.InferInput("images", list(request.shape), "UINT8")
            inp.set_data_from_numpy(request)
            out = [lib.InferRequestedOutput("embedding")]

            def call():
                r = client.infer("bench", [inp], outputs=out)
                if r.as_numpy("embedding").shape[0] != len(request):
                    raise RuntimeError("server returned the wrong number of rows")
            return call
        return make

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with TritonServer(repo, models=["bench"]) as server:
        for protocol, lib, url in (("triton_http", thttp, server.http_url), ("triton_grpc", tgrpc, server.grpc_url)):
            for c in concurrencies:
                before = scrape_metrics(server.metrics_url, "bench")
                lat, wall = run_for(args.seconds, c, triton_call(lib, url.split("://", 1)[1]))
                after = scrape_metrics(server.metrics_url, "bench")
                count = after["nv_inference_count"] - before["nv_inference_count"]
                execs = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
                queue = after["nv_inference_queue_duration_us"] - before["nv_inference_queue_duration_us"]
                reqs = after["nv_inference_request_success"] - before["nv_inference_request_success"]
                record(protocol, c, args.request_batch, lat, wall, {
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
    ratios["onnxruntime_vs_pytorch_eager"] = onnx_ips / by[("pytorch_eager", 1)]["img_per_s"]
    data = {
        "what": "embedding throughput/latency: PyTorch eager vs onnxruntime in-process vs Triton HTTP/gRPC",
        "model": {"arch": args.arch, "weights": args.weights or "random init (seed 0)", "image_size": size,
                  "gflop_per_image": flops / 1e9, "onnx_max_abs_diff_vs_pytorch": res.max_abs_diff},
        "in_process_batch": args.batch, "triton_request_batch": args.request_batch,
        "triton_max_queue_delay_us": args.max_queue_delay_us, "seconds_per_config": args.seconds,
        "matmul_peak_gflops": peak, "matmul_peak_measurements": peaks, "machine": machine(), "rows": rows, "ratios": ratios,
        "command": "python benchmarks/serving_throughput.py " + " ".join(sys.argv[1:]),
    }
    path = write_json(NAME, data)
    plot(rows, data, plot_path(NAME))
    print(f"wrote {path} and {plot_path(NAME)}")


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
