"""A folder of embedding shards, each complete or absent: the resumable output of a long job.

A job (``dinoserve index build --engine ray``, ``dinoserve embed --engine ray``) cuts its
sorted file list into shards of ``shard_size`` files and writes each shard's item rows,
embeddings and skipped files here as soon as it is embedded::

    photos.index.shards/
      job.json          model identity, preprocessing, mode and normalisation of every shard
      .lock             flock held by the one job writing here
      shard-000000/     items.jsonl, embeddings.npy, shard.json (count, key, skipped files)
      shard-000001/
      .tmp-shard-...    a shard being written (or debris of a killed job, removed on open)

A shard is written into a temp folder, fsynced, and renamed into place whole, so a crash or
Ctrl-C leaves only complete shards. A rerun skips a shard whose ``key`` (the sha256 of its
files' paths, sizes and modification times) still matches, so files changed since are
embedded again. A folder whose ``job.json`` names another model (weights, size or crop) is
refused, as :meth:`dinoserve.index.EmbeddingIndex.check_model` refuses a mismatched index.
No torch, no Ray here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from dinoserve.atomic import atomic_write_text, fsync_path, try_lock
from dinoserve.errors import IndexMismatchError, IndexStoreError
from dinoserve.model_info import ModelInfo

JOB, ITEMS, EMBEDDINGS, SHARD = "job.json", "items.jsonl", "embeddings.npy", "shard.json"
LOCK = ".lock"
_SHARD = re.compile(r"^shard-(\d{6,})$")
_TMP = re.compile(r"^\.tmp-shard-")


def plan(paths: Sequence[str], shard_size: int) -> list[list[str]]:
    """``paths`` cut into consecutive shards of ``shard_size`` (the last may be shorter)."""
    if shard_size < 1:
        raise IndexStoreError(f"shard size must be at least 1, got {shard_size}")
    return [list(paths[i:i + shard_size]) for i in range(0, len(paths), shard_size)]


def shard_key(paths: Sequence[str]) -> str:
    """What a finished shard must match to be reused: its files' paths, sizes and mtimes."""
    digest = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # unreadable now: it is skipped, and embedded if it comes back
            digest.update(f"{p}\0-\0-\n".encode())
    return digest.hexdigest()


def job_record(info: ModelInfo, mode: str, normalize: bool) -> dict:
    """The ``job.json`` of shards embedded by the model ``info`` describes."""
    return {"format": "dinoserve-shards", "format_version": 1, "model": info.identity(),
            "preprocessing": info.preprocessing(), "mode": mode, "normalize": bool(normalize)}


class ShardStore:
    """The one writer of a shard folder: open it with :meth:`__enter__`, then read and write shards.

    Args:
        root: the folder (created if missing).
        job: :func:`job_record` of this job; a folder holding another job's shards is refused.
        info: the job's model, for the mismatch message.
    """

    def __init__(self, root: str | os.PathLike, job: dict, info: ModelInfo):
        self.root = Path(root)
        self.job = job
        self.info = info
        self._lock_fd: int | None = None

    def __enter__(self) -> "ShardStore":
        if self.root.exists() and not self.root.is_dir():
            raise IndexStoreError(f"{str(self.root)!r} is a file; choose another folder for the shards")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._check_job()
            for p in self.root.iterdir():
                if _TMP.match(p.name):  # a shard a killed job was writing: never renamed, never used
                    shutil.rmtree(p, ignore_errors=True)
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._unlock()

    def _lock(self) -> None:
        self._lock_fd = try_lock(self.root / LOCK)
        if self._lock_fd is None:
            raise IndexStoreError(f"another dinoserve job is writing the shards in {str(self.root)!r}; "
                                  "wait for it to finish")

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_job(self) -> None:
        from dinoserve.index import model_mismatch  # the index's own fingerprint rule

        path = self.root / JOB
        if not path.exists():
            foreign = sorted(p.name for p in self.root.iterdir() if p.name != LOCK)
            if foreign:
                raise IndexStoreError(f"{str(self.root)!r} is not a dinoserve shard folder (it holds "
                                      f"{', '.join(foreign[:5])}); choose another folder for the shards")
            atomic_write_text(path, json.dumps(self.job, indent=2, sort_keys=True))
            return
        try:
            old = json.loads(path.read_text())
            problem = model_mismatch(old, self.info)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IndexStoreError(f"{path}: unreadable ({e}); remove {str(self.root)!r} and run again") from None
        if problem is None and (old.get("mode"), old.get("normalize")) != (self.job["mode"], self.job["normalize"]):
            problem = (f"they were written as {old.get('mode')!r} shards (normalize={old.get('normalize')}), "
                       f"this job writes {self.job['mode']!r} (normalize={self.job['normalize']})")
        if problem:
            m = old["model"]
            raise IndexMismatchError(
                f"{str(self.root)!r} holds shards of model {m.get('name')!r} (weights "
                f"{(m.get('weights_sha256') or '?')[:12]}), but this job uses {self.info.name!r}: {problem}. "
                f"Remove the folder, or pass another --shards folder"
            )

    # -- shards ---------------------------------------------------------------------------------
    def path(self, i: int) -> Path:
        return self.root / f"shard-{i:06d}"

    def is_done(self, i: int, key: str) -> bool:
        """Whether shard ``i`` is written and was made from files matching ``key``."""
        try:
            return json.loads((self.path(i) / SHARD).read_text()).get("key") == key
        except (OSError, ValueError):
            return False

    def write(self, i: int, key: str, rows: list[dict], embeddings: np.ndarray,
              skipped: Sequence[tuple[str, str]]) -> Path:
        """Write shard ``i`` whole: temp folder, fsync, rename. Replaces a stale shard ``i``."""
        if len(rows) != len(embeddings):
            raise IndexStoreError(f"shard {i}: {len(rows)} rows but {len(embeddings)} embeddings")
        tmp = self.root / f".tmp-shard-{i:06d}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            with open(tmp / ITEMS, "w") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
                f.flush()
                os.fsync(f.fileno())
            with open(tmp / EMBEDDINGS, "wb") as f:
                np.save(f, np.ascontiguousarray(embeddings, np.float32))
                f.flush()
                os.fsync(f.fileno())
            record = {"index": i, "key": key, "count": len(rows),
                      "skipped": [{"path": p, "error": e} for p, e in skipped]}
            with open(tmp / SHARD, "w") as f:
                json.dump(record, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            fsync_path(tmp)
            final = self.path(i)
            if final.exists():  # stale (files changed): absent for a moment, never half-written
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_path(self.root)
        return final

    def read(self, i: int) -> tuple[list[dict], np.ndarray, list[tuple[str, str]]]:
        """Rows, embeddings and skipped files of shard ``i``."""
        d = self.path(i)
        try:
            record = json.loads((d / SHARD).read_text())
            with open(d / ITEMS) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            emb = np.load(d / EMBEDDINGS, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise IndexStoreError(f"shard {d} cannot be read ({e}); remove it and run again") from None
        if not (len(rows) == len(emb) == record.get("count")):
            raise IndexStoreError(f"shard {d} is inconsistent ({len(rows)} rows, {len(emb)} embeddings); "
                                  "remove it and run again")
        return rows, emb, [(s["path"], s["error"]) for s in record.get("skipped", [])]

    def remove_beyond(self, n: int) -> None:
        """Remove shards numbered ``n`` and up (left by an earlier plan with more shards)."""
        for p in self.root.iterdir():
            m = _SHARD.match(p.name)
            if m and int(m.group(1)) >= n:
                shutil.rmtree(p, ignore_errors=True)


__all__ = ["ShardStore", "plan", "shard_key", "job_record"]
