"""`index build --engine ray` against the in-process client, and the cost model for scaling out.

In one run, on one exported backbone (default resnet18 at 224 px, random init: speed does not
depend on the weights) and a folder of generated 640x480 JPEGs:

- the cost model's two rates, each measured alone in this process:
  decode + preprocess per core (``ray_engine.decode_shard``: read, sha256, decode, resize,
  crop, on one thread) and inference per replica (``Client.embed_pixels`` on ready uint8
  batches, one onnxruntime session using every core of this machine);
- ``build_index`` (in-process Client) and ``build_index_ray`` (local Ray with ``--cpus``
  CPUs, one embedding actor) on the same folder, alternated ``--rounds`` times;
- the plan: decode cores and inference replicas that embed ``--plan-images`` images within
  each deadline, from the two rates.

    .venv/bin/python -m benchmarks.ray_engine_throughput
    .venv/bin/python -m benchmarks.ray_engine_throughput --arch vit_small_patch16_224 --images 64

Writes benchmarks/results/ray_engine_throughput.json.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.client_throughput import export, make_jpegs
from benchmarks.harness import cpu_features, machine, write_json


def rates(repo: Path, name: str, paths: list[str], batch: int) -> dict:
    """Images/s of decode + preprocess on one core, and of inference on one replica."""
    from dinoserve.client import Client
    from dinoserve.ray_engine import decode_shard

    with Client(repo=repo, model=name, batch_size=batch) as client:
        info = client.info
        t = time.perf_counter()
        pixels, rows, skipped = decode_shard(paths, info.image_size, info.crop_pct, "index")
        decode_s = time.perf_counter() - t
        client.embed_pixels(pixels[:batch])  # warm-up
        t = time.perf_counter()
        client.embed_pixels(pixels)
        infer_s = time.perf_counter() - t
    return {"decode_img_s_per_core": len(paths) / decode_s, "infer_img_s_per_replica": len(paths) / infer_s,
            "replica_cores": os.cpu_count(), "skipped": len(skipped)}


def run_inprocess(folder: Path, repo: Path, name: str, batch: int, work: Path) -> float:
    from dinoserve.client import Client
    from dinoserve.index import build_index

    out = work / "inproc.index"
    shutil.rmtree(out, ignore_errors=True)
    with Client(repo=repo, model=name, batch_size=batch) as client:
        t = time.perf_counter()
        report = build_index(folder, out, client, progress=False)
        return report.count / (time.perf_counter() - t)


def run_ray(folder: Path, repo: Path, name: str, batch: int, shard: int, actors: int, work: Path) -> float:
    from dinoserve.ray_engine import RayOptions, build_index_ray

    out = work / "ray.index"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    report = build_index_ray(folder, out, RayOptions(repo=repo, model=name, batch_size=batch, shard_size=shard,
                                                     actors=actors, progress=False))
    return report.count / (time.perf_counter() - t)


def plan(n: int, decode_rate: float, infer_rate: float, deadlines_h: list[float]) -> list[dict]:
    """Decode cores and inference replicas for ``n`` images within each deadline."""
    rows = []
    for h in deadlines_h:
        need = n / (h * 3600)  # images/s the job must sustain
        rows.append({"deadline_h": h, "img_s_needed": round(need, 1),
                     "decode_cores": math.ceil(need / decode_rate),
                     "inference_replicas": math.ceil(need / infer_rate)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--plan-images", type=int, default=100_000_000)
    ap.add_argument("--work", type=Path, default=None, help="keep the model and images here (default: a temp dir)")
    args = ap.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        work = args.work or Path(tmp)
        repo, name = work / "model_repository", f"bench_{args.arch}"
        export(args.arch, repo, name)
        folder = work / f"photos_{args.images}"
        paths = sorted(str(p) for p in folder.glob("*.jpg")) if folder.is_dir() else []
        if len(paths) != args.images:
            paths = [str(p) for p in make_jpegs(folder, args.images)]
        cost = rates(repo, name, paths, args.batch)
        print(f"decode+preprocess {cost['decode_img_s_per_core']:.1f} img/s per core, "
              f"inference {cost['infer_img_s_per_replica']:.1f} img/s per replica", flush=True)

        t = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        ray_init_s = time.perf_counter() - t
        inproc, on_ray = [], []
        try:
            for r in range(args.rounds):
                inproc.append(run_inprocess(folder, repo, name, args.batch, work))
                on_ray.append(run_ray(folder, repo, name, args.batch, args.shard_size, args.actors, work))
                print(f"round {r + 1}: in-process {inproc[-1]:.1f} img/s, ray {on_ray[-1]:.1f} img/s", flush=True)
        finally:
            ray.shutdown()

    best_in, best_ray = max(inproc), max(on_ray)
    result = {
        "machine": machine(), "cpu_features": cpu_features(), "arch": args.arch, "image_size": 224,
        "images": args.images, "jpeg": "640x480", "batch": args.batch, "shard_size": args.shard_size,
        "ray_cpus": args.cpus, "ray_actors": args.actors, "ray_version": ray.__version__,
        "ray_init_s": round(ray_init_s, 2),
        "inprocess_img_s": [round(v, 2) for v in inproc], "ray_img_s": [round(v, 2) for v in on_ray],
        "ray_vs_inprocess": round(best_ray / best_in, 3),
        "cost_model": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in cost.items()},
        "plan": plan(args.plan_images, cost["decode_img_s_per_core"], cost["infer_img_s_per_replica"],
                     [24.0, 72.0, 168.0]),
        "plan_images": args.plan_images,
    }
    print(f"ray / in-process: {result['ray_vs_inprocess']:.2f}x (best of {args.rounds})")
    for row in result["plan"]:
        print(f"{args.plan_images:,} images in {row['deadline_h']:.0f} h: {row['img_s_needed']} img/s, "
              f"{row['decode_cores']} decode cores, {row['inference_replicas']} inference replicas")
    print(write_json("ray_engine_throughput", result))


if __name__ == "__main__":
    main()
