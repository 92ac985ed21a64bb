"""DINO multi-crop augmentation: 2 global + N local crops of one image, PIL only.

Every random choice is drawn from an explicit :class:`random.Random` passed in by the
caller, never from a global generator. The dataset seeds it from (seed, epoch, index), so
an image gets the same crops whatever worker decodes it, and a resumed run sees exactly
the crops the interrupted run would have seen.

Per-crop recipe (the paper's, see reference/dino.md): random resized crop (bicubic),
horizontal flip p 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, then
global 1: blur p 1.0; global 2: blur p 0.1 and solarize p 0.2; each local: blur p 0.5.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from dinoserve.images import IMAGENET_MEAN, IMAGENET_STD


def crop_box(w: int, h: int, scale: tuple[float, float], rng: random.Random,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(left, top, width, height)`` of a random-resized crop of a ``w`` x ``h`` image: area
    fraction in ``scale``, log-uniform aspect ratio in ``ratio``, the first of 10 draws that
    fits, else the largest centred crop within ``ratio``."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    cw, ch = max(1, cw), max(1, ch)
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float], rng: random.Random,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """A :func:`crop_box` of ``img`` resized (bicubic) to ``size`` x ``size``."""
    left, top, cw, ch = crop_box(*img.size, scale, rng, ratio)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))


def color_jitter(img: Image.Image, rng: random.Random, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1) -> Image.Image:
    """Brightness, contrast, saturation and hue changes in a random order."""
    ops = [
        lambda im: TF.adjust_brightness(im, rng.uniform(1 - brightness, 1 + brightness)),
        lambda im: TF.adjust_contrast(im, rng.uniform(1 - contrast, 1 + contrast)),
        lambda im: TF.adjust_saturation(im, rng.uniform(1 - saturation, 1 + saturation)),
        lambda im: TF.adjust_hue(im, rng.uniform(-hue, hue)),
    ]
    rng.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


def gaussian_blur(img: Image.Image, rng: random.Random, radius: tuple[float, float] = (0.1, 2.0)) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*radius)))


@dataclass
class MultiCropAugment:
    """Callable ``(img, rng) -> list of float tensors``: 2 global crops then ``local_crops``
    local crops, each ``[3, S, S]`` normalised with ``mean``/``std``."""

    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def _photometric(self, img: Image.Image, rng: random.Random) -> Image.Image:
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        if rng.random() < 0.8:
            img = color_jitter(img, rng)
        if rng.random() < 0.2:
            img = ImageOps.grayscale(img).convert("RGB")
        return img

    def _finish(self, img: Image.Image) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def __call__(self, img: Image.Image, rng: random.Random) -> list[torch.Tensor]:
        crops = []
        # global 1: always blurred
        g1 = self._photometric(random_resized_crop(img, self.global_size, self.global_scale, rng), rng)
        crops.append(self._finish(gaussian_blur(g1, rng)))
        # global 2: rarely blurred, sometimes solarized
        g2 = self._photometric(random_resized_crop(img, self.global_size, self.global_scale, rng), rng)
        if rng.random() < 0.1:
            g2 = gaussian_blur(g2, rng)
        if rng.random() < 0.2:
            g2 = ImageOps.solarize(g2, threshold=128)
        crops.append(self._finish(g2))
        # locals: blurred half of the time
        for _ in range(self.local_crops):
            loc = self._photometric(random_resized_crop(img, self.local_size, self.local_scale, rng), rng)
            if rng.random() < 0.5:
                loc = gaussian_blur(loc, rng)
            crops.append(self._finish(loc))
        return crops
