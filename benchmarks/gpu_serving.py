"""GPU serving, side by side in one run: PyTorch eager, onnxruntime CUDA, TensorRT fp16, Triton.

Not run yet (it was prepared without a GPU): expect small fixes on first use. Needs an NVIDIA
GPU and an environment from ``pip install -e ".[gpu,export,dev]"`` (onnxruntime-gpu, never next to
onnxruntime). Run it as one short script, for example::

    .venv/bin/python -m benchmarks.gpu_serving --seconds 5            # ViT-S/16 and ResNet-50

For each architecture (random init, seed 0, 224 px; the graphs and kernels do not depend on
the weights) it exports fp32 and fp16 ONNX with :func:`dinoserve.export.export_onnx`
(``device="gpu"``: verified on the GPU) and measures, at batch ``--batch``:

- PyTorch eager fp32 on CUDA (the reference every ratio is to), and eager fp16 (autocast);
- onnxruntime ``cuda`` on the fp32 and fp16 graphs;
- onnxruntime ``tensorrt`` with fp16 engines on the fp32 graph (engine build excluded from
  timing; cached under ``~/.cache/dinoserve/tensorrt``);
- a real tritonserver (``dinoserve serve --device gpu`` semantics: the Python-backend runner
  on CUDA) over gRPC with one image per request at concurrency 1, 16 and 64.

The cosine of each GPU backend's embeddings to eager fp32 is recorded next to its speed.
Writes ``benchmarks/results/gpu_serving.json``; every row also states which provider ran.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import machine, percentiles, timed, timed_concurrently, write_json
from dinoserve.contract import EMBEDDING, INPUT

NAME = "gpu_serving"


def measure(call, seconds: float, images: int) -> dict:
    """Images/s and latency percentiles of ``call()`` back to back for ``seconds``."""
    call()
    call()  # warm-up (cuDNN autotuning, TensorRT engine load)
    lat, wall = timed(call, seconds)
    return {"img_per_s": len(lat) * images / wall, **percentiles(lat), "requests": len(lat)}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def triton_rows(repo: Path, image: np.ndarray, seconds: float, concurrencies: list[int]) -> list[dict]:
    import tritonclient.grpc as tg

    from dinoserve.triton import TritonServer

    rows = []
    with TritonServer(repo, models=["fp32"], device="gpu", startup_timeout=600) as server:
        provider = server.runner_providers().get("fp32", "")

        def make_call():
            client = tg.InferenceServerClient(server.grpc_url.split("://", 1)[1])
            inp = tg.InferInput(INPUT, list(image.shape), "UINT8")
            inp.set_data_from_numpy(image)
            return lambda: client.infer("fp32", [inp])

        for c in concurrencies:
            lat, wall = timed_concurrently(make_call, c, seconds)
            rows.append({"backend": "triton_grpc", "concurrency": c, "provider": provider,
                         "img_per_s": len(lat) / wall, **percentiles(lat)})
    return rows


def bench_arch(arch: str, args, work: Path) -> dict:
    import torch

    from dinoserve.export import export_onnx, sample_images
    from dinoserve.images import normalize, preprocess_batch
    from dinoserve.models import create_backbone
    from dinoserve.ort_session import open_session, session_provider

    torch.manual_seed(0)
    model = create_backbone(arch).eval()
    repo = work / arch / "model_repository"
    fp32 = export_onnx(model=model, name="fp32", repo=repo, image_size=224, device="gpu")
    fp16 = export_onnx(model=model, name="fp16", repo=repo, image_size=224, device="gpu", fp16=True)
    pool, _, _ = preprocess_batch(sample_images(16, size=256, seed=1), 224)
    batch = np.ascontiguousarray(np.resize(pool, (args.batch, 3, 224, 224)))
    x = torch.from_numpy(normalize(batch)).cuda()
    cuda_model = model.cuda()
    rows = []

    with torch.no_grad():
        reference = cuda_model(x).float().cpu().numpy()

    def eager():
        with torch.no_grad():
            cuda_model(x)
        torch.cuda.synchronize()

    def eager_fp16():
        with torch.no_grad(), torch.autocast("cuda", torch.float16):
            cuda_model(x)
        torch.cuda.synchronize()

    rows.append({"backend": "pytorch_eager_fp32", "provider": "torch cuda", **measure(eager, args.seconds, args.batch),
                 "cosine_to_eager_fp32": 1.0})
    with torch.no_grad(), torch.autocast("cuda", torch.float16):
        half = cuda_model(x).float().cpu().numpy()
    rows.append({"backend": "pytorch_eager_fp16_autocast", "provider": "torch cuda",
                 **measure(eager_fp16, args.seconds, args.batch), "cosine_to_eager_fp32": cosine(half, reference)})
    for label, path, device, trt16 in (("ort_cuda_fp32", fp32.onnx_path, "cuda", False),
                                       ("ort_cuda_fp16_graph", fp16.onnx_path, "cuda", False),
                                       ("ort_tensorrt_fp16", fp32.onnx_path, "tensorrt", True)):
        try:
            session = open_session(path, device=device, trt_fp16=trt16)
        except Exception as e:  # noqa: BLE001 - e.g. no TensorRT libraries: record why, go on
            rows.append({"backend": label, "error": str(e)})
            continue
        out = session.run([EMBEDDING], {INPUT: batch})[0]
        rows.append({"backend": label, "provider": session_provider(session),
                     **measure(lambda: session.run([EMBEDDING], {INPUT: batch}), args.seconds, args.batch),
                     "cosine_to_eager_fp32": cosine(out, reference)})
    if not args.no_triton:
        rows.extend(triton_rows(repo, batch[:1], args.seconds, [int(c) for c in args.concurrency.split(",")]))
    eager_ips = rows[0]["img_per_s"]
    for r in rows:
        if "img_per_s" in r:
            r["vs_pytorch_eager_fp32"] = r["img_per_s"] / eager_ips
        print(arch, r, flush=True)
    return {"arch": arch, "batch": args.batch, "rows": rows,
            "export_max_abs_diff": {"fp32": fp32.max_abs_diff, "fp16": fp16.max_abs_diff}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="vit_small_patch16_224,resnet50")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--no-triton", action="store_true")
    args = ap.parse_args()

    import torch

    from dinoserve.ort_session import gpu_problem

    problem = gpu_problem()
    if not torch.cuda.is_available() or problem:
        sys.exit(f"gpu_serving needs a CUDA GPU and onnxruntime-gpu: {problem or 'torch sees no CUDA device'}")
    work = Path(tempfile.mkdtemp(prefix="dinoserve-gpu-bench-"))
    results = [bench_arch(a, args, work) for a in args.archs.split(",")]
    data = {"what": "GPU serving: eager vs onnxruntime CUDA vs TensorRT fp16 vs Triton (gRPC, 1 image/request)",
            "gpu": torch.cuda.get_device_name(0), "results": results, "machine": machine(),
            "command": "python -m benchmarks.gpu_serving " + " ".join(sys.argv[1:])}
    print("wrote", write_json(NAME, data))


if __name__ == "__main__":
    main()
