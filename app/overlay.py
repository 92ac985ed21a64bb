"""Turn CLS attention maps into pictures: heat-map overlays and the threshold view; and
patch features into the PCA-to-RGB picture DINOv2/DINOv3 users know.

Pure numpy + PIL, no gradio, so every function here is testable on its own.

The maps a :class:`dinoserve.Client` returns are the last block's CLS->patch softmax
attention. The softmax also gives weight to CLS->CLS, which the maps leave out, so each
head sums to slightly less than 1. :func:`renormalize` rescales each head over the patches
so that it sums to exactly 1: a distribution over patches, which is what the threshold view
(DINO's ``visualize_attention.py``) needs. Display scaling (each map stretched to 0..1 for
the colour map) happens only after that, in :func:`heatmap_overlay`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Anchor colours of the heat map (dark blue -> purple -> orange -> light yellow), a small
#: perceptually ordered ramp in the spirit of "inferno" without a matplotlib dependency.
_RAMP = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def renormalize(attention: np.ndarray) -> np.ndarray:
    """Rescale each head's map ``[..., h, w]`` so that it sums to 1 over the patches.

    The CLS->CLS weight is not part of the maps, so the raw sums are a little below 1.
    A head with no mass at all (all zeros) becomes uniform rather than NaN.
    """
    att = np.asarray(attention, dtype=np.float64)
    if att.ndim < 2:
        raise ValueError(f"attention must be at least [h, w], got shape {att.shape}")
    total = att.sum(axis=(-2, -1), keepdims=True)
    uniform = np.full_like(att, 1.0 / (att.shape[-1] * att.shape[-2]))
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, att / safe, uniform)


def threshold_mask(attention: np.ndarray, fraction: float) -> np.ndarray:
    """The smallest set of patches holding ``fraction`` of one head's attention.

    Patches are taken in order of decreasing weight until their cumulative share reaches
    ``fraction`` (DINO's threshold view). Returns a boolean ``[h, w]`` mask.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    att = renormalize(attention)
    if att.ndim != 2:
        raise ValueError(f"threshold_mask takes one [h, w] map, got shape {att.shape}")
    flat = att.ravel()
    order = np.argsort(-flat, kind="stable")
    cumulative = np.cumsum(flat[order])
    # First position where the running share reaches the fraction; the small tolerance
    # keeps fraction=1.0 from failing on rounding in the last digit.
    count = int(np.searchsorted(cumulative, fraction - 1e-9) + 1)
    count = min(count, flat.size)
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:count]] = True
    return mask.reshape(att.shape)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB with the heat-map ramp."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(np.int64)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    frac = (v - lo)[..., None]
    rgb = _RAMP[lo] * (1.0 - frac) + _RAMP[hi] * frac
    return np.round(rgb).astype(np.uint8)


def _upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a patch grid to ``size`` (width, height), as the
    reference does: each patch stays a visible square."""
    img = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32))
    return np.asarray(img.resize(size, Image.Resampling.NEAREST), dtype=np.float32)


def heatmap_overlay(image: Image.Image, attention: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """Blend one ``[h, w]`` attention map over ``image`` as a heat map.

    For display only, the map is stretched so its smallest value is dark and its largest
    bright; the numbers themselves are not changed.
    """
    att = np.asarray(attention, dtype=np.float32)
    lo, hi = float(att.min()), float(att.max())
    scaled = (att - lo) / (hi - lo) if hi > lo else np.zeros_like(att)
    heat = colorize(_upsample(scaled, image.size))
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base * (1.0 - alpha) + heat.astype(np.float32) * alpha
    return Image.fromarray(np.round(out).astype(np.uint8))


def threshold_overlay(image: Image.Image, mask: np.ndarray, dim: float = 0.25) -> Image.Image:
    """Keep the patches in ``mask`` as they are and darken the rest to ``dim`` brightness."""
    keep = _upsample(np.asarray(mask, dtype=np.float32), image.size) > 0.5
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = np.where(keep[..., None], base, base * dim)
    return Image.fromarray(np.round(out).astype(np.uint8))


def pca_rgb(tokens: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The first three principal components of one image's patch tokens ``[P, D]`` as
    colours: ``(rgb [h, w, 3] uint8, explained variance ratio of the three)``.

    The tokens are centred and projected on the covariance's top eigenvectors (computed in
    float64); each component is stretched to 0..255 on its own, red being the first. A
    component's sign is arbitrary (as in any PCA), so only the contrasts mean something.
    """
    x = np.asarray(tokens, dtype=np.float64)
    h, w = grid
    if x.ndim != 2 or x.shape[0] != h * w:
        raise ValueError(f"patch tokens of shape {x.shape} do not make a {h} x {w} grid")
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(3, vt.shape[0])
    proj = x @ vt[:k].T  # [P, k]
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    scaled = np.where(hi > lo, (proj - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    rgb = np.zeros((h * w, 3))
    rgb[:, :k] = scaled
    var = s ** 2
    ratio = var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)
    return np.round(rgb.reshape(h, w, 3) * 255).astype(np.uint8), ratio


def upsample_rgb(rgb: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A ``[h, w, 3]`` patch picture enlarged to ``size`` (width, height), each patch a square."""
    return Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST)
