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


def flat_vectors(index) -> np.ndarray:
    """The ``[ntotal, d]`` float32 vectors a faiss flat index holds, as a numpy view (no copy)."""
    import faiss

    if index.ntotal == 0:
        return np.zeros((0, index.d), np.float32)
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def search(index, queries: np.ndarray, k: int, *, kind: str = "flat", params: dict | None = None,
           vectors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, rows) for each query; rows of -1 pad missing results.

    IVF-PQ scores are approximate (compressed codes): with ``vectors`` (the stored exact
    embeddings) and ``params["rerank"] = R > 1``, the ``R * k`` best candidates are re-scored
    exactly and the best ``k`` kept. Recall then depends only on the candidate list.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if kind == "flat":  # exact: one BLAS product per block, on faiss's own copy of the vectors
        return exact_search(flat_vectors(index), queries, k)
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


#: Score-matrix size, in floats, that one step of :func:`exact_search` computes (16 MB): big
#: enough for the BLAS product to run at full speed, small enough to stay in cache-friendly
#: sizes and bound memory for any number of queries.
EXACT_STEP_FLOATS = 4 * 2**20


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, block: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of each query row among ``vectors``, best first:
    ``(scores [Q, k] float32, rows [Q, k] int64)``, rows of -1 (score -inf) when there are
    fewer than ``k`` vectors.

    Why not faiss's ``IndexFlatIP.search``: it multiplies in small tiles and keeps a heap per
    query, 2-5x slower than one BLAS product here (``benchmarks/search_scaling.py``). This
    runs the queries against blocks of ``block`` rows as one matrix product each and keeps a
    running top-``k``: the first block's by ``argpartition``, later blocks only through the
    few scores above each query's current k-th best, so past the product each score is
    compared once and rarely moved.
    """
    vectors = np.asarray(vectors)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, nq = len(vectors), len(queries)
    k = int(k)
    best_s = np.full((nq, k), -np.inf, np.float32)
    best_i = np.full((nq, k), -1, np.int64)
    if n == 0 or nq == 0 or k < 1:
        return best_s, best_i
    q_step = max(1, min(nq, EXACT_STEP_FLOATS // 1024))
    for q0 in range(0, nq, q_step):
        q = queries[q0:q0 + q_step]
        rows = block or max(1024, EXACT_STEP_FLOATS // len(q))
        s, i = _exact_block_scan(vectors, q, k, rows)
        best_s[q0:q0 + len(q)], best_i[q0:q0 + len(q)] = s, i
    return best_s, best_i


def _exact_block_scan(vectors: np.ndarray, q: np.ndarray, k: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    nq, n = len(q), len(vectors)
    best_s = np.full((nq, k), -np.inf, np.float32)
    best_i = np.full((nq, k), -1, np.int64)
    # A small first block sets each query's k-th-best threshold cheaply (argpartition moves
    # every score it sees); the large blocks after it are only compared against it.
    first = min(rows, max(4 * k, 2048))
    bounds = [0, *range(first, n, rows), n] if n > first else [0, n]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        x = np.asarray(vectors[start:stop], dtype=np.float32)
        scores = q @ x.T  # the BLAS product: all the arithmetic of exact search
        threshold = best_s[:, -1:] if start else None  # each query's current k-th best
        if threshold is None or not np.isfinite(threshold).all():
            kk = min(k, scores.shape[1])
            part = np.argpartition(scores, scores.shape[1] - kk, axis=1)[:, -kk:]
            cand_s, cand_i = np.take_along_axis(scores, part, 1), part + start
        else:
            r, c = np.nonzero(scores > threshold)
            if len(r) == 0:
                continue
            # Pad each query's few candidates into one small matrix (nonzero is row-major).
            counts = np.bincount(r, minlength=nq)
            width = int(counts.max())
            pos = np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)
            cand_s = np.full((nq, width), -np.inf, np.float32)
            cand_i = np.full((nq, width), -1, np.int64)
            cand_s[r, pos], cand_i[r, pos] = scores[r, c], c + start
        all_s = np.concatenate([best_s, cand_s], axis=1)
        all_i = np.concatenate([best_i, cand_i], axis=1)
        keep = np.argsort(-all_s, axis=1, kind="stable")[:, :k]  # k + a few columns: cheap
        best_s, best_i = np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_i, keep, 1)
    best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i
