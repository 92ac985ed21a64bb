"""On-disk layout of an embedding index, written so that a crash never breaks it.

An index ``photos.index`` is a directory::

    photos.index/
      CURRENT              one line: the name of the live generation, e.g. "gen-000003"
      gen-000003/          the live generation (read-only once published)
        meta.json          model identity, preprocessing, kind, counts, source, skipped files
        items.jsonl        one JSON object per row: path, size, mtime_ns, sha256
        embeddings.npy     float32 [N, D], L2-normalised; row i is items.jsonl line i
        index.faiss        the faiss index over those rows (flat IP, HNSW or IVF-PQ)
      gen-000002/          the previous generation, kept so a reader that opened it still works
      .staging-<pid>-<hex> a build in progress (or one that was killed; removed by the next writer)
      .lock                flock held by the one writer at a time

A writer fills a staging directory, fsyncs every file, renames it to the next ``gen-N``
and then replaces ``CURRENT`` with ``os.replace`` (atomic). Until that last step a reader
sees the previous generation, whole; a build killed at any point leaves it untouched.
``embeddings.npy`` is the source of truth: an update rebuilds the faiss index from it
without re-embedding unchanged images (IVF-PQ codes alone cannot be updated exactly).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dinoserve.atomic import atomic_write_bytes, fsync_path
from dinoserve.errors import IndexStoreError

FORMAT = "dinoserve-index"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
META, ITEMS, EMBEDDINGS, FAISS = "meta.json", "items.jsonl", "embeddings.npy", "index.faiss"
_GEN = re.compile(r"^gen-(\d{6,})$")
_STAGING = re.compile(r"^\.staging-(\d+)-[0-9a-f]+$")
KEEP_GENERATIONS = 2


def current_generation(root: Path) -> Path:
    """The live generation directory of the index at ``root``."""
    root = Path(root)
    if not root.exists():
        raise IndexStoreError(f"index {str(root)!r} does not exist; create it with `dinoserve index build DIR --out {root}`")
    if not root.is_dir():
        raise IndexStoreError(f"{str(root)!r} is a file, not a dinoserve index directory")
    pointer = root / CURRENT
    if not pointer.is_file():
        raise IndexStoreError(
            f"index {str(root)!r} has no finished build (no {CURRENT} file); run `dinoserve index build ... --out {root}`"
        )
    name = pointer.read_text().strip()
    if not _GEN.match(name) or not (root / name).is_dir():
        raise IndexStoreError(f"index {str(root)!r} is corrupt: {CURRENT} names {name!r}, which is missing; rebuild it")
    return root / name


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise IndexStoreError(f"cannot read {path}: {e}; the index is damaged, rebuild it") from None


def read_items(path: Path) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise IndexStoreError(f"cannot read {path}: {e}; the index is damaged, rebuild it") from None


def read_embeddings(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexStoreError(f"cannot read {path}: {e}; the index is damaged, rebuild it") from None


class Writer:
    """Exclusive writer of one index directory: stage a generation, then publish it.

    Use as a context manager; leaving it without :meth:`publish` removes the staging
    directory (a SIGKILL leaves it behind, and the next writer removes it).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.staging: Path | None = None
        self._lock_fd: int | None = None
        self._items = None

    def __enter__(self) -> "Writer":
        self._check_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        self._remove_stale()
        self.staging = self.root / f".staging-{os.getpid()}-{secrets.token_hex(4)}"
        self.staging.mkdir()
        self._items = open(self.staging / ITEMS, "w")
        return self

    def __exit__(self, *exc) -> None:
        if self._items is not None:
            self._items.close()
        if self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()

    def _check_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise IndexStoreError(f"{str(self.root)!r} exists and is a file; choose another --out for the index")
        if self.root.is_dir():
            foreign = [p.name for p in self.root.iterdir()
                       if p.name not in (CURRENT, ".lock") and not _GEN.match(p.name) and not _STAGING.match(p.name)]
            if foreign:
                raise IndexStoreError(
                    f"{str(self.root)!r} exists and is not a dinoserve index (it holds {', '.join(sorted(foreign)[:5])}); "
                    "choose another --out"
                )

    def _lock(self) -> None:
        import fcntl

        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise IndexStoreError(
                f"another dinoserve process is writing the index {str(self.root)!r}; wait for it to finish"
            ) from None

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _remove_stale(self) -> None:
        # We hold the lock, so no other writer is alive: every staging directory is debris.
        for p in self.root.iterdir():
            if _STAGING.match(p.name):
                shutil.rmtree(p, ignore_errors=True)

    def append_items(self, items: Iterable[dict]) -> None:
        """Stream item rows to the staging table as they are embedded."""
        for it in items:
            self._items.write(json.dumps(it, sort_keys=True) + "\n")
        self._items.flush()

    def publish(self, meta: dict, embeddings: np.ndarray, faiss_index) -> Path:
        """Write the remaining files, fsync them and make this generation the live one."""
        import faiss

        self._items.flush()
        os.fsync(self._items.fileno())
        self._items.close()
        self._items = None
        with open(self.staging / EMBEDDINGS, "wb") as f:
            np.save(f, np.ascontiguousarray(embeddings, dtype=np.float32))
            f.flush()
            os.fsync(f.fileno())
        faiss.write_index(faiss_index, str(self.staging / FAISS))
        fsync_path(self.staging / FAISS)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        with open(self.staging / META, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(self.staging)

        gens = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _GEN.match(p.name)))
        target = self.root / f"gen-{(gens[-1] + 1 if gens else 1):06d}"
        os.rename(self.staging, target)
        self.staging = None
        fsync_path(self.root)
        atomic_write_bytes(self.root / CURRENT, (target.name + "\n").encode())
        self._prune(keep=target.name)
        return target

    def _prune(self, keep: str) -> None:
        gens = sorted((p for p in self.root.iterdir() if _GEN.match(p.name)), key=lambda p: p.name)
        old = [p for p in gens if p.name != keep][: -(KEEP_GENERATIONS - 1) or None]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
