"""Training data: batch the crops, resume mid-epoch.

- The images (:func:`dinoserve.filelist.find_images`: a folder or a CSV file list) are
  decoded once into an :class:`~dinoserve.training.store.ImageStore` (unreadable ones are
  skipped and reported there, once), so no epoch decodes a file.
- Two sources of batches crop from the store, with one interface (``epoch(e, start)``):
  :class:`TensorBatches` (batched tensor ops on the training device, the default) and
  :class:`PilBatches` (the PIL reference pipeline in DataLoader workers).
- :class:`ResumableSampler` is a ``DistributedSampler`` (one process or many) that can
  start part-way through an epoch, so ``--resume`` skips exactly the batches already done.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler



@dataclass
class Batch:
    """The crops of one batch and the store indices of its images."""

    crops: list[torch.Tensor]  # one [B, 3, S, S] tensor per crop position
    indices: torch.Tensor  # store indices of the B images

    def __len__(self) -> int:
        return int(self.indices.numel())


class StoreCrops(Dataset):
    """The PIL reference pipeline over decoded store pixels: item ``i`` is
    ``(crops of image i, i)``.

    Crops are drawn from ``random.Random(hash of (seed, epoch, index))``: deterministic per
    item and epoch (call :meth:`set_epoch`), independent of workers and batch order.
    """

    def __init__(self, pixels: np.ndarray, transform, *, seed: int = 0):
        self.pixels = pixels
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        img = Image.fromarray(np.ascontiguousarray(self.pixels[index].transpose(1, 2, 0)))
        return self.transform(img, random.Random(f"{self.seed}/{self.epoch}/{index}")), index


def collate_crops(items: list) -> Batch:
    """Stack crops position by position."""
    crops = [torch.stack([views[i] for views, _ in items]) for i in range(len(items[0][0]))]
    return Batch(crops=crops, indices=torch.tensor([idx for _, idx in items]))


class PilBatches:
    """Batches from :class:`StoreCrops` in DataLoader worker processes (the reference path)."""

    def __init__(self, dataset: StoreCrops, sampler: "ResumableSampler", batch_size: int, num_workers: int,
                 seed: int, pin_memory: bool):
        self.dataset, self.sampler = dataset, sampler
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                 collate_fn=collate_crops, drop_last=True, pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(seed))  # own generator: model RNG untouched

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start_batch * self.loader.batch_size)
        return iter(self.loader)


class TensorBatches:
    """Batches cropped by :class:`~dinoserve.training.tensor_augment.BatchMultiCrop` from the
    store pixels held on ``device``, in the training process itself.

    The random parameters of batch ``b`` of an epoch come from a generator seeded with
    ``(seed, rank, epoch, b)``, so a resumed run crops exactly as the interrupted one would.
    """

    def __init__(self, pixels: np.ndarray, augment, sampler: "ResumableSampler", batch_size: int, seed: int,
                 rank: int, device: torch.device):
        self.images = torch.from_numpy(np.array(pixels)).to(device)  # a writable copy (the store may be read-only)
        self.augment, self.sampler, self.batch_size = augment, sampler, batch_size
        self.seed, self.rank = seed, rank

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        for b in range(start_batch, len(order) // self.batch_size):
            idx = torch.tensor(order[b * self.batch_size:(b + 1) * self.batch_size])
            seed = (((self.seed * 1_000_003 + self.rank) * 1_000_003 + epoch) * 1_000_003 + b) % 2**63
            yield Batch(crops=self.augment(self.images[idx.to(self.images.device)],
                                           torch.Generator().manual_seed(seed)), indices=idx)


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
