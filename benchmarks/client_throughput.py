"""Client end-to-end throughput (decode + preprocess + infer) and where the time goes.

One exported backbone (default: ViT-S/16 at 224 px, the dino_vits16 architecture, random
init: speed does not depend on the weights), a folder of generated 640x480 JPEGs, and:

- stage costs measured one after another on one thread: JPEG decode, resize + centre crop,
  inference on a ready uint8 batch (onnxruntime in-process);
- ``Client.embed(paths)`` end to end: in-process (concurrency 1 and 2) and through a real
  tritonserver over HTTP and gRPC (concurrency 1 and 4), all with the same batch size.

    .venv/bin/python -m benchmarks.client_throughput
    .venv/bin/python -m benchmarks.client_throughput --arch resnet50 --images 64

Writes benchmarks/results/client_throughput.json and .png.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import machine, plot_path, write_json
from dinoserve.contract import EMBEDDING


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` 640x480 JPEGs with shapes and noise (so decoding costs what a photo costs)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) // 4 + rng.integers(0, 192, 3, dtype=np.uint8)
        img = Image.fromarray(base.astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.integers(0, 560), rng.integers(0, 400)
            d.ellipse((int(x), int(y), int(x + rng.integers(20, 200)), int(y + rng.integers(20, 200))),
                      fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        p = folder / f"img_{i:04d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def export(arch: str, repo: Path, name: str) -> None:
    from dinoserve.export import export_onnx
    from dinoserve.models import create_backbone

    if (repo / name / "config.pbtxt").is_file():
        return
    export_onnx(model=create_backbone(arch).eval(), name=name, repo=repo)


def stage_costs(client, paths: list[Path], batch: int) -> dict:
    """Seconds per image of each stage, on one thread."""
    from dinoserve.images import load_image, resize_and_crop

    info = client.info
    t = time.perf_counter()
    decoded = [load_image(p) for p in paths]
    decode = (time.perf_counter() - t) / len(paths)
    t = time.perf_counter()
    arrays = [np.asarray(resize_and_crop(im, info.image_size, info.crop_pct)).transpose(2, 0, 1) for im in decoded]
    prep = (time.perf_counter() - t) / len(paths)
    x = np.ascontiguousarray(np.stack(arrays[:batch]))
    client._backend.infer(x, (EMBEDDING,))  # warm-up
    t = time.perf_counter()
    reps = max(1, len(paths) // batch)
    for _ in range(reps):
        client._backend.infer(x, (EMBEDDING,))
    infer = (time.perf_counter() - t) / (reps * len(x))
    return {"decode_ms": 1000 * decode, "resize_crop_ms": 1000 * prep, "infer_ms": 1000 * infer,
            "sum_ms": 1000 * (decode + prep + infer)}


def end_to_end(url, repo: Path, name: str, paths: list[Path], batch: int, concurrency: int) -> dict:
    from dinoserve.client import Client

    with Client(url, model=name, repo=repo, batch_size=batch, concurrency=concurrency) as c:
        c.embed(paths[:batch])  # warm-up (sessions, connections, server instances)
        c.stats.__init__()
        t = time.perf_counter()
        out = c.embed(paths)
        wall = time.perf_counter() - t
        stats = c.stats.as_dict()
    assert out.shape[0] == len(paths)
    return {"backend": "in-process (onnxruntime)" if url is None else url.split(":")[0].upper() + " Triton",
            "concurrency": concurrency, "batch_size": batch, "img_per_s": len(paths) / wall,
            "wall_s": wall, "thread_s_preprocess": stats["preprocess_s"], "thread_s_infer": stats["infer_s"]}


def plot(rows: list[dict], stages: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    labels = [f"{r['backend'].replace(' (onnxruntime)', '')}\nc={r['concurrency']}" for r in rows]
    a.bar(range(len(rows)), [r["img_per_s"] for r in rows], color="tab:blue")
    a.set_xticks(range(len(rows)), labels, fontsize=8)
    a.set_ylabel("images / s (decode + preprocess + infer)")
    a.set_title(title)
    bottom = 0.0
    for key, color in (("decode_ms", "tab:orange"), ("resize_crop_ms", "tab:green"), ("infer_ms", "tab:blue")):
        b.bar([0], [stages[key]], bottom=bottom, color=color, label=key.replace("_ms", ""))
        bottom += stages[key]
    b.set_xticks([0], ["one thread"])
    b.set_ylabel("ms per image")
    b.set_title("where the time goes")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repo", type=Path, default=None, help="reuse/keep this repository (default: a temp dir)")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--name", default="client_throughput")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="dinoserve-bench-"))
    repo = args.repo or work / "model_repository"
    try:
        name = "bench"
        export(args.arch, repo, name)
        paths = make_jpegs(work / "images", args.images)
        from dinoserve.client import Client

        with Client(repo=repo, model=name) as c:
            stages = stage_costs(c, paths, args.batch_size)
        print("stages (ms/img):", {k: round(v, 2) for k, v in stages.items()}, flush=True)
        rows = []
        for conc in (1, 2):
            rows.append(end_to_end(None, repo, name, paths, args.batch_size, conc))
            print(rows[-1], flush=True)
        if not args.no_triton:
            from dinoserve.triton import TritonServer

            with TritonServer(repo, models=[name]) as server:
                for url in (server.http_url, server.grpc_url):
                    for conc in (1, 4):
                        rows.append(end_to_end(url, repo, name, paths, args.batch_size, conc))
                        print(rows[-1], flush=True)
        base = rows[0]["img_per_s"]
        for r in rows:
            r["vs_in_process_c1"] = round(r["img_per_s"] / base, 2)
        out = write_json(args.name, {
            "benchmark": "client end-to-end throughput and stage breakdown",
            "setup": {"arch": args.arch, "images": args.images, "image": "640x480 JPEG q90",
                      "batch_size": args.batch_size, "weights": "random init (speed only)"},
            "machine": machine(),
            "stages_ms_per_image_one_thread": {k: round(v, 3) for k, v in stages.items()},
            "stage_share": {k: round(stages[k] / stages["sum_ms"], 3) for k in ("decode_ms", "resize_crop_ms", "infer_ms")},
            "rows": rows,
        })
        plot(rows, stages, plot_path(args.name), f"{args.arch}, batch {args.batch_size}")
        print(f"wrote {out} and {plot_path(args.name)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
