"""k-NN evaluation of backbone features, the DINO protocol.

Bank and query images go through the one evaluation transform
(:func:`dinoserve.images.preprocess`: shorter side to ``size / crop_pct``, centre crop),
then the backbone's own mean/std. Features are L2-normalised; each query takes its ``k``
most cosine-similar bank images, which vote for their label with weight
``exp(similarity / temperature)`` (k = 20, T = 0.07 as in the paper's eval_knn.py).

Decoding dominates the cost on a CPU, so it is split from feature extraction: a
:class:`KnnSet` holds the preprocessed uint8 pixels of bank and queries and can be
evaluated many times (every few epochs of a training run, or along a benchmark curve)
without decoding again. :func:`evaluate_knn` does both steps at once.

Two protocols over one labelled set: ``"split"`` (bank = ``knn_train``, queries =
``knn_val``: the fixed protocol every earlier number used) and ``"loo"`` (leave-one-out:
every labelled image is a query against all the others, five times as many queries, so
a standard error about half as large). Every result carries its binomial standard error
and which queries it got right, so that two models scored on the same queries are compared
by :func:`paired_gap`: the gap and the standard error of the gap itself, which is smaller
than the two errors added in quadrature because both models get the easy queries right. Two
models differ only when their gap is larger than twice its standard error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinoserve.errors import DataError
from dinoserve.images import (DEFAULT_CROP_PCT, IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ImageInput,
                             preprocess_batch, walk_images)
from dinoserve.filelist import read_file_list
from dinoserve.models import normalize_tensor

__all__ = [
    "KnnResult",
    "KnnSet",
    "IMAGE_SUFFIXES",
    "preprocess_items",
    "features_from_pixels",
    "extract_features",
    "raw_pixel_features",
    "knn_classify",
    "prepare_knn_set",
    "evaluate_knn_set",
    "knn_scores",
    "evaluate_knn",
    "evaluate_knn_protocols",
    "knn_classify_leave_one_out",
    "standard_error",
    "paired_gap",
    "PROTOCOLS",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = IMAGE_EXTENSIONS  # an alias: the one extension list is dinoserve.images.IMAGE_EXTENSIONS

#: ``split``: bank knn_train, queries knn_val; ``loo``: each labelled image against all the others.
PROTOCOLS = ("split", "loo")

#: Bank and query splits of a CSV file list (the openclipart protocol).
BANK_SPLIT = "knn_train"
QUERY_SPLIT = "knn_val"


@dataclass
class KnnResult:
    """Top-1/top-5 accuracy in percent, set sizes, and how many images were skipped."""

    top1: float
    top5: float
    n_bank: int
    n_query: int
    skipped: int
    k: int = 20
    temperature: float = 0.07
    protocol: str = "split"
    #: per query (in protocol order), whether its top-1 class was right; for :func:`paired_gap`
    hits: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def top1_se(self) -> float:
        """Binomial standard error of ``top1`` in points: sqrt(p (1 - p) / queries)."""
        return standard_error(self.top1, self.n_query)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "hits"}, "top1_se": round(self.top1_se, 2)}


def standard_error(percent: float, n: int) -> float:
    """Standard error, in points, of an accuracy of ``percent`` measured on ``n`` queries."""
    if n <= 0:
        return float("nan")
    p = percent / 100.0
    return 100.0 * float(np.sqrt(p * (1.0 - p) / n))


def paired_gap(a: KnnResult, b: KnnResult) -> tuple[float, float]:
    """``(gap, standard error of the gap)`` in points: top-1 of ``a`` minus ``b``, both
    scored on the same queries.

    Each query contributes ``d = hit_a - hit_b`` (-1, 0 or 1); the gap is the mean of ``d``
    and its error ``std(d) / sqrt(n)`` (sample std), the paired test for two classifiers on
    one test set. Queries both get right, or both wrong, add nothing to it.
    """
    if a.hits is None or b.hits is None:
        raise ValueError("paired_gap needs per-query hits: results from knn_scores")
    if (a.protocol, len(a.hits)) != (b.protocol, len(b.hits)):
        raise ValueError(f"paired_gap compares results on the same queries; got {a.protocol} with {len(a.hits)} "
                         f"queries and {b.protocol} with {len(b.hits)}")
    d = a.hits.astype(np.float64) - b.hits.astype(np.float64)
    if len(d) < 2:
        return 100.0 * float(d.mean()) if len(d) else float("nan"), float("nan")
    return 100.0 * float(d.mean()), 100.0 * float(d.std(ddof=1) / np.sqrt(len(d)))


@dataclass
class KnnSet:
    """Preprocessed bank and query images with integer labels; decode once, evaluate often."""

    bank_pixels: np.ndarray  # uint8 [N, 3, S, S]
    bank_labels: np.ndarray  # int64 [N]
    query_pixels: np.ndarray  # uint8 [Q, 3, S, S]
    query_labels: np.ndarray  # int64 [Q]
    classes: list[str]
    image_size: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------------------
# Pixels and features
# --------------------------------------------------------------------------------------


def preprocess_items(
    items: Sequence[ImageInput],
    image_size: int,
    crop_pct: float = DEFAULT_CROP_PCT,
    num_workers: int | None = None,
    fit: str = "crop",
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Decode and transform images in parallel threads; unreadable ones are skipped.

    Returns uint8 ``[N, 3, S, S]`` of the readable ones, their positions in ``items``, and
    ``(position, reason)`` for each unreadable image (skipped, never raised).
    """
    workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
    return preprocess_batch(items, image_size, crop_pct, fit=fit, on_error="skip", workers=workers)


def _mean_std(backbone: nn.Module) -> tuple[Sequence[float], Sequence[float]]:
    card = getattr(backbone, "dino_card", None)
    return (card.mean, card.std) if card is not None else (IMAGENET_MEAN, IMAGENET_STD)


@torch.no_grad()
def features_from_pixels(
    backbone: nn.Module,
    pixels: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Backbone features ``[N, D]`` (float32, on CPU) of uint8 ``[N, 3, S, S]`` pixels.

    The backbone runs in eval mode on ``device`` and is put back in its previous mode.
    """
    device = torch.device(device)
    mean, std = _mean_std(backbone)
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for start in range(0, len(pixels), batch_size):
            x = torch.from_numpy(pixels[start:start + batch_size]).to(device).float().div_(255)
            out.append(backbone(normalize_tensor(x, mean, std)).float().cpu())
    finally:
        backbone.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def extract_features(
    backbone: nn.Module,
    items: Sequence[ImageInput],
    image_size: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    crop_pct: float = DEFAULT_CROP_PCT,
    fit: str = "crop",
) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Features of images (paths, bytes, PIL images or arrays); unreadable ones skipped.

    Returns ``(features [N_ok, D], kept positions, [(position, reason), ...] skipped)``.
    """
    pixels, kept, skipped = preprocess_items(items, image_size, crop_pct, fit=fit)
    return features_from_pixels(backbone, pixels, batch_size, device), kept, skipped


def raw_pixel_features(pixels: np.ndarray, reference: np.ndarray | None = None, centre: str = "image") -> torch.Tensor:
    """The raw-pixel baseline: flattened pixels in [0, 1], centred.

    ``centre="image"`` subtracts each image's own mean (cosine then equals the Pearson
    correlation of two images; the stronger baseline); ``"bank"`` subtracts the mean image
    of ``reference`` (the bank; default ``pixels`` itself).
    """
    x = torch.from_numpy(pixels).float().div_(255).flatten(1)
    if centre == "image":
        return x - x.mean(dim=1, keepdim=True)
    if centre == "bank":
        ref = x if reference is None else torch.from_numpy(reference).float().div_(255).flatten(1)
        return x - ref.mean(dim=0, keepdim=True)
    raise ValueError(f"centre must be 'image' or 'bank', got {centre!r}")


# --------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------


@torch.no_grad()
def knn_classify(
    bank_feats: torch.Tensor,
    bank_labels: torch.Tensor,
    query_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN class scores ``[Q, num_classes]`` (the DINO protocol).

    Features are L2-normalised here; each query's ``k`` nearest bank items by cosine
    similarity add ``exp(sim / temperature)`` to their class. ``k`` is capped at the bank
    size. Queries are processed in chunks so memory stays ``chunk x N``.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if len(bank_feats) == 0:
        raise ValueError("the k-NN bank is empty")
    bank_labels = bank_labels.long()
    if num_classes is None:
        num_classes = int(bank_labels.max()) + 1
    bank = F.normalize(bank_feats.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(query_feats), chunk):
        q = F.normalize(query_feats[start:start + chunk].float(), dim=1)
        scores.append(_votes(q @ bank.T, bank_labels, k, temperature, num_classes))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def _votes(sims: torch.Tensor, labels: torch.Tensor, k: int, temperature: float, num_classes: int) -> torch.Tensor:
    """The DINO vote: each row's ``k`` most similar items add exp(sim / T) to their class."""
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(len(sims), num_classes, dtype=top.dtype)
    return votes.scatter_add_(1, labels[idx], (top / temperature).exp())


@torch.no_grad()
def knn_classify_leave_one_out(
    feats: torch.Tensor,
    labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``[N, num_classes]`` of every item classified by the other ``N - 1``
    (the DINO vote of :func:`knn_classify`; an item never votes for itself)."""
    if len(feats) < 2:
        raise ValueError("leave-one-out k-NN needs at least two labelled items")
    labels = labels.long()
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    x = F.normalize(feats.float(), dim=1)
    k = min(k, len(x) - 1)
    scores = []
    for start in range(0, len(x), chunk):
        sims = x[start:start + chunk] @ x.T
        rows = torch.arange(len(sims))
        sims[rows, rows + start] = -float("inf")  # itself: never among its own neighbours
        scores.append(_votes(sims, labels, k, temperature, num_classes))
    return torch.cat(scores)


def _hits(scores: torch.Tensor, labels: torch.Tensor, top: int) -> torch.Tensor:
    """Per query, whether its label is among its ``top`` best-scored classes."""
    top = min(top, scores.shape[1])
    return (scores.topk(top, dim=1).indices == labels.view(-1, 1)).any(dim=1)


def _accuracy(hits: torch.Tensor) -> float:
    return 100.0 * hits.float().mean().item() if len(hits) else float("nan")


# --------------------------------------------------------------------------------------
# Labelled sets: a CSV file list or train/ and val/ class folders
# --------------------------------------------------------------------------------------


def _folder_items(split_dir: Path) -> list[tuple[Path, str]]:
    # The one folder rule (dinoserve.images.walk_images); the class is the first folder level.
    items = [(f, f.relative_to(split_dir).parts[0]) for f in walk_images(split_dir)
             if len(f.relative_to(split_dir).parts) > 1]
    if not items:
        raise DataError(f"{split_dir}: no images in class subfolders ({split_dir}/<class>/<image>)")
    return items


def labelled_items(
    data: str | os.PathLike,
    root: str | os.PathLike | None = None,
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """``(bank, queries)`` as ``(path, class name)`` pairs from a CSV or a folder.

    A CSV (``path,category,split``) gives bank = ``knn_train`` and queries = ``knn_val``;
    a folder needs ``train/<class>/`` and ``val/<class>/`` subfolders.
    """
    data = Path(data)
    if data.is_dir():
        missing = [s for s in ("train", "val") if not (data / s).is_dir()]
        if missing:
            raise DataError(
                f"{data}: a k-NN folder needs train/<class>/ and val/<class>/ subfolders; "
                f"missing {', '.join(missing)}/ (or pass a CSV file list with knn_train/knn_val splits)"
            )
        return _folder_items(data / "train"), _folder_items(data / "val")
    if not data.exists():
        raise DataError(f"{data}: no such k-NN data (a CSV file list or a folder with train/ and val/)")
    entries = read_file_list(data, splits=[BANK_SPLIT, QUERY_SPLIT], root=root)
    unlabelled = [e for e in entries if e.category is None]
    if unlabelled:
        raise DataError(
            f"{data}: {len(unlabelled)} {BANK_SPLIT}/{QUERY_SPLIT} row(s) have no category "
            f"(first: {unlabelled[0].path}); k-NN evaluation needs labels"
        )
    bank = [(e.path, e.category) for e in entries if e.split == BANK_SPLIT]
    queries = [(e.path, e.category) for e in entries if e.split == QUERY_SPLIT]
    return bank, queries


def prepare_knn_set(
    data: str | os.PathLike,
    image_size: int,
    *,
    root: str | os.PathLike | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
    num_workers: int | None = None,
    fit: str = "crop",
) -> KnnSet:
    """Decode and preprocess a labelled set once (see :func:`labelled_items`), each image
    fitted by ``fit`` (:func:`dinoserve.images.fit_image`)."""
    bank_items, query_items = labelled_items(data, root)
    classes = sorted({c for _, c in bank_items} | {c for _, c in query_items})
    index = {c: i for i, c in enumerate(classes)}
    skipped: list[tuple[str, str]] = []

    def load(items: list[tuple[Path, str]]) -> tuple[np.ndarray, np.ndarray]:
        pixels, kept, bad = preprocess_items([p for p, _ in items], image_size, crop_pct, num_workers, fit)
        skipped.extend((str(items[i][0]), reason) for i, reason in bad)
        return pixels, np.array([index[items[i][1]] for i in kept], dtype=np.int64)

    bank_pixels, bank_labels = load(bank_items)
    query_pixels, query_labels = load(query_items)
    if skipped:
        # one short line; KnnSet.skipped holds every (path, reason)
        log.warning("k-NN set %s: %d image(s) left out (unreadable, or over the decompression-bomb limit), "
                    "first: %s", data, len(skipped), skipped[0][0])
    if len(bank_pixels) == 0 or len(query_pixels) == 0:
        raise DataError(f"{data}: no readable {'bank' if len(bank_pixels) == 0 else 'query'} images")
    return KnnSet(bank_pixels, bank_labels, query_pixels, query_labels, classes, image_size, skipped)


def knn_scores(bank: torch.Tensor, queries: torch.Tensor, s: KnnSet, k: int = 20, temperature: float = 0.07,
               protocol: str = "split") -> KnnResult:
    """k-NN accuracy of given bank/query features against the labels of ``s``, by
    ``protocol`` (see :data:`PROTOCOLS`)."""
    bank_labels, query_labels = torch.from_numpy(s.bank_labels), torch.from_numpy(s.query_labels)
    if protocol == "split":
        scores = knn_classify(bank, bank_labels, queries, k, temperature, s.num_classes)
        labels = query_labels
    elif protocol == "loo":
        labels = torch.cat([bank_labels, query_labels])
        scores = knn_classify_leave_one_out(torch.cat([bank, queries]), labels, k, temperature, s.num_classes)
    else:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    n_bank = len(bank) if protocol == "split" else len(labels) - 1
    top1 = _hits(scores, labels, 1)
    return KnnResult(_accuracy(top1), _accuracy(_hits(scores, labels, 5)), n_bank, len(labels),
                     len(s.skipped), k, temperature, protocol, hits=top1.numpy())


def evaluate_knn_set(
    backbone: nn.Module | None,
    knn_set: KnnSet,
    *,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    protocol: str = "split",
) -> KnnResult:
    """k-NN accuracy of ``backbone`` on a prepared set; ``None`` scores raw pixels
    (centred per image, see :func:`raw_pixel_features`). ``protocol``: see :data:`PROTOCOLS`."""
    return evaluate_knn_protocols(backbone, knn_set, (protocol,), k=k, temperature=temperature,
                                  batch_size=batch_size, device=device)[protocol]


def evaluate_knn_protocols(
    backbone: nn.Module | None,
    knn_set: KnnSet,
    protocols: Sequence[str] = PROTOCOLS,
    *,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, KnnResult]:
    """:func:`evaluate_knn_set` for several protocols from one feature extraction."""
    if backbone is None:
        bank = raw_pixel_features(knn_set.bank_pixels)
        queries = raw_pixel_features(knn_set.query_pixels)
    else:
        bank = features_from_pixels(backbone, knn_set.bank_pixels, batch_size, device)
        queries = features_from_pixels(backbone, knn_set.query_pixels, batch_size, device)
    return {p: knn_scores(bank, queries, knn_set, k, temperature, p) for p in protocols}


def evaluate_knn(
    backbone: nn.Module | None,
    data: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    crop_pct: float = DEFAULT_CROP_PCT,
    fit: str | None = None,
    protocol: str = "split",
) -> KnnResult:
    """k-NN top-1/top-5 of ``backbone`` features on a labelled set.

    Args:
        backbone: a model from :mod:`dinoserve.models` (its mean/std are used), or
            ``None`` for the raw-pixel baseline.
        data: a CSV file list (bank = ``knn_train`` rows, queries = ``knn_val`` rows) or a
            folder with ``train/<class>/`` and ``val/<class>/``.
        root: folder relative CSV paths resolve against (see :mod:`dinoserve.filelist`).
        image_size: evaluation size; default the backbone's own image size.
        fit: ``"crop"`` or ``"pad"``; default the backbone card's (``"crop"`` for raw pixels).
        protocol: ``"split"`` (bank/queries) or ``"loo"`` (leave-one-out over both).
    """
    card = getattr(backbone, "dino_card", None)
    if image_size is None:
        if card is None:
            raise ValueError("image_size is required for a backbone without a dino_card or for raw pixels")
        image_size = card.image_size
    if fit is None:
        fit = card.fit if card is not None else "crop"
    knn_set = prepare_knn_set(data, image_size, root=root, crop_pct=crop_pct, fit=fit)
    return evaluate_knn_set(backbone, knn_set, k=k, temperature=temperature, batch_size=batch_size, device=device,
                            protocol=protocol)
