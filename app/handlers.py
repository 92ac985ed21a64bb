"""What the app does, as plain methods on one object: search, attention, embed.

Each method takes ordinary values (a PIL image, an int, a float) and returns ordinary
values (lists of ``(image, caption)`` pairs, dicts, file paths), so it can be called and
tested without a server. :mod:`dinoserve.app.blocks` only wires them to components.

Every error a user can cause (a bad image, a ResNet asked for attention, a server that is
down) arrives as a :class:`~dinoserve.errors.DinoserveError` and leaves here as a
``gr.Error`` with the same message; anything else is a bug and stays an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import gradio as gr
import numpy as np
from PIL import Image

from dinoserve.atomic import atomic_write_bytes
from dinoserve.images import fit_image, load_image
from dinoserve.model_info import ModelInfo

from dinoserve.app.errors import app_error, user_errors
from dinoserve.app.overlay import (heatmap_overlay, pca_rgb, renormalize, threshold_mask, threshold_overlay,
                                   upsample_rgb)
from dinoserve.app.upload import read_upload

log = logging.getLogger(__name__)

#: Attention overlays are drawn at least this many pixels wide: tiny models see 32-64 px crops.
DISPLAY_SIZE = 320

#: Default share of the attention the threshold view keeps (DINO's visualize_attention.py).
DEFAULT_THRESHOLD = 0.6

DEFAULT_K = 8


def _require(image: Any, what: str) -> None:
    if image is None:
        raise app_error(f"No image given: upload, paste or pick an example image to {what}.",
                       title="No image")


def _number(value: Any, name: str) -> float:
    """A number parameter from the browser or an API caller (events skip Gradio's checks)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise app_error(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(x):
        raise app_error(f"{name} must be a finite number, got {value!r}")
    return x


class Handlers:
    """The app's behaviour over one :class:`dinoserve.Client` and one loaded index.

    Args:
        client: a :class:`dinoserve.Client` (embedded or Triton).
        index: a loaded :class:`dinoserve.index.EmbeddingIndex`.
        model: the client's model (``client.info``: its card, name and outputs).
        workdir: the only folder the app serves files from: copies of the index images it
            shows (see :meth:`servable`) and the Embed tab's downloads.
    """

    def __init__(self, client: Any, index: Any, model: ModelInfo, workdir: str | os.PathLike):
        self.client = client
        self.index = index
        self.model = model
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.paths: list[str] = [str(p) for p in index.paths]
        self.root = _common_root(self.paths)

    # --- search ------------------------------------------------------------------------
    def display_path(self, path: str) -> str:
        """An index path relative to the folder all index images share, for captions."""
        if self.root:
            with contextlib.suppress(ValueError):
                return os.path.relpath(path, self.root)
        return path

    def search(self, image: Image.Image | str | None, k: int = DEFAULT_K):
        """The ``k`` nearest index images to ``image``.

        Returns ``(gallery, table, paths)``: ``(image, caption)`` pairs for a gr.Gallery
        (images are :meth:`servable` copies), rows ``[rank, score, path]`` for a table, and
        the original paths of the gallery's images (kept in gr.State so a click on a result
        can make it the next query without trusting a browser-sent path).
        """
        image = read_upload(image)
        _require(image, "search with")
        k = int(_number(k, "k"))
        if k < 1:
            raise app_error(f"k must be at least 1, got {k}")
        k = min(k, len(self.paths))  # asking for more than the index holds gives all of it
        with user_errors("Search failed"):
            hits = self.client.search([image], self.index, k=k)[0]
        gallery, table, paths = [], [], []
        for rank, hit in enumerate(hits, start=1):
            path = str(hit.path)
            table.append([rank, round(float(hit.score), 6), path])
            shown = self.servable(path)
            if shown is None:
                continue  # the file is gone since indexing: listed in the table, not shown
            gallery.append((shown, f"{rank}. {hit.score:.3f}  {self.display_path(path)}"))
            paths.append(path)
        return gallery, table, paths

    def servable(self, path: str) -> str | None:
        """A copy of index image ``path`` inside the app's own folder, for the browser.

        The app serves nothing from anywhere else on disk: Gradio's ``allowed_paths`` holds
        only ``workdir``, one entry (Gradio checks that list linearly on every request, so
        listing every index image would cost seconds per thumbnail for a large index). The
        copy is refreshed when the original's size or mtime changes. None if it is gone.
        """
        src = Path(path)
        try:
            st = src.stat()
        except OSError:
            log.warning("index image %s is missing; rebuild or update the index", path)
            return None
        dest = self.workdir / "images" / hashlib.sha256(str(src).encode()).hexdigest()[:16] / src.name
        try:
            cur = dest.stat()
            if (cur.st_size, int(cur.st_mtime)) == (st.st_size, int(st.st_mtime)):
                return str(dest)
        except FileNotFoundError:
            pass
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write_bytes(dest, src.read_bytes())
        except OSError as e:
            log.warning("cannot copy index image %s for display: %s", path, e)
            return None
        os.utime(dest, (st.st_atime, st.st_mtime))
        return str(dest)

    def search_from_result(self, paths: Sequence[str], k: int, evt: gr.SelectData):
        """Use the clicked gallery item as the next query.

        The path comes from the server-side state of the last search, never from the
        browser, so only index images can be opened this way.
        """
        if not paths or evt.index is None:
            raise app_error("Run a search first, then click one of its results.", title="No results")
        i = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
        if not 0 <= i < len(paths):
            raise app_error("That result is no longer on the page; run the search again.")
        query = paths[i]
        gallery, table, new_paths = self.search(query, k)
        return self.servable(query), gallery, table, new_paths

    # --- attention ---------------------------------------------------------------------
    def display_crop(self, image: Image.Image | str) -> Image.Image:
        """The picture the model sees (fitted as it was trained: cropped or padded), enlarged for the screen."""
        with user_errors("Not a usable image"):
            img = load_image(image)
        crop = fit_image(img, self.model.image_size, self.model.crop_pct, self.model.fit)
        scale = max(1, -(-DISPLAY_SIZE // self.model.image_size))  # ceil division
        return crop.resize((crop.width * scale, crop.height * scale), Image.Resampling.BICUBIC)

    def attention(self, image: Image.Image | str | None, threshold: float = DEFAULT_THRESHOLD):
        """Per-head CLS attention overlays, their mean, and the threshold view.

        Returns ``(heads, mean, kept, summary)``: a gallery of one heat map per head, the
        mean-over-heads heat map, a gallery of threshold views (mean first, then each head:
        the smallest set of patches holding ``threshold`` of the attention, the rest
        darkened) and a dict with the numbers (``attention``: the renormalised maps, each
        head summing to 1; ``raw_sums``: the sums before renormalisation, below 1 by the
        CLS->CLS weight and, for models with registers (``registers``), the CLS->register
        weights; ``kept_patches``).
        """
        image = read_upload(image)
        _require(image, "show attention for")
        if not self.model.has_attention:
            raise app_error(self.no_attention_message(), title="No attention maps")
        threshold = _number(threshold, "threshold")
        if not 0.0 < threshold <= 1.0:
            raise app_error(f"threshold must be in (0, 1], got {threshold}")
        with user_errors("Attention failed"):
            raw = np.asarray(self.client.attention([image])[0], dtype=np.float64)  # [heads, h, w]
        att = renormalize(raw)
        mean = att.mean(axis=0)
        crop = self.display_crop(image)
        heads = [(heatmap_overlay(crop, a), f"head {i}") for i, a in enumerate(att)]
        masks = [threshold_mask(mean, threshold)] + [threshold_mask(a, threshold) for a in att]
        labels = ["mean"] + [f"head {i}" for i in range(len(att))]
        total = mean.size
        kept = [
            (threshold_overlay(crop, m), f"{label}: {int(m.sum())}/{total} patches hold {threshold:.0%}")
            for label, m in zip(labels, masks)
        ]
        summary = {
            "model": self.model.name,
            "heads": int(att.shape[0]),
            "grid": [int(att.shape[1]), int(att.shape[2])],
            "threshold": threshold,
            "registers": int(self.model.num_registers),
            "raw_sums": [round(float(s), 6) for s in raw.sum(axis=(1, 2))],
            "kept_patches": {label: int(m.sum()) for label, m in zip(labels, masks)},
            "attention": att.astype(np.float32).tolist(),
        }
        return heads, heatmap_overlay(crop, mean), kept, summary

    def patch_features(self, image: Image.Image | str | None):
        """The PCA-to-RGB picture of ``image``'s patch tokens (a model exported with
        ``--patch-tokens``): ``(picture, summary)``, the picture the size of the display
        crop, the summary with the grid and each component's explained variance."""
        image = read_upload(image)
        _require(image, "show patch features for")
        if not self.model.has_patch_tokens:
            raise app_error(f"Model '{self.model.name}' has no patch_tokens output: export it with "
                            f"`dinoserve export --patch-tokens` (ViTs and ConvNeXts).", title="No patch features")
        with user_errors("Patch features failed"):
            _, tokens = self.client.embed([image], patch_tokens=True)
        side = self.model.image_size // self.model.patch_size
        rgb, ratio = pca_rgb(tokens[0], (side, side))
        crop = self.display_crop(image)
        summary = {"model": self.model.name, "grid": [side, side], "registers_left_out": int(self.model.num_registers),
                   "explained_variance": [round(float(r), 6) for r in ratio]}
        return upsample_rgb(rgb, crop.size), summary

    def no_attention_message(self) -> str:
        family = self.model.family or "this architecture"
        cnn = {"resnet": " (a ResNet is a CNN: it has no attention)",
               "convnext": " (a ConvNeXt, DINOv3's CNN, has no attention)"}.get(self.model.family, "")
        return (f"Model '{self.model.name}' ({family}) has no attention output{cnn}: CLS attention "
                "maps exist only for ViT models. Serve a ViT export (e.g. dino_vits16) to see them.")

    # --- embed -------------------------------------------------------------------------
    def embed(self, image: Image.Image | str | None):
        """The L2-normalised embedding of ``image``.

        Returns ``(info, npy_path, json_path)``: a dict with the model, dimension and the
        vector, and the same vector as a ``.npy`` file and a ``.json`` file to download.
        """
        image = read_upload(image)
        _require(image, "embed")
        with user_errors("Embedding failed"):
            vec = np.asarray(self.client.embed([image])[0], dtype=np.float32)
        info = {"model": self.model.name, "dim": int(vec.shape[0]),
                "norm": round(float(np.linalg.norm(vec)), 6), "embedding": vec.tolist()}
        # One folder per vector: repeated requests for the same image reuse it, and the
        # download keeps a friendly file name.
        folder = self.workdir / "embeddings" / hashlib.sha256(vec.tobytes()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        npy, js = folder / "embedding.npy", folder / "embedding.json"
        buf = _npy_bytes(vec)
        atomic_write_bytes(npy, buf)
        atomic_write_bytes(js, json.dumps(info).encode())
        return info, str(npy), str(js)


def _npy_bytes(vec: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, vec, allow_pickle=False)
    return out.getvalue()


def _common_root(paths: Sequence[str]) -> str:
    """The deepest folder holding every path ("" when there is none or only one file)."""
    if len(paths) < 2:
        return os.path.dirname(paths[0]) if paths else ""
    try:
        return os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # mixed absolute and relative paths
        return ""
