"""Training data: find the images, decode them safely, batch the crops, resume mid-epoch.

- :func:`find_images` takes a folder (searched recursively) or a CSV file list (read by
  :func:`dinoserve.filelist.read_file_list`, filtered by split).
- :class:`MultiCropDataset` decodes with :func:`dinoserve.images.load_image` (through a
  cache of downscaled copies when given one, so only the first epoch pays for full-size
  decodes); an image
  that cannot be used becomes a :class:`Failure` instead of an exception, so one bad file
  never stops an epoch. :func:`collate_crops` drops failures from the batch and hands them
  to the main process in :class:`Batch` ``.failures``, which is how counts survive worker
  processes.
- :class:`ResumableSampler` is a ``DistributedSampler`` (one process or many) that can
  start part-way through an epoch, so ``--resume`` skips exactly the batches already done.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from dinoserve.errors import DataError, ImageError
from dinoserve.atomic import atomic_write_bytes
from dinoserve.images import IMAGE_EXTENSIONS, load_image, walk_images



def find_images(data: str | os.PathLike, splits: Sequence[str] | None = None,
                root: str | os.PathLike | None = None) -> list[Path]:
    """The image paths of a folder (recursive, sorted, duplicates through symlinks removed)
    or of a CSV file list (rows of ``splits`` only, when given)."""
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such folder or file list; pass an image folder or a .csv file list")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path}: a file that is not a .csv file list; pass a folder of images or a CSV")
        from dinoserve.filelist import read_file_list

        paths = [e.path for e in read_file_list(path, splits=list(splits) if splits else None, root=root)]
        where = f"{path} (splits {', '.join(splits)})" if splits else str(path)
    else:
        if splits:
            raise DataError(f"--split applies to CSV file lists only, but {path} is a folder")
        paths = _walk(path)
        where = str(path)
    if not paths:
        raise DataError(f"{where}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return paths


def _walk(folder: Path) -> list[Path]:
    # The one folder rule (hidden entries, symlinks, duplicates, order) lives in dinoserve.images.
    return walk_images(folder)


@dataclass
class Failure:
    """An image that could not be used: its path and why."""

    path: str
    reason: str


@dataclass
class Batch:
    """Crops of the usable images of one batch, and the images that were skipped."""

    crops: list[torch.Tensor]  # one [B, 3, S, S] tensor per crop position
    indices: torch.Tensor  # dataset indices of the B images
    failures: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.indices.numel())


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the shorter side is at most ``max_side`` (no-op when 0 or smaller)."""
    w, h = img.size
    short = min(w, h)
    if max_side <= 0 or short <= max_side:
        return img
    f = max_side / short
    return img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BILINEAR, reducing_gap=2.0)


class MultiCropDataset(Dataset):
    """Decode one image and return its multi-crop views, or a :class:`Failure`.

    Crops are drawn from ``random.Random(hash of (seed, epoch, index))``: deterministic per
    item and epoch (call :meth:`set_epoch`), independent of workers and batch order.
    """

    def __init__(self, paths: Sequence[Path], transform, *, seed: int = 0, max_decode_side: int = 0,
                 cache_dir: Path | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.max_decode_side = max_decode_side
        # Only a downscaled copy is worth caching: it is what makes a re-read cheap.
        self.cache_dir = Path(cache_dir) if cache_dir and max_decode_side > 0 else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        try:
            return self.transform(self._decode(Path(path)), rng), index
        except ImageError as e:
            return Failure(str(path), str(e))
        except (OSError, ValueError) as e:  # decoder faults that surface only while cropping
            return Failure(str(path), f"{path}: {type(e).__name__}: {e}")


    def _decode(self, path: Path) -> Image.Image:
        """The shrunk image, from the cache when an earlier epoch put it there.

        PNG copies are lossless, so a cached read gives the very pixels a fresh decode
        gives: crops, losses and resume do not depend on the cache. The key covers the
        file's size and mtime, so an edited image is decoded again.
        """
        if self.cache_dir is None:
            return _shrink(load_image(path), self.max_decode_side)
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.max_decode_side}"
        cached = self.cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.png"
        if cached.is_file():
            return load_image(cached)
        img = _shrink(load_image(path), self.max_decode_side)
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=1)
        atomic_write_bytes(cached, buf.getvalue())
        return img


def collate_crops(items: list) -> Batch:
    """Stack crops position by position; failures leave the batch and travel alongside."""
    good = [it for it in items if not isinstance(it, Failure)]
    failures = [it for it in items if isinstance(it, Failure)]
    if not good:
        return Batch(crops=[], indices=torch.zeros(0, dtype=torch.long), failures=failures)
    n_crops = len(good[0][0])
    crops = [torch.stack([views[i] for views, _ in good]) for i in range(n_crops)]
    return Batch(crops=crops, indices=torch.tensor([idx for _, idx in good]), failures=failures)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the first ``start`` samples of this process's
    share for one epoch (set by :meth:`set_start`, cleared by the next :meth:`set_epoch`)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


@dataclass
class SkipReport:
    """Images skipped so far: a count and the first few paths with reasons."""

    keep: int = 10
    count: int = 0  # skipped items, counted once per epoch they came up in
    examples: list[Failure] = field(default_factory=list)
    paths: set[str] = field(default_factory=set)  # distinct files skipped

    def add(self, failures: Sequence[Failure]) -> list[Failure]:
        """Record failures; return those that are among the first ``keep`` (to log)."""
        new = []
        for f in failures:
            self.count += 1
            if f.path in self.paths:
                continue
            self.paths.add(f.path)
            if len(self.examples) < self.keep:
                self.examples.append(f)
                new.append(f)
        return new

    @classmethod
    def from_dict(cls, d: dict, keep: int = 10) -> "SkipReport":
        """Rebuild a report saved by :meth:`to_dict` (with ``all_paths``), for resume."""
        report = cls(keep=keep, count=int(d.get("count", 0)))
        report.examples = [Failure(e["path"], e["reason"]) for e in d.get("examples", [])]
        report.paths = set(d.get("all_paths", [])) | {f.path for f in report.examples}
        return report

    def to_dict(self, all_paths: bool = False) -> dict:
        if all_paths:
            return {**self.to_dict(), "all_paths": sorted(self.paths)}
        return {"count": self.count, "files": len(self.paths), "examples": [{"path": f.path, "reason": f.reason} for f in self.examples]}
