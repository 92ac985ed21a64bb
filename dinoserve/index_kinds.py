"""The faiss index behind an embedding index: exact, HNSW or IVF-PQ, and its measured recall.

All kinds use inner product on L2-normalised vectors (cosine similarity).

- ``flat``: exact (``IndexFlatIP``); the default, right up to a few hundred thousand images.
- ``hnsw``: graph search (``IndexHNSWFlat``, M=32); keeps full vectors, fast queries, slower builds.
- ``ivfpq``: inverted lists + product quantisation (``IndexIVFPQ``); compact codes for very
  large collections; needs at least :data:`IVFPQ_MIN` vectors to train. Its candidates are
  re-scored exactly from the stored embeddings (``rerank``: 10x k candidates), which lifts
  recall a lot for little time; the embeddings can stay on disk (memory-mapped).

Approximate kinds report recall@10 against exact search on a sample of the indexed
vectors used as queries, stored in the index metadata.
"""

from __future__ import annotations

import math

import numpy as np

from dinoserve.errors import ConfigError

KINDS = ("flat", "hnsw", "ivfpq")
IVFPQ_MIN = 1000
#: ``auto`` picks IVF-PQ from this many vectors on, exact ``flat`` below: where exact search
#: passes ~25 ms per query and IVF-PQ's re-ranked recall is still ~1.0
#: (benchmarks/search_scaling.py, 100k row of the README).
AUTO_IVFPQ_FROM = 100_000


def resolve(kind: str, n: int) -> str:
    """``kind``, with ``auto`` replaced by ``flat`` or ``ivfpq`` for an index of ``n`` vectors."""
    if kind == "auto":
        return "ivfpq" if n >= AUTO_IVFPQ_FROM else "flat"
    return kind


def default_params(kind: str, n: int, dim: int) -> dict:
    """Parameters for ``kind`` at ``n`` vectors of ``dim`` dimensions."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 80, "efSearch": 128}
    if kind == "ivfpq":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 points per list
        # ~8 dimensions per sub-quantizer: finer splits train much slower (faiss) for little gain.
        m = max(d for d in range(1, 65) if dim % d == 0 and dim // d >= 8) if dim >= 8 else 1
        nbits = 8 if n >= 256 * 39 else 6
        return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, max(8, nlist // 8)), "rerank": 10}
    raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")


def build(vectors: np.ndarray, kind: str = "flat", params: dict | None = None):
    """A faiss index over ``vectors`` (float32 [N, D]), rows numbered 0..N-1."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    params = {**default_params(kind, n, dim), **(params or {})}
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["efConstruction"])
    else:
        if n < IVFPQ_MIN:
            raise ConfigError(
                f"--kind ivfpq needs at least {IVFPQ_MIN} images to train its quantisers, this index has {n}; "
                "use --kind flat (exact, fast at this size)"
            )
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, int(params["nlist"]), int(params["m"]), int(params["nbits"]),
                                 faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.niter = 10  # faiss's 25 k-means rounds cost 2.5x the time for no measurable recall here
        # k-means on every vector is slow and no better past ~40 points per list (faiss's own
        # advice is 39-256); train on a fixed random sample so large builds stay predictable.
        sample = min(n, max(40 * int(params["nlist"]), 256 * 40))
        rows = np.sort(np.random.default_rng(0).choice(n, size=sample, replace=False)) if sample < n else slice(None)
        index.train(vectors[rows])
    if n:
        index.add(vectors)
    configure(index, kind, params)
    return index, params


def configure(index, kind: str, params: dict) -> None:
    """Set the search-time parameters (they are not all stored in the faiss file)."""
    if kind == "hnsw":
        index.hnsw.efSearch = int(params.get("efSearch", 128))
    elif kind == "ivfpq":
        index.nprobe = int(params.get("nprobe", 8))


def search(index, queries: np.ndarray, k: int, *, kind: str = "flat", params: dict | None = None,
           vectors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, rows) for each query; rows of -1 pad missing results.

    IVF-PQ scores are approximate (compressed codes): with ``vectors`` (the stored exact
    embeddings) and ``params["rerank"] = R > 1``, the ``R * k`` best candidates are re-scored
    exactly and the best ``k`` kept. Recall then depends only on the candidate list.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rerank = int((params or {}).get("rerank", 1)) if kind == "ivfpq" else 1
    if rerank <= 1 or vectors is None:
        return index.search(queries, k)
    _, cand = index.search(queries, min(index.ntotal, k * rerank))
    scores = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    for i, c in enumerate(cand):
        c = np.sort(c[c >= 0])  # sorted rows: forward reads when vectors is a memmap
        s = np.asarray(vectors[c], np.float32) @ queries[i]
        top = np.argsort(-s, kind="stable")[:k]
        scores[i, :len(top)], rows[i, :len(top)] = s[top], c[top]
    return scores, rows


def recall_at_k(index, vectors: np.ndarray, k: int = 10, sample: int = 1000, seed: int = 0, *,
                kind: str = "flat", params: dict | None = None) -> float:
    """Mean fraction of the exact top-``k`` that :func:`search` returns, for up to ``sample``
    of the indexed vectors used as queries."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n == 0:
        return 1.0
    k = min(k, n)
    rows = np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False)
    queries = vectors[rows]
    exact = exact_search(vectors, queries, k)[1]
    _, approx = search(index, queries, k, kind=kind, params=params, vectors=vectors)
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / (len(rows) * k)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner product with numpy, in row blocks (the reference for recall)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), block):
        scores = queries @ vectors[start:start + block].T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
        i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_s, best_i
