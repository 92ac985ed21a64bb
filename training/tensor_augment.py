"""DINO multi-crop augmentation as batched tensor ops, on the device that trains.

The same recipe as :class:`dinoserve.training.augment.MultiCropAugment` (the PIL reference):
random resized crop, horizontal flip p 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8 in a
random order, grayscale p 0.2, then global 1: blur p 1.0; global 2: blur p 0.1 and solarize
p 0.2; each local: blur p 0.5. Every random parameter is drawn per sample, so one batch
holds as many different crops as the PIL pipeline would give (``transforms.v2`` on a
batch draws one set for all).

Input is a uint8 ``[B, 3, S, S]`` batch (a :class:`~dinoserve.training.store.ImageStore`
slice) already on the device. Crops are one ``affine_grid`` + ``grid_sample`` (bilinear) for
the batch, the flip folded into the affine map; the store is sized so that a crop shrinks
its source region by at most about 1.5x, where bilinear sampling barely aliases. All random draws come
from a CPU ``torch.Generator`` that the caller seeds per step, so a resumed run sees the
crops the interrupted one would have seen, on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinoserve.images import IMAGENET_MEAN, IMAGENET_STD
from dinoserve.models import normalize_tensor

#: Luma weights of PIL's ``convert("L")`` (ITU-R 601-2), which the reference grayscale uses.
_LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def crop_boxes(n: int, side: int, scale: tuple[float, float], g: torch.Generator,
               ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """``[n, 4]`` boxes ``(x0, y0, x1, y1)`` in pixels of a ``side`` x ``side`` image: the
    random-resized-crop rule (area fraction in ``scale``, log-uniform aspect in ``ratio``,
    first of ``tries`` draws that fits, else the whole image), drawn per sample."""
    area = _uniform(n * tries, *scale, g).view(n, tries)
    aspect = torch.exp(_uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), g)).view(n, tries)
    w = torch.sqrt(area * aspect)  # as fractions of the side
    h = torch.sqrt(area / aspect)
    fits = (w <= 1) & (h <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0).view(n, 1)
    w = torch.where(first >= 0, w.gather(1, pick).squeeze(1), torch.ones(n))
    h = torch.where(first >= 0, h.gather(1, pick).squeeze(1), torch.ones(n))
    x0 = torch.rand(n, generator=g) * (1 - w)
    y0 = torch.rand(n, generator=g) * (1 - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1) * side


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``f * a + (1 - f) * b`` per sample, clamped to [0, 1] as torchvision's adjusters do."""
    f = f.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-8), torch.zeros_like(maxc))
    d = delta.clamp(min=1e-8)
    h = torch.where(maxc == r, ((g - b) / d) % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    # The closed form: channel c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n_c + 6h) mod 6
    # with n = 5, 3, 1 for red, green, blue.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + h.unsqueeze(1) * 6) % 6
    t = torch.minimum(k, 4 - k).clamp(0, 1)
    return v.unsqueeze(1) - v.unsqueeze(1) * s.unsqueeze(1) * t


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(hsv)


def colour_jitter(x: torch.Tensor, g: torch.Generator, p: float = 0.8, brightness: float = 0.4,
                  contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1) -> torch.Tensor:
    """Per-sample colour jitter in a per-sample random order, applied with probability ``p``
    (float ``[B, 3, H, W]`` in [0, 1])."""
    n = x.shape[0]
    on = torch.rand(n, generator=g) < p
    factors = [_uniform(n, 1 - brightness, 1 + brightness, g), _uniform(n, 1 - contrast, 1 + contrast, g),
               _uniform(n, 1 - saturation, 1 + saturation, g), _uniform(n, -hue, hue, g)]
    order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
    dev = x.device
    x = x.clone()
    for slot in range(4):
        for op in range(4):
            rows = torch.nonzero(on & (order[:, slot] == op)).flatten()
            if rows.numel() == 0:
                continue
            sub = x[rows.to(dev)]
            f = factors[op][rows].to(dev, x.dtype)
            if op == 0:
                sub = (sub * f.view(-1, 1, 1, 1)).clamp_(0, 1)
            elif op == 1:
                sub = _blend(sub, _gray(sub).mean((2, 3), keepdim=True), f)
            elif op == 2:
                sub = _blend(sub, _gray(sub), f)
            else:
                sub = _adjust_hue(sub, f)
            x[rows.to(dev)] = sub
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float = 2.0) -> torch.Tensor:
    """Per-sample Gaussian blur; ``sigma`` ``[B]`` (0 leaves that sample unchanged)."""
    b, c, hgt, wid = x.shape
    radius = math.ceil(3 * max_sigma)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.device, x.dtype).view(-1, 1)
    k = torch.exp(-0.5 * (t / s.clamp(min=1e-3)) ** 2)
    k = torch.where(s > 0, k, (t == 0).to(x.dtype).expand_as(k))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one kernel per (sample, channel)
    y = F.pad(x.reshape(1, b * c, hgt, wid), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, hgt, wid)


@dataclass
class BatchMultiCrop:
    """Callable ``(images uint8 [B, 3, S, S], generator) -> list of float crops``: 2 global
    crops then ``local_crops`` local crops, each ``[B, 3, size, size]`` normalised with
    ``mean``/``std``, on the images' device."""

    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def crop(self, images: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator,
             blur_p: float, solarize_p: float = 0.0) -> torch.Tensor:
        """One crop position for the whole batch: crop, flip, jitter, gray, blur, solarize
        (values in [0, 1], not yet normalised)."""
        n, dev = images.shape[0], images.device
        side = images.shape[-1]
        x0, y0, x1, y1 = (crop_boxes(n, side, scale, g) / side).unbind(1)
        flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        # an affine map from output to source coordinates ([-1, 1] spans the image); a
        # negative x scale mirrors the crop, so the flip costs nothing
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = (x1 - x0) * flip, x0 + x1 - 1
        theta[:, 1, 1], theta[:, 1, 2] = y1 - y0, y0 + y1 - 1
        grid = F.affine_grid(theta.to(dev), [n, 3, size, size], align_corners=False)
        x = F.grid_sample(images.float().div_(255), grid, mode="bilinear", padding_mode="border",
                          align_corners=False)
        x = colour_jitter(x, g)
        gray = (torch.rand(n, generator=g) < 0.2).to(dev).view(-1, 1, 1, 1)
        x = torch.where(gray, _gray(x).expand_as(x), x)
        sigma = torch.where(torch.rand(n, generator=g) < blur_p, _uniform(n, 0.1, 2.0, g), torch.zeros(n))
        if blur_p > 0 and bool((sigma > 0).any()):
            x = gaussian_blur(x, sigma)
        if solarize_p > 0:
            sol = (torch.rand(n, generator=g) < solarize_p).to(dev).view(-1, 1, 1, 1)
            x = torch.where(sol & (x >= 128 / 255), 1 - x, x)  # PIL: invert values >= 128
        return x

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        views = [self.crop(images, self.global_size, self.global_scale, g, blur_p=1.0),
                 self.crop(images, self.global_size, self.global_scale, g, blur_p=0.1, solarize_p=0.2)]
        views += [self.crop(images, self.local_size, self.local_scale, g, blur_p=0.5) for _ in range(self.local_crops)]
        return [normalize_tensor(v, self.mean, self.std) for v in views]
