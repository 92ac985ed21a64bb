"""The faiss index behind an embedding index: exact, HNSW, IVF-Flat or IVF-PQ, and its measured recall.

All kinds use inner product on L2-normalised vectors (cosine similarity).

- ``flat``: exact; the default, right up to a few hundred thousand images. The vectors live
  in a faiss ``IndexFlatIP`` but are searched by :func:`exact_search` (batched BLAS products).
- ``ivfflat``: inverted lists of full vectors (``IndexIVFFlat``): only the ``nprobe`` lists
  nearest a query are scanned, with exact scores, so recall depends on ``nprobe`` alone and
  reaches 1.0 at ``nprobe = nlist``. The approximate kind for ~100k to a few million images
  (memory as ``flat``: 4 bytes per dimension).
- ``ivfsq``: inverted lists of vectors stored in 8 bits per dimension
  (``IndexIVFScalarQuantizer``), candidates re-scored exactly from the stored embeddings
  (``rerank``: 10x k): IVF-Flat's recall at each ``nprobe`` with a quarter of its memory
  (the exact vectors can stay on disk, memory-mapped), but measured slower than IVF-Flat at
  100k and 1M (decoding, and re-ranking reads scattered rows): a kind for memory, not speed.
- ``hnsw``: graph search (``IndexHNSWFlat``, M=32); keeps full vectors, fast queries, slower builds.
- ``ivfpq``: inverted lists + product quantisation (``IndexIVFPQ``); compact codes for very
  large collections; needs at least :data:`IVFPQ_MIN` vectors to train. Its candidates are
  re-scored exactly from the stored embeddings (``rerank``: 10x k candidates), which lifts
  recall a lot for little time; the embeddings can stay on disk (memory-mapped).

Approximate kinds report recall@10 against exact search, measured at build time on a
held-out sample (indexed vectors as queries, each one's own row left out of both result
lists) and stored in the index metadata. :func:`tune` sweeps the search-time parameter
(``nprobe``, ``efSearch``) to the smallest value that reaches a recall target.
"""

from __future__ import annotations

import math

import numpy as np

from dinoserve.errors import ConfigError

KINDS = ("flat", "ivfflat", "ivfsq", "hnsw", "ivfpq")
IVFPQ_MIN = 1000
#: The IVF kinds need this many vectors to train their lists.
IVF_MIN = {"ivfpq": IVFPQ_MIN, "ivfflat": 1000, "ivfsq": 1000}
#: Kinds whose scores are approximate codes, re-scored exactly from the stored embeddings.
RERANKED = ("ivfpq", "ivfsq")
#: ``auto`` picks IVF-Flat from this many vectors on, exact ``flat`` below: at 100k exact
#: search costs ~1 ms per query in batches, at 1M ten times that
#: (benchmarks/search_scaling.py).
AUTO_IVF_FROM = 100_000
#: ... and IVF-PQ from here, where IVF-Flat's full vectors pass ~6 GB at 384 dimensions.
AUTO_IVFPQ_FROM = 4_000_000
#: Recall targets are checked on this many held-out queries at build time.
RECALL_SAMPLE = 1000
#: The search-time values :func:`tune` tries, smallest (fastest) first.
NPROBE_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
EF_SEARCH_GRID = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def resolve(kind: str, n: int) -> str:
    """``kind``, with ``auto`` replaced by ``flat``, ``ivfflat`` or ``ivfpq`` for ``n`` vectors."""
    if kind == "auto":
        return "ivfpq" if n >= AUTO_IVFPQ_FROM else "ivfflat" if n >= AUTO_IVF_FROM else "flat"
    return kind


def _nlist(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 points per list


def default_params(kind: str, n: int, dim: int) -> dict:
    """Parameters for ``kind`` at ``n`` vectors of ``dim`` dimensions."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 80, "efSearch": 128}
    if kind == "ivfflat":
        nlist = _nlist(n)
        return {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 16))}
    if kind == "ivfsq":
        nlist = _nlist(n)
        return {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 16)), "rerank": 10}
    if kind == "ivfpq":
        nlist = _nlist(n)
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
        if n < IVF_MIN[kind]:
            raise ConfigError(
                f"--kind {kind} needs at least {IVF_MIN[kind]} images to train its lists, this index has {n}; "
                "use --kind flat (exact, fast at this size)"
            )
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivfflat":
            index = faiss.IndexIVFFlat(quantizer, dim, int(params["nlist"]), faiss.METRIC_INNER_PRODUCT)
        elif kind == "ivfsq":
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, int(params["nlist"]), faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, int(params["nlist"]), int(params["m"]), int(params["nbits"]),
                                     faiss.METRIC_INNER_PRODUCT)
            index.pq.cp.niter = 10  # faiss's 25 k-means rounds cost 2.5x the time for no measurable recall here
        index.cp.niter = 10  # the coarse k-means too: lists only need to be roughly balanced
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
    elif kind in ("ivfpq", "ivfflat", "ivfsq"):
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
    rerank = int((params or {}).get("rerank", 1)) if kind in RERANKED else 1
    if rerank <= 1 or vectors is None:
        return index.search(queries, k)
    _, cand = index.search(queries, min(index.ntotal, k * rerank))
    scores = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    step = 256  # queries per gather: bounds the [step, R*k, d] block of candidate vectors
    for q0 in range(0, len(queries), step):
        c = cand[q0:q0 + step]
        # Each distinct row read once, in increasing order (forward reads of a memmap).
        uniq, inv = np.unique(np.where(c >= 0, c, c.max(initial=0)), return_inverse=True)
        v = np.asarray(vectors[uniq], np.float32)[inv.reshape(c.shape)]
        s = np.einsum("qrd,qd->qr", v, queries[q0:q0 + step])
        s[c < 0] = -np.inf
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        scores[q0:q0 + step, :top.shape[1]] = np.take_along_axis(s, top, 1)
        rows[q0:q0 + step, :top.shape[1]] = np.take_along_axis(c, top, 1)
    rows[~np.isfinite(scores)] = -1
    return scores, rows


def holdout_sample(vectors: np.ndarray, k: int = 10, sample: int = RECALL_SAMPLE, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Held-out queries for recall: up to ``sample`` indexed vectors (seeded), and their exact
    top-``k`` *other* rows ``[Q, k]`` (each query's own row left out, as if it were new)."""
    n = len(vectors)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    exact = exact_search(vectors, np.asarray(vectors[rows], np.float32), min(k + 1, n))[1]
    return rows, _drop_self(exact, rows, k)


def _drop_self(found: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each row of ``found`` without its query's own index, cut to ``k`` (padded with -1)."""
    out = np.full((len(found), k), -1, np.int64)
    for j, (f, r) in enumerate(zip(found, rows)):
        f = f[(f != r) & (f >= 0)][:k]
        out[j, :len(f)] = f
    return out


def holdout_recall(index, vectors: np.ndarray, rows: np.ndarray, truth: np.ndarray, *, kind: str,
                   params: dict | None) -> float:
    """Mean fraction of ``truth`` (from :func:`holdout_sample`) that :func:`search` returns."""
    k = truth.shape[1]
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    found = _drop_self(search(index, queries, min(k + 1, index.ntotal), kind=kind, params=params,
                              vectors=vectors)[1], rows, k)
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def recall_at_k(index, vectors: np.ndarray, k: int = 10, sample: int = RECALL_SAMPLE, seed: int = 0, *,
                kind: str = "flat", params: dict | None = None) -> float:
    """recall@``k`` of :func:`search` against exact search on a held-out sample of up to
    ``sample`` indexed vectors (see :func:`holdout_sample`)."""
    vectors = np.asarray(vectors)
    if len(vectors) < 2:
        return 1.0
    rows, truth = holdout_sample(vectors, k, sample, seed)
    return holdout_recall(index, vectors, rows, truth, kind=kind, params=params)


#: Each kind's search-time parameter and the values :func:`tune` tries.
TUNABLE = {"ivfflat": ("nprobe", NPROBE_GRID), "ivfsq": ("nprobe", NPROBE_GRID), "ivfpq": ("nprobe", NPROBE_GRID),
           "hnsw": ("efSearch", EF_SEARCH_GRID)}


class RecallNotReached(ConfigError):
    """A recall target no parameter of the sweep reached; says the best found."""


def tune(index, vectors: np.ndarray, kind: str, params: dict, target: float, *, k: int = 10,
         sample: int = RECALL_SAMPLE, seed: int = 0, grid: tuple[int, ...] | None = None
         ) -> tuple[dict, float, list[dict]]:
    """The smallest value of ``kind``'s search-time parameter (``nprobe`` or ``efSearch``,
    over ``grid``) whose held-out recall@``k`` reaches ``target``: ``(params, recall, sweep)``,
    ``sweep`` listing every value tried with its recall. ``flat`` is exact: recall 1.0.

    Raises:
        RecallNotReached: no value reaches ``target``; the message names the best recall,
            its parameters and the fixes.
    """
    if not 0 < target <= 1:
        raise ConfigError(f"--recall {target}: a recall target is a fraction in (0, 1], e.g. 0.95")
    params = dict(params)
    if kind == "flat":
        return params, 1.0, []
    name, values = TUNABLE[kind]
    values = tuple(v for v in (grid or values) if kind == "hnsw" or v <= params["nlist"])
    if kind != "hnsw" and not grid and params["nlist"] not in values:
        values += (params["nlist"],)  # every list scanned: IVF-Flat's recall is then exact
    vectors = np.asarray(vectors)
    rows, truth = holdout_sample(vectors, k, sample, seed)
    sweep, best, flat_for = [], None, 0
    for v in values:
        trial = {**params, name: int(v)}
        configure(index, kind, trial)
        r = round(holdout_recall(index, vectors, rows, truth, kind=kind, params=trial), 4)
        sweep.append({name: int(v), f"recall_at_{k}": r})
        flat_for = flat_for + 1 if best is not None and r <= best[1] + 0.001 else 0
        if best is None or r > best[1]:
            best = (trial, r)
        if r >= target:
            return trial, r, sweep
        if flat_for >= 3:  # recall stopped growing (IVF-PQ's codes, a graph's reach): larger values cost only time
            break
    configure(index, kind, best[0])
    shown = {key: val for key, val in best[0].items() if key in ("nlist", "nprobe", "M", "efSearch", "m", "nbits",
                                                                  "rerank")}
    raise RecallNotReached(
        f"recall@{k} {target:g} not reached by --kind {kind}: the best found is {best[1]:.4f} with "
        f"{', '.join(f'{key}={val}' for key, val in shown.items())} ({len(rows)} held-out queries); "
        f"lower --recall, or use --kind ivfflat (recall up to 1.0) or --kind flat (exact)")


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
