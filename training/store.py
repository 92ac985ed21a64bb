"""The decoded-image store: every training image decoded once into one uint8 array.

Full-size clip art takes up to seconds to decode (PNGs of 89 megapixels), so decoding each
image every epoch made the data pipeline, not the model, the bottleneck. The store decodes
each image once with :func:`dinoserve.images.load_image` (the project's checks: bombs,
truncation, alpha on white, 16-bit, CMYK), fits it into a ``size`` square the way the
model will see it when served (``fit``: shorter side and centre crop, or white border
trimmed and padded; :func:`dinoserve.images.fit_image`), and keeps ``[N, 3, size, size]`` uint8 on disk as one ``.npy``
beside a manifest. Both augmentation pipelines crop from it: the batched tensor one
(:mod:`dinoserve.training.tensor_augment`) and the PIL reference
(:mod:`dinoserve.training.augment`).

The manifest records each source file's size and mtime; an image that changed, appeared
or vanished makes the store stale, and a stale store is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dinoserve.atomic import atomic_write, atomic_write_text
from dinoserve.images import preprocess_batch

log = logging.getLogger(__name__)

FORMAT = "dinoserve-store-1"


def default_store_dir() -> Path:
    """``$XDG_CACHE_HOME/dinoserve/stores`` (default ``~/.cache/dinoserve/stores``): shared by
    runs, so a second run on the same images and size decodes nothing."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dinoserve" / "stores"


def _fingerprint(path: Path) -> list:
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [None, None]


@dataclass
class ImageStore:
    """Decoded images ``pixels`` (uint8 ``[N, 3, size, size]``) of ``paths``, and the
    source images that could not be used, as ``(path, reason)``."""

    pixels: np.ndarray
    paths: list[str]
    size: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fit: str = "crop"
    location: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)


def _key(paths: Sequence[Path], size: int, fit: str) -> str:
    h = hashlib.sha256(f"{FORMAT}|{size}|{fit}".encode())
    for p in paths:
        h.update(str(Path(p).resolve()).encode() + b"\0")
    return h.hexdigest()[:20]


def open_store(paths: Sequence[Path], size: int, store_dir: str | os.PathLike | None = None,
               workers: int | None = None, progress: bool = False, fit: str = "crop") -> ImageStore:
    """The store of ``paths`` at ``size`` and ``fit``: read from ``store_dir`` when it is
    there and fresh, otherwise decoded now and written there (atomically) for the next run."""
    paths = [Path(p) for p in paths]
    root = Path(store_dir) if store_dir is not None else default_store_dir()
    key = _key(paths, size, fit)
    npy, manifest = root / f"{key}.npy", root / f"{key}.json"
    fingerprints = [_fingerprint(p) for p in paths]
    cached = _read(npy, manifest, fingerprints, size, fit)
    if cached is not None:
        return cached
    log.info("decoding %d images once into a %d px %s store at %s", len(paths), size, fit, npy)
    pixels, kept, bad = preprocess_batch(paths, size, 1.0, fit=fit, on_error="skip",
                                         workers=workers or min(4, os.cpu_count() or 1))
    store = ImageStore(np.ascontiguousarray(pixels), [str(paths[i]) for i in kept], size,
                       [(str(paths[i]), reason) for i, reason in bad], fit, npy)
    _write(store, npy, manifest, fingerprints, [str(p) for p in paths])
    return store


def _read(npy: Path, manifest: Path, fingerprints: list, size: int, fit: str) -> ImageStore | None:
    if not (npy.is_file() and manifest.is_file()):
        return None
    try:
        meta = json.loads(manifest.read_text())
        if (meta.get("format") != FORMAT or meta.get("size") != size or meta.get("fit", "crop") != fit
                or meta.get("fingerprints") != fingerprints):
            log.info("store %s is stale (source images changed); decoding again", npy)
            return None
        pixels = np.load(npy, mmap_mode="r")
        if pixels.shape != (len(meta["kept"]), 3, size, size) or pixels.dtype != np.uint8:
            log.warning("store %s has shape %s, expected %s; decoding again", npy, pixels.shape,
                        (len(meta["kept"]), 3, size, size))
            return None
    except (OSError, ValueError, KeyError) as e:
        log.warning("store %s is unreadable (%s); decoding again", npy, e)
        return None
    sources = meta["sources"]
    return ImageStore(np.asarray(pixels), [sources[i] for i in meta["kept"]], size,
                      [tuple(s) for s in meta["skipped"]], fit, npy)


def _write(store: ImageStore, npy: Path, manifest: Path, fingerprints: list, sources: list[str]) -> None:
    index = {s: i for i, s in enumerate(sources)}
    try:
        atomic_write(npy, lambda f: np.save(f, store.pixels))
        # the manifest goes last: a store without one is never read
        atomic_write_text(manifest, json.dumps({
            "format": FORMAT, "size": store.size, "fit": store.fit, "sources": sources, "fingerprints": fingerprints,
            "kept": [index[p] for p in store.paths], "skipped": [list(s) for s in store.skipped]}))
    except OSError as e:  # a read-only or full cache costs the next run a decode, nothing more
        log.warning("could not write the image store to %s (%s); it is used from memory only", npy, e)
