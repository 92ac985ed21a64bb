"""The faiss index behind an embedding index: exact, HNSW or IVF-PQ, and its measured recall.

All kinds use inner product on L2-normalised vectors (cosine similarity).

- ``flat``: exact (``IndexFlatIP``); the default, right up to a few hundred thousand images.
- ``hnsw``: graph search (``IndexHNSWFlat``, M=32); keeps full vectors, fast queries, slower builds.
- ``ivfpq``: inverted lists + product quantisation (``IndexIVFPQ``); compact codes for very
  large collections; needs at least :data:`IVFPQ_MIN` vectors to train.

Approximate kinds report recall@10 against exact search on a sample of the indexed
vectors used as queries, stored in the index metadata.
"""

from __future__ import annotations

import math

import numpy as np

from dinoserve.errors import ConfigError

KINDS = ("flat", "hnsw", "ivfpq")
IVFPQ_MIN = 1000


def default_params(kind: str, n: int, dim: int) -> dict:
    """Parameters for ``kind`` at ``n`` vectors of ``dim`` dimensions."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 80, "efSearch": 128}
    if kind == "ivfpq":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 points per list
        m = max(d for d in range(1, 65) if dim % d == 0 and dim // d >= 4) if dim >= 4 else 1
        nbits = 8 if n >= 256 * 39 else 6
        return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, max(8, nlist // 8))}
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
        index.train(vectors)
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


def recall_at_k(index, vectors: np.ndarray, k: int = 10, sample: int = 1000, seed: int = 0) -> float:
    """Mean fraction of the exact top-``k`` that ``index`` returns, for up to ``sample`` of
    the indexed vectors used as queries."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n == 0:
        return 1.0
    k = min(k, n)
    rows = np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False)
    queries = vectors[rows]
    exact = exact_search(vectors, queries, k)[1]
    _, approx = index.search(queries, k)
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
