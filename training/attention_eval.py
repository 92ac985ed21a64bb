"""How well a ViT's CLS attention finds the object: Jaccard against alpha masks.

The paper thresholds the last block's CLS attention at 60 % of its mass and compares the
mask with ground-truth segmentation. openclipart PNGs carry an alpha channel, a free
foreground mask, so the same measurement runs on our own data: for each image with real
transparency, the smallest set of patches holding ``mass`` of the head-averaged attention
(upsampled to pixels) is compared with ``alpha > 127``, both through the one evaluation
transform (shorter side to size / crop_pct, centre crop).

Next to the model, :func:`attention_jaccard` reports a centred box with the same area as
each image's foreground: a centre prior that knows the object's size, the baseline a map
has to beat to show it looks at the object rather than the middle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dinoserve.errors import ImageError
from dinoserve.images import DEFAULT_CROP_PCT, load_image, resize_and_crop

#: The paper's threshold: keep the patches that hold 60 % of the attention mass.
MASS = 0.6


@dataclass
class MaskedSet:
    """Preprocessed images with foreground masks: uint8 ``[N, 3, S, S]`` and bool ``[N, S, S]``."""

    pixels: np.ndarray
    masks: np.ndarray
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


@dataclass
class AttentionScore:
    """Mean Jaccard (percent) of the thresholded attention and of the centred box."""

    jaccard: float
    centred_box: float
    images: int
    mass: float
    image_size: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _alpha(path: Path) -> Image.Image | None:
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            return im.convert("RGBA").getchannel("A")
    return None


def load_masked_set(paths: Sequence[str | Path], size: int, crop_pct: float = DEFAULT_CROP_PCT) -> MaskedSet:
    """Images that have a foreground in their alpha channel (some transparent and some
    opaque pixels after the transform); the others are listed in ``skipped``."""
    pixels, masks, kept, skipped = [], [], [], []
    for p in map(Path, paths):
        try:
            rgb = resize_and_crop(load_image(p), size, crop_pct)  # the project's checks first
            alpha = _alpha(p)
        except (ImageError, OSError) as e:
            skipped.append((str(p), str(e)))
            continue
        if alpha is None:
            skipped.append((str(p), "no alpha channel"))
            continue
        mask = np.asarray(resize_and_crop(alpha, size, crop_pct)) > 127
        if mask.all() or not mask.any():
            skipped.append((str(p), "alpha is all opaque or all transparent"))
            continue
        pixels.append(np.asarray(rgb, np.uint8).transpose(2, 0, 1))
        masks.append(mask)
        kept.append(str(p))
    shape = (0, 3, size, size)
    return MaskedSet(np.stack(pixels) if pixels else np.zeros(shape, np.uint8),
                     np.stack(masks) if masks else np.zeros((0, size, size), bool), kept, skipped)


def threshold_mask(attention: np.ndarray, mass: float = MASS) -> np.ndarray:
    """Boolean ``[h, w]``: the smallest set of cells holding ``mass`` of ``attention``."""
    flat = attention.ravel()
    order = np.argsort(flat)[::-1]
    cum = np.cumsum(flat[order]) / flat.sum()
    keep = np.zeros(flat.size, bool)
    keep[order[: int(np.searchsorted(cum, mass)) + 1]] = True
    return keep.reshape(attention.shape)


def centred_box(size: int, area: int) -> np.ndarray:
    """A centred square of about ``area`` pixels (clipped to the image)."""
    side = min(size, max(1, int(round(np.sqrt(area)))))
    box = np.zeros((size, size), bool)
    lo = (size - side) // 2
    box[lo:lo + side, lo:lo + side] = True
    return box


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


@torch.no_grad()
def attention_jaccard(backbone: torch.nn.Module, masked: MaskedSet, mass: float = MASS,
                      batch_size: int = 32) -> AttentionScore:
    """Mean Jaccard of the thresholded, head-averaged CLS attention of ``backbone`` (a
    ViT) with the alpha masks of ``masked``, and of the centred-box baseline."""
    from dinoserve.models import backbone_card, forward_with_attention

    card = backbone_card(backbone)
    size = masked.pixels.shape[-1]
    m = torch.tensor(card.mean).view(1, 3, 1, 1)
    s = torch.tensor(card.std).view(1, 3, 1, 1)
    was_training = backbone.training
    backbone.eval()
    model_scores, box_scores = [], []
    try:
        for start in range(0, len(masked.pixels), batch_size):
            x = (torch.from_numpy(masked.pixels[start:start + batch_size]).float() / 255 - m) / s
            _, attn = forward_with_attention(backbone, x)
            maps = attn.float().mean(1).numpy()  # [B, h, w]
            for amap, mask in zip(maps, masked.masks[start:start + batch_size]):
                cells = threshold_mask(amap, mass)
                reps = (size // cells.shape[0], size // cells.shape[1])
                pixels = np.kron(cells, np.ones(reps, bool))
                pixels = np.pad(pixels, ((0, size - pixels.shape[0]), (0, size - pixels.shape[1])))
                model_scores.append(_jaccard(pixels, mask))
                box_scores.append(_jaccard(centred_box(size, int(mask.sum())), mask))
    finally:
        backbone.train(was_training)
    n = len(model_scores)
    return AttentionScore(jaccard=100 * float(np.mean(model_scores)) if n else float("nan"),
                          centred_box=100 * float(np.mean(box_scores)) if n else float("nan"),
                          images=n, mass=mass, image_size=size)
