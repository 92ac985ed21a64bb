"""A nearest-neighbour index of image embeddings: build, update, load, search.

>>> from dinoserve import Client
>>> from dinoserve.index import EmbeddingIndex, build_index, search, update_index
>>> client = Client()
>>> report = build_index("photos/", "photos.index", client)     # folder (recursive) or a CSV list
>>> index = EmbeddingIndex.load("photos.index")                 # checks every file's sha256 once
>>> hits = search(client, ["query.jpg"], index, k=10)             # [[Hit(path, score, rank), ...]]
>>> hits = index.search(client.embed(["query.jpg"]), k=10)       # the same, from embeddings
>>> update_index("photos.index", client)                        # embeds only new/changed files

Scores are cosine similarities (inner product of L2-normalised embeddings). The on-disk
layout and its crash safety are described in :mod:`dinoserve.index_store`; the faiss
kinds in :mod:`dinoserve.index_kinds`. A folder holds the images
:func:`dinoserve.images.walk_images` lists (the rule training uses too).

The index sits above the client: it takes any :class:`Embedder` (a
:class:`~dinoserve.client.Client` is one) and never imports :mod:`dinoserve.client`;
``Client.search`` is a shorthand for :func:`search`. No torch here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from dinoserve import index_kinds, index_store
from dinoserve.errors import ConfigError, DataError, IndexMismatchError, IndexStoreError
from dinoserve.images import IMAGE_EXTENSIONS, MAX_BYTES, l2_normalize, walk_images
from dinoserve.model_info import ModelInfo

CHUNK = 256  # files read, hashed and embedded per step (bounds memory of encoded bytes)


class Embedder(Protocol):
    """What the index needs from a model: a :class:`~dinoserve.client.Client` is one."""

    @property
    def info(self) -> ModelInfo: ...

    def embed(self, images: Any, normalize: bool = True) -> np.ndarray: ...

    def embed_detailed(self, images: Any, *, normalize: bool = True, on_error: str = "raise",
                       names: Sequence[str] | None = None) -> Any: ...


@dataclass(frozen=True)
class Hit:
    """One search result: the indexed image's path, its cosine similarity and its 1-based rank."""

    path: str
    score: float
    rank: int


@dataclass
class IndexReport:
    """What a build or update did."""

    path: str
    count: int
    embedded: int = 0
    reused: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kind: str = "flat"
    recall_at_10: float | None = None
    changed: bool = True
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["skipped"] = [{"path": p, "error": e} for p, e in self.skipped]
        return d


class EmbeddingIndex:
    """A loaded index: item table, embeddings and faiss index of one generation."""

    def __init__(self, path: Path, meta: dict, items: list[dict], embeddings: np.ndarray, faiss_index):
        self.path = Path(path)
        self.meta = meta
        self.items = items
        self.embeddings = embeddings
        self._faiss = faiss_index
        self._paths = [it["path"] for it in items]

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, verify: bool = True) -> "EmbeddingIndex":
        """Open the live generation of the index directory ``path``.

        ``mmap`` leaves ``embeddings`` on disk (memory-mapped): the faiss index holds what
        search needs, and the exact vectors are read only to re-rank IVF-PQ candidates
        and by updates. ``verify`` checks each file against the sha256 recorded at build
        (one read of the files per open); a mismatch raises
        :class:`~dinoserve.errors.IndexDamagedError`.
        """
        import faiss

        gen, meta = index_store.open_generation(Path(path), verify=verify)
        items = index_store.read_items(gen / index_store.ITEMS, meta)
        embeddings = index_store.read_embeddings(gen / index_store.EMBEDDINGS, mmap=mmap, meta=meta)
        try:
            fi = faiss.read_index(str(gen / index_store.FAISS))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
            raise index_store.damaged(gen / index_store.FAISS, f"cannot be read by faiss ({first})", meta) from None
        index_kinds.configure(fi, meta["kind"], meta.get("kind_params", {}))
        if not (len(items) == len(embeddings) == fi.ntotal == meta.get("count")):
            raise IndexStoreError(
                f"{path}: inconsistent index ({len(items)} items, {len(embeddings)} embeddings, "
                f"{fi.ntotal} in faiss, meta says {meta.get('count')}); rebuild it"
            )
        return cls(Path(path), meta, items, embeddings, fi)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        m = self.meta["model"]
        return f"EmbeddingIndex({str(self.path)!r}, {len(self)} images, model={m['name']!r}, kind={self.kind!r})"

    @property
    def paths(self) -> list[str]:
        """Indexed image paths; ``paths[i]`` is row ``i`` of ``embeddings``."""
        return self._paths

    @property
    def dim(self) -> int:
        return int(self.meta["model"]["dim"])

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def model_name(self) -> str:
        return self.meta["model"]["name"]

    def check_model(self, info: ModelInfo) -> None:
        """Raise :class:`IndexMismatchError` unless ``info``'s embeddings are comparable to ours."""
        problem = model_mismatch(self.meta, info)
        if problem:
            m = self.meta["model"]
            source = (self.meta.get("source") or {}).get("path") or "SOURCE"
            rebuild = f"`dinoserve index build {source} --out {self.path} --model {info.name}`"
            if m["name"] == info.name:  # same name, other weights or preprocessing: --model cannot help
                fix = (f"the model {info.name!r} changed since the index was built (re-exported?); "
                       f"rebuild the index with {rebuild}, or serve the model it was built with")
            else:
                fix = f"use --model {m['name']} (the model that built it), or rebuild the index with {rebuild}"
            raise IndexMismatchError(
                f"index {str(self.path)!r} was built with model {m['name']!r} ({_describe(m, self.meta['preprocessing'])}), "
                f"but the client uses {info.name!r} ({_describe(info.identity(), info.preprocessing())}): {problem}. "
                f"{fix[0].upper()}{fix[1:]}"
            )

    def search(self, query_embeddings: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` most similar indexed images for each query row, best first."""
        q = np.asarray(query_embeddings, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexMismatchError(
                f"query embeddings have shape {tuple(q.shape)}, index {str(self.path)!r} holds {self.dim}-d vectors "
                f"from model {self.model_name!r}"
            )
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        if len(q) == 0 or len(self) == 0:
            return [[] for _ in range(len(q))]
        q = np.ascontiguousarray(l2_normalize(q))
        scores, rows = index_kinds.search(self._faiss, q, min(k, len(self)), kind=self.kind,
                                          params=self.meta.get("kind_params"), vectors=self.embeddings)
        paths = self._paths
        return [[Hit(paths[r], float(s), rank) for rank, (s, r) in enumerate(
                    ((s, r) for s, r in zip(srow, rrow) if r >= 0), start=1)]
                for srow, rrow in zip(scores, rows)]

    def search_images(self, client: Embedder, images: Any, k: int = 10) -> list[list[Hit]]:
        """The ``k`` most similar indexed images for each query image, embedded with ``client``.

        Raises :class:`~dinoserve.errors.IndexMismatchError` before embedding anything if the
        client's model cannot be compared with the one that built the index.
        """
        self.check_model(client.info)
        return self.search(client.embed(images), k)


def search(client: Embedder, images: Any, index: "EmbeddingIndex | str | os.PathLike", k: int = 10) -> list[list[Hit]]:
    """The ``k`` nearest images in ``index`` (loaded, or its path) for each query image, best
    first; ``Client.search(images, index, k)`` is the same call."""
    if not isinstance(index, EmbeddingIndex):
        index = EmbeddingIndex.load(index)
    return index.search_images(client, images, k)


def model_mismatch(meta: dict, info: ModelInfo) -> str | None:
    """Why embeddings of ``info`` cannot be compared with an index's, or None."""
    m, pre = meta["model"], meta["preprocessing"]
    if int(m["dim"]) != info.embed_dim:
        return f"embedding sizes differ ({m['dim']} vs {info.embed_dim})"
    if m.get("weights_sha256") and info.weights_sha256:
        if m["weights_sha256"] != info.weights_sha256:
            return "the weights differ (sha256)"
    elif (m["name"], m.get("arch", "")) != (info.name, info.arch):
        return "the model names differ and no weights hash says they are the same"
    if (int(pre["image_size"]) != info.image_size or abs(float(pre["crop_pct"]) - info.crop_pct) > 1e-9
            or pre.get("fit", "crop") != info.fit):
        return "the preprocessing differs (image size, crop or fit)"
    return None


def _describe(model: dict, pre: dict) -> str:
    sha = (model.get("weights_sha256") or "")[:12] or "no weights hash"
    return f"{model.get('arch') or '?'}, weights {sha}, {model['dim']}-d, {pre['image_size']} px"


# --- sources ------------------------------------------------------------------------------------
def source_spec(source: str | os.PathLike, splits: Sequence[str] | None = None, root: str | os.PathLike | None = None) -> dict:
    """Describe a folder or CSV source so that an update can scan it again."""
    p = Path(source)
    if p.is_dir():
        return {"type": "folder", "path": str(p.absolute())}
    if p.is_file() and p.suffix.lower() == ".csv":
        return {"type": "csv", "path": str(p.absolute()), "splits": list(splits) if splits else None,
                "root": str(Path(root).absolute()) if root else None}
    if p.is_file():
        raise DataError(f"{source}: not a folder or a .csv file list; pass a folder of images or a CSV with a 'path' column")
    raise DataError(f"{source}: no such folder or CSV file")


def scan(spec: dict, exclude: Path | None = None) -> list[str]:
    """Absolute paths of the images a source holds now, sorted."""
    if spec["type"] == "folder":
        root = Path(spec["path"])
        if not root.is_dir():
            raise DataError(f"{root}: the indexed folder no longer exists")
        return [str(p) for p in walk_images(root.absolute(), exclude=exclude)]
    from dinoserve.filelist import read_file_list  # torch-free

    entries = read_file_list(spec["path"], splits=spec.get("splits"), root=spec.get("root"))
    return sorted({str(Path(e.path).absolute()) for e in entries})


# --- build and update ---------------------------------------------------------------------------
def build_index(source: str | os.PathLike, out: str | os.PathLike, client: Embedder, *, kind: str = "flat",
                splits: Sequence[str] | None = None, root: str | os.PathLike | None = None,
                kind_params: dict | None = None, progress: bool = True, recall: float | None = None) -> IndexReport:
    """Embed every image of ``source`` (a folder, recursive, or a CSV file list) into a new index
    at ``out``, replacing any index there atomically. Corrupt files are skipped and reported.

    ``recall``: a recall@10 target for an approximate ``kind``; its search-time parameter is
    swept (:func:`dinoserve.index_kinds.tune`) to the fastest value that reaches it on a
    held-out sample, and the target is kept for updates. A target no value reaches raises
    :class:`~dinoserve.index_kinds.RecallNotReached` (best recall and parameters in the
    message) and publishes nothing.
    """
    _check_kind(kind)
    _check_recall(recall)
    spec = source_spec(source, splits, root)
    paths = scan(spec, exclude=Path(out))
    if not paths:
        raise DataError(f"{source}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return _write(Path(out), spec, paths, client, kind, kind_params, previous=None, progress=progress, recall=recall)


def update_index(path: str | os.PathLike, client: Embedder, *, progress: bool = True) -> IndexReport:
    """Bring the index at ``path`` up to date with its source: embed new and changed files,
    drop removed ones, keep the rest. Refuses a client with another model."""
    old = EmbeddingIndex.load(path)
    old.check_model(client.info)
    paths = scan(old.meta["source"], exclude=Path(path))
    return _write(Path(path), old.meta["source"], paths, client, old.kind, old.meta.get("kind_params"),
                  previous=old, progress=progress, recall=(old.meta.get("recall") or {}).get("target"))


def _write(out: Path, spec: dict, paths: list[str], client: Embedder, kind: str, kind_params: dict | None,
           previous: EmbeddingIndex | None, progress: bool, recall: float | None = None) -> IndexReport:
    t0 = time.perf_counter()
    report = IndexReport(path=str(out), count=0, kind=kind)
    by_path = {it["path"]: i for i, it in enumerate(previous.items)} if previous else {}
    by_sha = {it["sha256"]: i for i, it in enumerate(previous.items)} if previous else {}
    rows: list[dict] = []
    vectors: list[np.ndarray] = []
    bar = _progress_bar(len(paths), progress, "update" if previous else "index")
    with index_store.Writer(out) as writer:
        for start in range(0, len(paths), CHUNK):
            chunk = paths[start:start + CHUNK]
            new_rows, new_vecs, n_emb, n_reuse, skipped = _process_chunk(chunk, client, previous, by_path, by_sha)
            writer.append_items(new_rows)
            rows += new_rows
            vectors += new_vecs
            report.embedded += n_emb
            report.reused += n_reuse
            report.skipped += skipped
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if not rows:
            raise DataError(f"{spec['path']}: none of the {len(paths)} image files could be read; "
                            f"first error: {report.skipped[0][1] if report.skipped else '?'}")
        emb = np.stack(vectors).astype(np.float32, copy=False)
        report.count = len(rows)
        if previous is not None:
            kept = {r["path"] for r in rows}
            report.removed = sum(1 for p in previous.paths if p not in kept)
            report.changed = rows != previous.items or report.skipped != _skipped_of(previous)
            if not report.changed:
                report.recall_at_10 = previous.meta.get("recall_at_10")
                report.seconds = time.perf_counter() - t0
                return report  # nothing new: keep the live generation as it is
        _publish(writer, client.info, spec, emb, kind, kind_params, report, previous, recall)
    report.seconds = time.perf_counter() - t0
    return report


def build_index_from_embeddings(out: str | os.PathLike, spec: dict, info: ModelInfo, rows: list[dict],
                                embeddings: np.ndarray, skipped: Sequence[tuple[str, str]] = (), *,
                                kind: str = "flat", kind_params: dict | None = None,
                                recall: float | None = None) -> IndexReport:
    """Publish an index at ``out`` from rows and embeddings computed elsewhere (e.g. the shards
    of :mod:`dinoserve.ray_engine`), exactly as :func:`build_index` would have written them.

    ``rows`` are item-table rows (:func:`read_item`), ``embeddings`` their L2-normalised
    float32 vectors from the model ``info`` describes, ``spec`` the :func:`source_spec` they
    came from and ``skipped`` the ``(path, message)`` of files left out.
    """
    t0 = time.perf_counter()
    _check_kind(kind)
    _check_recall(recall)
    if len(rows) != len(embeddings):
        raise ConfigError(f"{len(rows)} item rows but {len(embeddings)} embeddings")
    report = IndexReport(path=str(out), count=len(rows), embedded=len(rows), skipped=list(skipped), kind=kind)
    if not rows:
        raise DataError(f"{spec['path']}: none of the image files could be read; "
                        f"first error: {report.skipped[0][1] if report.skipped else '?'}")
    with index_store.Writer(Path(out)) as writer:
        writer.append_items(rows)
        _publish(writer, info, spec, np.asarray(embeddings, np.float32), kind, kind_params, report, None, recall)
    report.seconds = time.perf_counter() - t0
    return report


def _check_kind(kind: str) -> None:
    if kind not in index_kinds.KINDS + ("auto",):
        raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(index_kinds.KINDS)} or auto")


def _check_recall(recall: float | None) -> None:
    if recall is not None and not 0 < recall <= 1:
        raise ConfigError(f"--recall {recall}: a recall target is a fraction in (0, 1], e.g. 0.95")


def _publish(writer: index_store.Writer, info: ModelInfo, spec: dict, emb: np.ndarray, kind: str,
             kind_params: dict | None, report: IndexReport, previous: EmbeddingIndex | None,
             recall: float | None = None) -> None:
    """Build the faiss index over ``emb``, measure its recall (tuning it to ``recall`` when
    given) on a held-out sample and publish the generation."""
    kind = report.kind = index_kinds.resolve(kind, len(emb))
    fi, params = index_kinds.build(emb, kind, kind_params)
    sweep: list[dict] = []
    if kind != "flat":
        if recall is not None:
            params, measured, sweep = index_kinds.tune(fi, emb, kind, params, recall)
        else:
            measured = index_kinds.recall_at_k(fi, emb, k=10, kind=kind, params=params)
        report.recall_at_10 = round(measured, 4)
    meta = _meta(info, spec, kind, params, report, previous)
    meta["recall"] = {"target": recall, "at_10": 1.0 if kind == "flat" else report.recall_at_10,
                      "queries": 0 if kind == "flat" else min(len(emb), index_kinds.RECALL_SAMPLE),
                      "method": "exact" if kind == "flat" else
                      "held out: indexed vectors as queries, each one's own row left out of both lists",
                      "sweep": sweep}
    writer.publish(meta, emb, fi)


def _process_chunk(chunk: list[str], client: Embedder, previous: EmbeddingIndex | None,
                   by_path: dict, by_sha: dict):
    """Rows and vectors for one chunk of paths, in path order; only unknown content is embedded."""
    slots: list[tuple[dict, np.ndarray | None]] = []
    to_embed, to_embed_slot, names, skipped = [], [], [], []
    n_reuse = n_emb = 0
    for p in chunk:
        try:
            st = os.stat(p)
            old = by_path.get(p)
            if previous is not None and old is not None:
                it = previous.items[old]
                if it["size"] == st.st_size and it["mtime_ns"] == st.st_mtime_ns:
                    slots.append((dict(it), previous.embeddings[old]))
                    n_reuse += 1
                    continue
            row, data = read_item(p, st)
        except OSError as e:
            skipped.append((p, unreadable(p, e)))
            continue
        same = by_sha.get(row["sha256"])
        if previous is not None and same is not None:
            slots.append((row, previous.embeddings[same]))  # same content as an indexed file
            n_reuse += 1
            continue
        slots.append((row, None))
        to_embed_slot.append(len(slots) - 1)
        to_embed.append(data)
        names.append(p)
    if to_embed:
        res = client.embed_detailed(to_embed, names=names, on_error="skip")
        n_emb = len(res.kept)
        for j, pos in enumerate(res.kept):
            slots[to_embed_slot[pos]] = (slots[to_embed_slot[pos]][0], res.vectors[j])
        for pos, msg in res.skipped:
            skipped.append((names[pos], msg))
    rows = [r for r, v in slots if v is not None]
    vecs = [np.asarray(v, np.float32) for r, v in slots if v is not None]
    order = {p: i for i, p in enumerate(chunk)}
    skipped.sort(key=lambda s: order[s[0]])  # file order, unreadable and undecodable alike (any engine)
    return rows, vecs, n_emb, n_reuse, skipped


def read_item(path: str, st: os.stat_result | None = None) -> tuple[dict, bytes]:
    """The item-table row of the image file ``path`` (path, size, mtime_ns, sha256) and its bytes.

    Raises ``OSError`` when it cannot be read (also for a file over
    :data:`~dinoserve.images.MAX_BYTES`); :func:`unreadable` words the message. Every
    engine that fills an index reads files through here, so rows and messages agree.
    """
    st = st if st is not None else os.stat(path)
    if st.st_size > MAX_BYTES:
        raise OSError(f"file is {st.st_size / 2**20:.0f} MiB, over the {MAX_BYTES // 2**20} MiB limit")
    with open(path, "rb") as f:
        data = f.read()
    row = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hashlib.sha256(data).hexdigest()}
    return row, data


def unreadable(path: str, error: OSError) -> str:
    """The skip message of a file that :func:`read_item` could not read."""
    return f"{path}: cannot read ({error.strerror or error})"


def _skipped_of(index: EmbeddingIndex) -> list[tuple[str, str]]:
    return [(s["path"], s["error"]) for s in index.meta.get("skipped", [])]


def _meta(info: ModelInfo, spec: dict, kind: str, params: dict, report: IndexReport,
          previous: EmbeddingIndex | None) -> dict:
    from dinoserve import __version__

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {
        "model": info.identity(),
        "model_version": info.version,
        "preprocessing": info.preprocessing(),
        "kind": kind,
        "kind_params": params,
        "metric": "inner_product",
        "normalized": True,
        "count": report.count,
        "source": spec,
        "created_at": previous.meta["created_at"] if previous else now,
        "updated_at": now,
        "skipped": [{"path": p, "error": e} for p, e in report.skipped],
        "recall_at_10": report.recall_at_10,
        "dinoserve_version": __version__,
    }


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def load_index(path: str | os.PathLike) -> EmbeddingIndex:
    """Shorthand for :meth:`EmbeddingIndex.load`."""
    return EmbeddingIndex.load(path)


__all__: Iterable[str] = ["Embedder", "Hit", "IndexReport", "EmbeddingIndex", "build_index", "update_index",
                          "build_index_from_embeddings", "load_index", "search", "read_item", "unreadable"]
