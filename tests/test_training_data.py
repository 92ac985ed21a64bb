"""The decoded-image store, the batched tensor augmentation against the PIL reference, the
batch sources and the reference initialisation (dinoserve.training.store, tensor_augment,
data, init)."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dinoserve.training.augment import MultiCropAugment, crop_box
from dinoserve.training.data import ResumableSampler, TensorBatches
from dinoserve.training.init import match_reference_init
from dinoserve.training.store import open_store
from dinoserve.training.tensor_augment import BatchMultiCrop, crop_boxes

N = 400  # samples per statistic: standard errors of ~2 % on a rate of 0.2


# --- the store ----------------------------------------------------------------------------


def _png(path, colour, size=(60, 40)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_store_decodes_once_skips_bad_files_and_rebuilds_when_a_source_changes(tmp_path):
    a = _png(tmp_path / "a.png", (255, 0, 0))
    b = _png(tmp_path / "b.png", (0, 0, 255), size=(30, 90))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    cache = tmp_path / "stores"
    store = open_store([a, bad, b], 16, cache)
    assert store.pixels.shape == (2, 3, 16, 16) and store.paths == [str(a), str(b)]
    assert store.pixels[0, 0].min() == 255 and store.pixels[1, 2].min() == 255  # red, then blue
    assert [p for p, _ in store.skipped] == [str(bad)] and "bad.png" in store.skipped[0][1]
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2  # one .npy, one manifest

    again = open_store([a, bad, b], 16, cache)
    assert np.array_equal(again.pixels, store.pixels) and again.skipped == store.skipped

    _png(b, (0, 255, 0), size=(30, 90))  # the same file, new content and mtime
    os.utime(b, ns=(1, 1))
    fresh = open_store([a, bad, b], 16, cache)
    assert fresh.pixels[1, 1].min() == 255 and fresh.pixels[1, 2].max() == 0  # green now: rebuilt, not reused


def test_store_fits_images_as_asked_and_keeps_one_store_per_fit(tmp_path):
    # a tall blue bar: "crop" fills the square with it, "pad" keeps it whole on white
    b = _png(tmp_path / "b.png", (0, 0, 255), size=(30, 90))
    cache = tmp_path / "stores"
    cropped = open_store([b], 18, cache)
    padded = open_store([b], 18, cache, fit="pad")
    assert cropped.fit == "crop" and padded.fit == "pad"
    assert (cropped.pixels[0, 2] == 255).all() and (cropped.pixels[0, 0] == 0).all()  # all blue
    assert (padded.pixels[0, :, :, :6] == 255).all() and (padded.pixels[0, :, :, -6:] == 255).all()  # white sides
    assert (padded.pixels[0, 0, :, 7:11] == 0).all()  # the bar in the middle, 6 px wide
    assert len(list(cache.glob("*.npy"))) == 2  # a store of one fit is never read as the other
    assert np.array_equal(open_store([b], 18, cache, fit="pad").pixels, padded.pixels)


# --- tensor augmentation against the PIL reference -----------------------------------------


def _pil_boxes(n, side, scale, seed):
    rng = random.Random(seed)
    boxes = [crop_box(side, side, scale, rng) for _ in range(n)]
    return np.array([[w * h / side**2, math.log(w / h)] for _, _, w, h in boxes])


def _tensor_boxes(n, side, scale, seed):
    b = crop_boxes(n, side, scale, torch.Generator().manual_seed(seed)).numpy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return np.stack([w * h / side**2, np.log(w / h)], 1)


@pytest.mark.parametrize("scale", [(0.25, 1.0), (0.05, 0.4), (0.4, 1.0)])
def test_crop_area_and_aspect_follow_the_reference_distribution(scale):
    pil, ten = _pil_boxes(4000, 96, scale, 0), _tensor_boxes(4000, 96, scale, 0)
    for col in range(2):
        for q in (0.1, 0.5, 0.9):
            assert abs(np.quantile(pil[:, col], q) - np.quantile(ten[:, col], q)) < 0.03, (col, q)
    assert ten[:, 0].min() >= scale[0] - 1e-6 and ten[:, 0].max() <= scale[1] + 1e-6
    assert np.abs(ten[:, 1]).max() <= math.log(4 / 3) + 1e-6


def _image(kind: str) -> np.ndarray:
    """uint8 [3, 48, 48]: 'colour' has four saturated quadrants; 'ink' is a dark glyph on white."""
    img = np.zeros((48, 48, 3), np.uint8)
    if kind == "colour":
        img[:24, :24], img[:24, 24:], img[24:, :24], img[24:, 24:] = (230, 30, 30), (30, 200, 40), (40, 60, 220), (240, 220, 30)
    else:
        img[:] = 255
        img[20:28, 8:40] = 20
    return img.transpose(2, 0, 1).copy()


def _views(kind: str, pipeline: str, n: int = N) -> list[np.ndarray]:
    """n samples of every crop position, de-normalised to [0, 1]: a list of [n, 3, S, S]."""
    args = dict(global_size=24, global_scale=(0.4, 1.0), local_crops=2, local_size=12, local_scale=(0.05, 0.4))
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    pixels = _image(kind)
    if pipeline == "tensor":
        views = BatchMultiCrop(**args)(torch.from_numpy(pixels).expand(n, -1, -1, -1).contiguous(),
                                       torch.Generator().manual_seed(1))
    else:
        aug, img = MultiCropAugment(**args), Image.fromarray(pixels.transpose(1, 2, 0))
        crops = [aug(img, random.Random(i)) for i in range(n)]
        views = [torch.stack([c[v] for c in crops]) for v in range(len(crops[0]))]
    return [(v * std + mean).clamp(0, 1).numpy() for v in views]


@pytest.fixture(scope="module")
def colour_views():
    return {p: _views("colour", p) for p in ("pil", "tensor")}


@pytest.fixture(scope="module")
def ink_views():
    return {p: _views("ink", p) for p in ("pil", "tensor")}


def test_grayscale_rate_matches_the_reference(colour_views):
    for pipeline, views in colour_views.items():
        gray = np.mean([np.ptp(v, axis=0).max() < 0.02 for v in views[0]])  # R = G = B everywhere
        assert abs(gray - 0.2) < 0.06, (pipeline, gray)


def test_colour_statistics_match_the_reference(colour_views):
    stats = {}
    for pipeline, views in colour_views.items():
        g = views[0]  # global 1: never solarized (solarize has its own test)
        sat = g.max(1) - g.min(1)
        stats[pipeline] = (g.mean(), g.mean((1, 2, 3)).std(), sat.mean(), g.std((2, 3)).mean())
    for name, p, t in zip(("mean", "brightness spread", "saturation", "contrast"), stats["pil"], stats["tensor"]):
        assert abs(p - t) < 0.15 * max(abs(p), 0.05), (name, p, t)


def test_solarize_rate_only_on_the_second_global_crop(ink_views):
    for pipeline, views in ink_views.items():
        dark = [np.mean(v.mean((1, 2, 3)) < 0.45) for v in views]  # a white page turned black
        assert abs(dark[1] - 0.2) < 0.06, (pipeline, dark)
        assert dark[0] < 0.02, (pipeline, dark)


def _sharpness(v: np.ndarray) -> np.ndarray:
    """Per crop: gradient energy over variance of the gray image (a blur spreads an edge,
    which keeps its total variation but lowers its squared gradient)."""
    g = v.mean(1)
    energy = (np.diff(g, axis=1) ** 2).mean((1, 2)) + (np.diff(g, axis=2) ** 2).mean((1, 2))
    return energy / np.maximum(g.var((1, 2)), 1e-6)


def test_blur_rates_order_and_size_match_the_reference(ink_views):
    """Global 1 is always blurred, global 2 rarely: its crops are sharper, by a similar
    ratio in both pipelines; locals (p 0.5) have a bimodal sharpness."""
    ratios = {}
    for pipeline, views in ink_views.items():
        g1, g2 = _sharpness(views[0]), _sharpness(views[1])
        ratios[pipeline] = np.median(g1) / np.median(g2)
        assert ratios[pipeline] < 0.85, (pipeline, ratios[pipeline])
    assert abs(ratios["pil"] - ratios["tensor"]) < 0.15, ratios


def test_tensor_views_have_the_reference_shapes_and_normalisation():
    aug = BatchMultiCrop(global_size=32, local_crops=3, local_size=16)
    views = aug(torch.full((5, 3, 48, 48), 255, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_tensor_batches_repeat_exactly_from_any_batch_of_an_epoch():
    pixels = np.random.default_rng(0).integers(0, 256, (20, 3, 24, 24), dtype=np.uint8)

    def source():
        sampler = ResumableSampler(range(20), seed=3)
        return TensorBatches(pixels, BatchMultiCrop(16, (0.4, 1.0), 1, 8, (0.1, 0.4)), sampler, 4, seed=3, rank=0,
                             device=torch.device("cpu"))

    full = list(source().epoch(1))
    resumed = list(source().epoch(1, start_batch=3))
    assert len(full) == 5 and len(resumed) == 2
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a.indices, b.indices) and all(torch.equal(x, y) for x, y in zip(a.crops, b.crops))
    other_epoch = list(source().epoch(2))
    assert not torch.equal(other_epoch[0].crops[0], full[0].crops[0])


# --- reference initialisation -------------------------------------------------------------


def test_reference_init_resnet_last_bn_gamma_is_one_and_vit_cls_token_std():
    from dinoserve.models import create_backbone

    torch.manual_seed(0)
    resnet = create_backbone("resnet18")
    assert all(float(b.bn2.weight.detach().abs().max()) == 0 for b in resnet.modules() if hasattr(b, "bn2"))  # timm zero-inits
    match_reference_init(resnet)
    last = [b.bn2.weight for b in resnet.modules() if hasattr(b, "bn2") and hasattr(b, "zero_init_last")]
    assert len(last) == 8 and all(torch.equal(w, torch.ones_like(w)) for w in last)
    vit = create_backbone("vit_small_patch16_224", depth=1, img_size=32)
    assert float(vit.cls_token.detach().std()) < 1e-4  # timm: normal(1e-6)
    match_reference_init(vit)
    assert 0.014 < float(vit.cls_token.detach().std()) < 0.026 and float(vit.cls_token.detach().abs().max()) <= 2.0  # trunc_normal(0.02): cut at +-2
