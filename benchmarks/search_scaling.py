"""Search latency and recall@10 against index size: numpy matmul, faiss exact, HNSW, IVF-PQ.

Synthetic, clustered, L2-normalised vectors (ViT-S/16 width, 384-d by default): uniform
random vectors would be the unrealistic worst case for approximate search. Queries come
from the same distribution but are not in the index. Ground truth is exact top-10 by
inner product (numpy, blockwise). The faiss indexes are built by the code the index uses
(:func:`dinoserve.index_kinds.build`, same default parameters).

    .venv/bin/python benchmarks/search_scaling.py                 # 10k, 100k, 1M
    .venv/bin/python benchmarks/search_scaling.py --sizes 10000 100000 --hnsw-max 100000

Writes benchmarks/results/search_scaling.json and .png.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import machine, plot_path, write_json  # noqa: E402

from dinoserve import index_kinds  # noqa: E402


def synthetic(n: int, dim: int, seed: int, centers: np.ndarray) -> np.ndarray:
    """``n`` unit vectors around random cluster centres (noise comparable to the spread)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        block = centers[rng.integers(0, len(centers), e - s)] + 0.6 * rng.standard_normal((e - s, dim), np.float32) / np.sqrt(dim)
        out[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def numpy_search(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return index_kinds.exact_search(x, q, k)[1]


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (after one warm-up) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def run_size(n: int, dim: int, n_queries: int, k: int, hnsw_max: int, centers: np.ndarray) -> list[dict]:
    x = synthetic(n, dim, seed=1, centers=centers)
    q = synthetic(n_queries, dim, seed=2, centers=centers)
    truth = numpy_search(x, q, k)
    rows = []

    def record(method: str, build_s: float, batch_fn, single_fn, extra: dict | None = None):
        batch_s, found = timed(batch_fn, repeats=3)
        single_s, _ = timed(single_fn, repeats=10)
        row = {"n": n, "method": method, "build_s": round(build_s, 3),
               "batch_ms_per_query": round(1000 * batch_s / n_queries, 4),
               "single_query_ms": round(1000 * single_s, 4),
               "recall_at_10": round(recall(found, truth), 4), **(extra or {})}
        rows.append(row)
        print(row, flush=True)

    record("numpy matmul", 0.0, lambda: numpy_search(x, q, k), lambda: numpy_search(x, q[:1], k))
    for kind in ("flat", "hnsw", "ivfpq"):
        if kind == "hnsw" and n > hnsw_max:
            print(f"skipping hnsw at n={n} (--hnsw-max {hnsw_max})", flush=True)
            continue
        t = time.perf_counter()
        index, params = index_kinds.build(x, kind)
        build_s = time.perf_counter() - t
        name = {"flat": "faiss flat IP (exact)", "hnsw": "faiss HNSW", "ivfpq": "faiss IVF-PQ"}[kind]
        extra = {"params": params, "bytes_per_vector": _bytes_per_vector(kind, dim, params)}
        record(name, build_s, lambda: index.search(q, k)[1], lambda: index.search(q[:1], k)[1], extra)
        if kind == "ivfpq":  # what EmbeddingIndex.search does: re-score 10k candidates exactly
            def search(qq):
                return index_kinds.search(index, qq, k, kind=kind, params=params, vectors=x)[1]

            record(name + " + exact rerank", build_s, lambda: search(q), lambda: search(q[:1]), extra)
        del index
        gc.collect()
    return rows


def _bytes_per_vector(kind: str, dim: int, params: dict) -> float:
    if kind == "ivfpq":
        return params["m"] * params["nbits"] / 8 + 8  # codes + id
    if kind == "hnsw":
        return 4 * dim + 2 * params["M"] * 4  # vector + level-0 links
    return 4 * dim


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        ns = [r["n"] for r in rs]
        axes[0].plot(ns, [r["batch_ms_per_query"] for r in rs], "o-", label=method)
        axes[1].plot(ns, [r["single_query_ms"] for r in rs], "o-", label=method)
        axes[2].plot(ns, [r["recall_at_10"] for r in rs], "o-", label=method)
    for ax, title in zip(axes, ("ms per query (batch of queries)", "ms for one query", "recall@10")):
        ax.set_xscale("log")
        ax.set_xlabel("index size (vectors)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--hnsw-max", type=int, default=1_000_000, help="skip HNSW above this size (build time)")
    ap.add_argument("--name", default="search_scaling")
    args = ap.parse_args(argv)

    import faiss

    centers = np.random.default_rng(0).standard_normal((1000, args.dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rows = []
    for n in args.sizes:
        rows += run_size(n, args.dim, args.queries, 10, args.hnsw_max, centers)
    ratios = {}
    for n in args.sizes:
        by = {r["method"]: r for r in rows if r["n"] == n}
        base = by["numpy matmul"]["batch_ms_per_query"]
        ratios[str(n)] = {m: round(base / r["batch_ms_per_query"], 2) for m, r in by.items()}
    out = write_json(args.name, {
        "benchmark": "search latency and recall@10 vs index size",
        "setup": {"dim": args.dim, "queries": args.queries, "k": 10, "clusters": 1000,
                  "hnsw_max": args.hnsw_max, "hnsw_skipped_sizes": [n for n in args.sizes if n > args.hnsw_max],
                  "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
                  "note": "latency = median of repeats after a warm-up; batch = all queries in one call"},
        "machine": machine(),
        "rows": rows,
        "speedup_vs_numpy_batch": ratios,
    })
    plot(rows, plot_path(args.name))
    print(f"wrote {out} and {plot_path(args.name)}")


if __name__ == "__main__":
    main()
