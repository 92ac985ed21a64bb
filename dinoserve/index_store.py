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
      .CURRENT.<x>.tmp     a new CURRENT being written (or debris of a killed writer)
      .lock                flock held by the one writer at a time

Publishing, in order (the names are the :data:`PHASES` a test can stop a writer at):

1. ``staging``: item rows stream into ``.staging-*`` as images are embedded;
2. ``written``: embeddings, faiss index and ``meta.json`` (with the size and sha256 of each
   data file) are written and fsynced;
3. ``renamed``: the staging directory is renamed to the next ``gen-N``;
4. ``current-tmp``: the new ``CURRENT`` is written to a temp file;
5. ``published``: ``os.replace`` puts it in place (atomic): from here readers see ``gen-N``;
   then generations other than this one and the one it replaced are removed.

A writer killed at any instant leaves ``CURRENT`` naming a whole, published generation (or
no ``CURRENT`` at all, if nothing was ever published): readers never see the debris. The
next writer, holding the lock, removes it on its own: staging directories, temp
``CURRENT`` files and generations newer than the live one (renamed but never published).
Pruning keeps exactly the live generation and the one it replaced, never by age alone.

Every open verifies each data file against the size and sha256 in ``meta.json`` (once per
open, not per query), so flipped bytes or a truncated file give
:class:`~dinoserve.errors.IndexDamagedError` ("rebuild it"), never wrong neighbours.
``embeddings.npy`` is the source of truth: an update rebuilds the faiss index from it
without re-embedding unchanged images (IVF-PQ codes alone cannot be updated exactly).

Fault injection: with ``DINOSERVE_INDEX_KILL_AT=<phase>`` in its environment a writer
SIGKILLs itself on reaching that phase, as a power cut or the OOM killer would. Tests and
the reliability benchmark use it to kill real builds at each phase without racing them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dinoserve.atomic import atomic_write, fsync_path, try_lock
from dinoserve.errors import ConfigError, IndexDamagedError, IndexStoreError

FORMAT = "dinoserve-index"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
META, ITEMS, EMBEDDINGS, FAISS = "meta.json", "items.jsonl", "embeddings.npy", "index.faiss"
_GEN = re.compile(r"^gen-(\d{6,})$")
_STAGING = re.compile(r"^\.staging-(\d+)-[0-9a-f]+$")
_CURRENT_TMP = re.compile(r"^\.CURRENT\..+\.tmp$")
LOCK = ".lock"
#: Files of a generation whose size and sha256 ``meta.json`` records and every open checks.
CHECKED_FILES = (ITEMS, EMBEDDINGS, FAISS)

#: The steps of publishing a generation, in order (see the module docstring).
PHASES = ("staging", "written", "renamed", "current-tmp", "published")
KILL_AT_ENV = "DINOSERVE_INDEX_KILL_AT"


def _reached(phase: str) -> None:
    """Fault injection: SIGKILL this process at ``phase`` when ``DINOSERVE_INDEX_KILL_AT`` names it."""
    if os.environ.get(KILL_AT_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_is_valid() -> None:
    wanted = os.environ.get(KILL_AT_ENV)
    if wanted and wanted not in PHASES:
        raise ConfigError(f"{KILL_AT_ENV}={wanted!r} is not a publishing phase; use one of {', '.join(PHASES)}")


def live_name(root: Path) -> str | None:
    """The generation ``CURRENT`` names when it names an existing one, else None."""
    try:
        name = (Path(root) / CURRENT).read_text().strip()
    except (OSError, UnicodeDecodeError):  # missing, or not text: nothing is published
        return None
    return name if _GEN.match(name) and (Path(root) / name).is_dir() else None


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


def damaged(path: Path, problem: str, meta: dict | None = None) -> IndexDamagedError:
    """The error for a damaged index file, with the command that rebuilds the index."""
    path = Path(path)
    root = path.parent.parent if _GEN.match(path.parent.name) else path.parent
    source = ((meta or {}).get("source") or {}).get("path") or "SOURCE"
    return IndexDamagedError(
        f"index {str(root)!r} is damaged: {path.parent.name}/{path.name} {problem}; "
        f"rebuild it with `dinoserve index build {source} --out {root}`"
    )


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise damaged(path, f"cannot be read ({e})") from None


def read_items(path: Path, meta: dict | None = None) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise damaged(path, f"cannot be read ({e})", meta) from None


def read_embeddings(path: Path, mmap: bool = False, meta: dict | None = None) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # a 0-byte .npy raises EOFError
        raise damaged(path, f"cannot be read ({e or 'empty file'})", meta) from None


def file_record(path: Path) -> dict:
    """Size and sha256 of a file, as ``meta.json`` records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def verify_generation(gen: Path, meta: dict) -> None:
    """Check every data file of ``gen`` against the size and sha256 ``meta`` recorded at build.

    Indexes written before checksums existed (no ``files`` in meta) are not checked.
    """
    for name, want in (meta.get("files") or {}).items():
        path = Path(gen) / name
        try:
            size = path.stat().st_size
        except OSError as e:
            raise damaged(path, f"is missing ({e.strerror or e})", meta) from None
        if size != want["bytes"]:
            raise damaged(path, f"has {size} bytes, {want['bytes']} were written", meta)
        if file_record(path)["sha256"] != want["sha256"]:
            raise damaged(path, "does not match the sha256 recorded when it was written (changed bytes)", meta)


def open_generation(root: Path, verify: bool = True) -> tuple[Path, dict]:
    """The live generation of ``root`` and its meta, format-checked and (``verify``) checksummed."""
    gen = current_generation(root)
    meta = read_json(gen / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        found = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else (None, None)
        raise IndexStoreError(
            f"{root}: not a dinoserve index of format version {FORMAT_VERSION} "
            f"(found {found[0]!r} v{found[1]}); rebuild it"
        )
    if verify:
        verify_generation(gen, meta)
    return gen, meta


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
        _kill_at_is_valid()
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
            foreign = sorted(p.name for p in self.root.iterdir() if not _ours(p.name))
            if not foreign:
                return
            listing = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            if (self.root / CURRENT).is_file():  # an index someone put other files into
                raise IndexStoreError(
                    f"index {str(self.root)!r} holds files that are not part of it ({listing}); "
                    "move them elsewhere, then run the command again"
                )
            raise IndexStoreError(
                f"{str(self.root)!r} exists and is not a dinoserve index (it holds {listing}); "
                "choose another --out"
            )

    def _lock(self) -> None:
        self._lock_fd = try_lock(self.root / LOCK)
        if self._lock_fd is None:
            raise IndexStoreError(
                f"another dinoserve process is writing the index {str(self.root)!r}; wait for it to finish"
            )

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _remove_stale(self) -> None:
        """Remove what killed writers left: we hold the lock, so no other writer is alive.

        Staging directories and temp CURRENT files are debris; so is every generation newer
        than the live one (renamed into place, never published), or every generation when
        none was ever published. Readers only open the generation CURRENT names.
        """
        live = live_name(self.root)
        live_number = int(_GEN.match(live).group(1)) if live else 0
        for p in self.root.iterdir():
            if _STAGING.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
            elif _CURRENT_TMP.match(p.name):
                p.unlink(missing_ok=True)
            elif (m := _GEN.match(p.name)) and int(m.group(1)) > live_number:
                shutil.rmtree(p, ignore_errors=True)

    def append_items(self, items: Iterable[dict]) -> None:
        """Stream item rows to the staging table as they are embedded."""
        for it in items:
            self._items.write(json.dumps(it, sort_keys=True) + "\n")
        self._items.flush()
        _reached("staging")

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
        files = {name: file_record(self.staging / name) for name in CHECKED_FILES}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "files": files}
        with open(self.staging / META, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(self.staging)
        _reached("written")

        previous = live_name(self.root)
        gens = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _GEN.match(p.name)))
        target = self.root / f"gen-{(gens[-1] + 1 if gens else 1):06d}"
        os.rename(self.staging, target)
        self.staging = None
        fsync_path(self.root)
        _reached("renamed")

        def write_current(f) -> None:
            f.write((target.name + "\n").encode())
            f.flush()
            _reached("current-tmp")

        atomic_write(self.root / CURRENT, write_current)
        _reached("published")
        self._prune(keep={target.name, previous})
        return target

    def _prune(self, keep: set) -> None:
        """Remove every generation but ``keep`` (the live one and the one it replaced)."""
        for p in self.root.iterdir():
            if _GEN.match(p.name) and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _ours(name: str) -> bool:
    """Whether ``name`` inside an index directory is something an index writer puts there."""
    return (name in (CURRENT, LOCK) or bool(_GEN.match(name)) or bool(_STAGING.match(name))
            or bool(_CURRENT_TMP.match(name)))
