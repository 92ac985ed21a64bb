"""Read image uploads with dinoserve's own checks.

``gr.Image`` opens every upload with Pillow before any handler runs, so a text file, a
corrupt PNG or a decompression bomb would fail inside Gradio with a bare "Error". The app's
events therefore run with ``preprocess=False``: Gradio still checks that the file came in
through its upload route (no server path from the browser is ever opened), and the handler
decodes it with :func:`dinoserve.images.load_image`, the same decoding the client and the
index use. Any :class:`~dinoserve.errors.ImageError` becomes a ``gr.Error`` whose message
names the file and says what is wrong: a notice in the browser, ``AppError`` in gradio_client.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from PIL import Image

from dinoserve.errors import ImageError
from dinoserve.images import MAX_PIXELS, load_image

from dinoserve.app.errors import app_error


def read_upload(value: Any, *, max_pixels: int = MAX_PIXELS) -> Image.Image | str | None:
    """The image a handler was given, ready for :class:`dinoserve.Client`.

    ``value`` is the raw payload of a ``gr.Image`` (a dict with ``path``, ``orig_name`` and
    maybe a ``data:`` ``url``), decoded and validated here into an RGB ``PIL.Image``; a PIL
    image, array or path passed by a Python caller is returned unchanged. None stays None.
    """
    if not isinstance(value, dict):
        return value
    name = value.get("orig_name") or "uploaded image"
    url, path = value.get("url") or "", value.get("path")
    try:
        if url.startswith("data:"):
            return load_image(_data_url_bytes(url, name), max_pixels=max_pixels, name=name)
        if not path:
            raise app_error(f"{name}: the upload arrived without a file; upload it again")
        return load_image(Path(path), max_pixels=max_pixels, name=name)
    except ImageError as e:
        raise app_error(str(e), title="Not a usable image") from None


def _data_url_bytes(url: str, name: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL (pasted images can arrive so)."""
    header, _, body = url.partition(",")
    if not header.endswith(";base64"):
        raise app_error(f"{name}: pasted data is not base64-encoded; save it as a file and upload that")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise app_error(f"{name}: pasted data is not valid base64; save it as a file and upload that") from None
