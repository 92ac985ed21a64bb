"""Decode, validate and preprocess images (PIL + numpy only, never torch).

Every part of dinoserve that turns an image into model input goes through this module:
training evaluation, export verification, the client, the index and the app. That is
what makes an embedding computed in one place equal to one computed in another.

Accepted inputs (:data:`ImageInput`): a path, raw encoded bytes, a PIL image, or a numpy
array (``HxW`` grayscale or ``HxWxC`` with 1, 3 or 4 channels; uint8, or uint16 for
16-bit data).

Also the one place for two rules that every part must share: which files of a folder are
images (:func:`walk_images`, :data:`IMAGE_EXTENSIONS`), and the normalisations done
outside the ONNX graph (:func:`normalize` for pixels, :func:`l2_normalize` for embeddings).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dinoserve.errors import (
    DataError,
    ImageDecodeError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    InputTypeError,
)

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

#: Pixel limit of one decoded image: Pillow's own bomb threshold (about 89 megapixels,
#: a 9459 x 9459 image). Larger images are refused before any pixel is decoded.
MAX_PIXELS = 89_478_485

#: File name endings treated as images when walking a folder (case-insensitive).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})

#: Encoded size limit for a single image file or byte string.
MAX_BYTES = 64 * 1024 * 1024

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The DINO evaluation crop: resize the shorter side to size / 0.875 (256 for 224), then
#: centre-crop ``size``.
DEFAULT_CROP_PCT = 0.875

#: How an image is fitted into the model's square input (:func:`fit_image`):
#: ``"crop"`` resizes the shorter side and centre-crops (the DINO/ImageNet evaluation
#: transform, right for photos); ``"pad"`` trims a uniform white border, resizes the longer
#: side and pads with white, so the whole object is kept (clip art, icons, product shots:
#: on openclipart raw pixels score 60.9 % k-NN top-1 padded vs 53.4 % cropped at 64 px,
#: though a resnet18 trained 4 epochs on padded images gained nothing from it).
FITS = ("crop", "pad")

#: A border pixel counts as background in ``"pad"`` when all its channels are at least this
#: (white, and the near-white that anti-aliasing and JPEG leave).
_BACKGROUND_LEVEL = 250


def describe(image: object) -> str:
    """A short human name for an input, used in every error message."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.mode} {image.width}x{image.height}>"
    if isinstance(image, np.ndarray):
        return f"<array {image.dtype} {tuple(image.shape)}>"
    return f"<{type(image).__name__}>"


def load_image(image: ImageInput, *, max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode any supported input into an 8-bit RGB PIL image.

    EXIF orientation is applied; palette and alpha images are composited on white;
    grayscale, CMYK and 16-bit images are converted to 8-bit RGB.

    Raises:
        ImageNotFoundError: a path that does not exist.
        ImageDecodeError: empty, truncated, corrupt or non-image data.
        ImageTooLargeError: more than ``max_pixels`` pixels.
    """
    label = name or describe(image)
    if isinstance(image, np.ndarray):
        return _check_size(_from_array(image, label), max_pixels, label)
    if isinstance(image, Image.Image):
        _check_size(image, max_pixels, label)
        return _to_rgb(ImageOps.exif_transpose(image), label)
    data = _read_bytes(image, label)
    return _decode(data, max_pixels, label)


def _read_bytes(image: object, label: str) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise ImageNotFoundError(
                f"{label}: is a folder, not an image file; pass the image files in it "
                "(e.g. folder/*.jpg), or index the folder with `dinoserve index build`"
            )
        if not path.is_file():
            raise ImageNotFoundError(f"{label}: no such image file; check the path")
        if path.stat().st_size > MAX_BYTES:
            raise ImageTooLargeError(
                f"{label}: file is {path.stat().st_size / 2**20:.0f} MiB, over the "
                f"{MAX_BYTES // 2**20} MiB limit for one image; downscale it first"
            )
        data = path.read_bytes()
    else:
        raise InputTypeError(
            f"{label}: unsupported input type {type(image).__name__}; pass a path, bytes, "
            "a PIL image or a numpy array"
        )
    if not data:
        raise ImageDecodeError(f"{label}: empty file, not an image")
    if len(data) > MAX_BYTES:
        raise ImageTooLargeError(f"{label}: {len(data)} bytes is over the {MAX_BYTES} byte limit")
    return data


def _decode(data: bytes, max_pixels: int, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its own limit; we refuse by our limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(img, max_pixels, label)  # header only: no pixels decoded yet
            img.load()
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as e:
        # Pillow refused in Image.open, above twice its own limit, before our header check
        # ran. Name one limit: ours (or Pillow's, where a caller raised ours above it).
        pillow = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else max_pixels
        size = _BOMB_SIZE.search(str(e))
        got = f"{_megapixels(int(size.group(1)))} is " if size else ""
        raise ImageTooLargeError(
            f"{label}: {got}over the limit of {_megapixels(min(max_pixels, pillow))} "
            "(decompression-bomb guard); to use it, give a downscaled copy"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{label}: not an image Pillow can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"{label}: corrupt or truncated image ({e})") from None
    return _to_rgb(ImageOps.exif_transpose(img), label)


_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} megapixels"


def _check_size(img: Image.Image, max_pixels: int, label: str) -> Image.Image:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"{label}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"{label}: {w}x{h} = {_megapixels(w * h)} is over the limit of "
            f"{_megapixels(max_pixels)} (decompression-bomb guard); to use it, give a downscaled copy"
        )
    return img


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        img = Image.fromarray(_sixteen_to_eight(arr.astype(np.uint32)), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or img.mode == "1":
        has_alpha = img.mode == "P" and "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    if img.mode in ("LA", "La", "RGBa", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV
        except (ValueError, OSError) as e:
            raise ImageDecodeError(f"{label}: cannot convert mode {img.mode} to RGB ({e})") from None
    return img


def _sixteen_to_eight(arr: np.ndarray) -> np.ndarray:
    # 16-bit data uses the full 0..65535 range; keep the top byte. Values above 65535
    # (32-bit "I" images) are clipped rather than wrapped.
    return (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)


def _from_array(arr: np.ndarray, label: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype == np.uint16:
        arr = _sixteen_to_eight(arr)
    elif arr.dtype != np.uint8:
        raise ImageError(
            f"{label}: array dtype must be uint8 (or uint16 for 16-bit images), got {arr.dtype}; "
            "convert with (x * 255).clip(0, 255).astype(np.uint8) for float images in [0, 1]"
        )
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        img = Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
        return _to_rgb(img, label)
    raise ImageError(
        f"{label}: array must be HxW or HxWxC with C in (1, 3, 4), got shape {tuple(arr.shape)} "
        "(channels-first arrays need .transpose(1, 2, 0))"
    )


def resize_and_crop(img: Image.Image, size: int, crop_pct: float = DEFAULT_CROP_PCT) -> Image.Image:
    """The evaluation transform: bicubic resize of the shorter side to ``size / crop_pct``,
    then a centre crop of ``size`` x ``size``."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    short = max(size, int(round(size / crop_pct)))
    w, h = img.size
    if w <= h:
        new_w, new_h = short, max(short, int(round(h * short / w)))
    else:
        new_w, new_h = max(short, int(round(w * short / h))), short
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = (new_w - size) // 2
    top = (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def trim_background(img: Image.Image) -> Image.Image:
    """RGB ``img`` cropped to the bounding box of its non-white pixels (unchanged when it has
    none, or no white border)."""
    arr = np.asarray(img)
    ys, xs = np.nonzero(arr.min(axis=2) < _BACKGROUND_LEVEL)
    if len(ys) == 0:
        return img
    return img.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def resize_and_pad(img: Image.Image, size: int) -> Image.Image:
    """Trim the white border, bicubic resize of the longer side to ``size``, centred on a
    white ``size`` x ``size`` square."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    # load_image already gives RGB: convert (a full-size copy) only what is not
    img = trim_background(img if img.mode == "RGB" else img.convert("RGB"))
    w, h = img.size
    scale = size / max(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
    return out


def check_fit(fit: str) -> str:
    """``fit`` if it is one of :data:`FITS`, else a ``ValueError`` naming the choices."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    return fit


def fit_image(img: Image.Image, size: int, crop_pct: float = DEFAULT_CROP_PCT, fit: str = "crop") -> Image.Image:
    """``img`` as a ``size`` x ``size`` RGB square: :func:`resize_and_crop` for
    ``fit="crop"``, :func:`resize_and_pad` for ``fit="pad"`` (``crop_pct`` unused)."""
    if check_fit(fit) == "pad":
        return resize_and_pad(img, size)
    return resize_and_crop(img, size, crop_pct)


def preprocess(
    image: ImageInput,
    size: int,
    crop_pct: float = DEFAULT_CROP_PCT,
    *,
    fit: str = "crop",
    max_pixels: int = MAX_PIXELS,
    name: str | None = None,
) -> np.ndarray:
    """Decode one image and apply the evaluation transform (:func:`fit_image`).

    Returns a uint8 array ``[3, size, size]`` (RGB, channels first): the exact input of an
    exported model, whose graph converts to float and normalises.
    """
    img = fit_image(load_image(image, max_pixels=max_pixels, name=name), size, crop_pct, fit)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def preprocess_batch(
    images: Sequence[ImageInput] | Iterable[ImageInput],
    size: int,
    crop_pct: float = DEFAULT_CROP_PCT,
    *,
    fit: str = "crop",
    on_error: str = "raise",
    positions: Sequence[int] | None = None,
    names: Sequence[str | None] | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Preprocess many images into one uint8 batch ``[N, 3, size, size]``.

    With ``on_error="raise"`` the first bad image raises an :class:`ImageError` that names
    its position; with ``"skip"`` bad images are left out. ``positions`` numbers the images
    (default 0, 1, ...: a caller batching a longer list passes the original positions) and
    ``names`` labels them in messages (default: :func:`describe`). ``fit`` is
    :func:`fit_image`'s. ``workers`` > 1 decodes
    in that many threads (Pillow releases the GIL); results keep the input order.

    Returns the batch, the positions it holds, and ``(position, message)`` for each
    skipped input.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    check_fit(fit)
    images = list(images)
    positions = list(positions) if positions is not None else list(range(len(images)))
    names = list(names) if names is not None else [None] * len(images)

    def one(image: ImageInput, name: str | None) -> np.ndarray | ImageError:
        try:
            return preprocess(image, size, crop_pct, fit=fit, name=name)
        except ImageError as e:
            return e

    if workers > 1 and len(images) > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, images, names))
    else:
        results = [one(image, name) for image, name in zip(images, names)]
    arrays, kept, skipped = [], [], []
    for i, result in zip(positions, results):
        if isinstance(result, ImageError):
            # A value that is not an image at all is a caller's bug, never skipped.
            if on_error == "raise" or isinstance(result, InputTypeError):
                raise type(result)(f"image #{i}: {result}") from None
            skipped.append((i, str(result)))
        else:
            arrays.append(result)
            kept.append(i)
    batch = np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.uint8)
    return batch, kept, skipped


# --- normalisation outside the ONNX graph --------------------------------------------------
def normalize(batch: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """uint8 ``[N, 3, H, W]`` to float32 normalised with ``mean``/``std`` (what the graph does)."""
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return (batch.astype(np.float32) / 255.0 - m) / s


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Embedding rows scaled to unit length, float32 (rows of zeros stay zero): what the client
    returns and what the index stores and queries with."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


# --- folders ---------------------------------------------------------------------------------
def walk_images(folder: str | os.PathLike, *, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The image files of ``folder``, by the one rule that training, k-NN evaluation, the index
    and export verification share:

    - recursive; a file counts when its extension is in :data:`IMAGE_EXTENSIONS` (any case);
    - hidden entries (names starting with ``.``) are left out, files and folders alike;
    - symlinked folders are not entered (no loops, nothing outside ``folder``); symlinked
      files count;
    - a file reached through several paths (a symlink beside its target, two links to one
      file) is listed once: under a path that is not a symlink when there is one, else under
      the first such path in sorted order;
    - ``exclude`` (a folder, e.g. an index being written inside ``folder``) is left out;
    - sorted by path string. Paths start with ``folder`` as given.

    Raises:
        DataError: ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder of images")
    skip = os.path.abspath(exclude) if exclude is not None else None
    by_file: dict[str, list[tuple[bool, str]]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and os.path.abspath(os.path.join(dirpath, d)) != skip]
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path):  # a dangling link, a fifo named like an image
                continue
            by_file.setdefault(os.path.realpath(path), []).append((os.path.islink(path), path))
    return sorted((Path(min(paths)[1]) for paths in by_file.values()), key=str)
