"""The dinoserve Client: images in, DINO embeddings (and attention maps) out.

>>> from dinoserve import Client
>>> c = Client()                                   # onnxruntime in-process on ./model_repository
>>> c = Client("http://127.0.0.1:8000")            # a Triton server; grpc://127.0.0.1:8001 for gRPC
>>> emb = c.embed(["a.jpg", pil_image, array, raw_bytes])   # float32 [N, D], L2-normalised
>>> hits = c.search(["q.jpg"], "photos.index", k=10)        # delegates to dinoserve.index.search

Images are decoded and preprocessed here with :mod:`dinoserve.images` (the same code as
training evaluation and export verification), using the image size and crop the model's
config declares; the model receives uint8 ``[B, 3, S, S]``. Batches run concurrently
(threads; for Triton each thread has its own connection). This module never imports torch,
and imports :mod:`dinoserve.index` only inside :meth:`Client.search` (the index side owns
search; it never imports this module, so the two form no import circle).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from dinoserve.contract import ATTENTION, EMBEDDING, PATCH_TOKENS
from dinoserve.errors import ConfigError, InputTypeError, ModelError
from dinoserve.images import ImageInput, l2_normalize, preprocess_batch
from dinoserve.model_info import ModelInfo

__all__ = ["Client", "ClientStats", "Embeddings", "l2_normalize"]

_SINGLE = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)

#: What every public call accepts, for error messages.
ACCEPTED = ("one image (a file path, encoded bytes, a PIL image, or a uint8 numpy array HxW or HxWxC) "
            "or a list of them (an NxHxWxC array counts as N images)")


@dataclass
class Embeddings:
    """The result of :meth:`Client.embed_detailed`.

    ``vectors[j]`` belongs to input position ``kept[j]``; ``skipped`` holds
    ``(position, message)`` for inputs left out with ``on_error="skip"``.
    """

    vectors: np.ndarray
    kept: list[int]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    #: float32 ``[N, P, D]`` final-normed patch tokens (``embed_detailed(patch_tokens=True)``),
    #: row-major over the patch grid, CLS and register tokens left out; None otherwise.
    patch_tokens: np.ndarray | None = None


@dataclass
class ClientStats:
    """Seconds spent in each stage, summed over worker threads (for benchmarks)."""

    images: int = 0
    requests: int = 0
    preprocess_s: float = 0.0
    infer_s: float = 0.0

    def as_dict(self) -> dict:
        """The counters as a plain dict (for JSON)."""
        return dict(self.__dict__)


class Client:
    """Embed images with a DINO backbone from a model repository or a Triton server.

    Args:
        url: ``None`` runs the model in-process with onnxruntime from ``repo``;
            ``http://host:port`` or ``grpc://host:port`` uses a Triton server.
        model: model name; ``None`` picks the only model there (an error lists them if several).
        repo: the Triton model repository (for ``url=None``, and as a fallback for the
            model's parameters when a server's config lacks them).
        version: model version; ``None`` is the latest (embedded) / the server's policy (Triton).
        batch_size: images per request (capped by the model's ``max_batch_size``).
        timeout: seconds for one request to a server (connect and response).
        concurrency: batches in flight at once; default 4 for Triton, 2 in-process (one batch
            is preprocessed while the other runs; in-process inference runs one at a time).
        retries: retries of a request that failed transiently (server restarting, overloaded).
        backoff: seconds before the first retry; each further retry waits twice as long
            (jittered, at most 5 s).
        device: in-process only: ``auto`` (TensorRT, then CUDA, then the CPU, as this
            onnxruntime build and machine allow), ``cpu``, or ``gpu``/``cuda``/``tensorrt``,
            which fail naming what is missing instead of falling back. ``info.provider``
            says which onnxruntime provider runs.
        runtime: in-process only: ``onnxruntime`` (default) or ``openvino`` (CPU only;
            faster for CNNs and int8 exports on some CPUs, see the README's throughput
            table); ``info.provider`` is then ``"OpenVINO-CPU"``.
    """

    def __init__(self, url: str | None = None, model: str | None = None, repo: str | os.PathLike = "model_repository",
                 *, version: int | str | None = None, batch_size: int = 32, timeout: float = 60.0,
                 concurrency: int | None = None, retries: int = 3, backoff: float = 0.25, device: str = "auto",
                 runtime: str = "onnxruntime"):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        if url:
            from dinoserve.backends import TritonBackend

            if device != "auto":
                raise ConfigError(f"device={device!r} is for the in-process client; a Triton server "
                                  f"chooses its own (`dinoserve serve --device`)")
            if runtime != "onnxruntime":
                raise ConfigError(f"runtime={runtime!r} is for the in-process client; a Triton server "
                                  f"chooses its own (`dinoserve serve --runtime`)")
            self._backend = TritonBackend(url, model, version, timeout=timeout, retries=retries, backoff=backoff,
                                          repo=repo)
        else:
            from dinoserve.backends import EmbeddedBackend

            self._backend = EmbeddedBackend(repo, model, version, device=device, runtime=runtime)
        self.url = url or None
        self.repo = Path(repo)
        info = self._backend.info
        self.batch_size = min(batch_size, info.max_batch_size) if info.max_batch_size > 0 else batch_size
        self.concurrency = concurrency or (4 if url else 2)
        self.stats = ClientStats()
        self._stats_lock = threading.Lock()
        self._infer_lock = threading.Lock() if not url else None

    # -- description -----------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        """The model's name, sizes, preprocessing and weights hash."""
        return self._backend.info

    @property
    def model(self) -> str:
        """The served model's name."""
        return self.info.name

    @property
    def dim(self) -> int:
        """The embedding size ``D``."""
        return self.info.embed_dim

    def __repr__(self) -> str:
        return f"Client({self._backend.describe()}, model={self.model!r}, dim={self.dim})"

    def close(self) -> None:
        """Close server connections (or drop the in-process session)."""
        self._backend.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public calls ----------------------------------------------------------------------
    def embed(self, images: ImageInput | Iterable[ImageInput], normalize: bool = True,
              on_error: str = "raise", names: Sequence[str] | None = None,
              patch_tokens: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Embeddings of ``images`` as float32 ``[N, D]``, L2-normalised unless ``normalize=False``.

        ``images`` is one image or a list mixing paths, bytes, PIL images and numpy arrays.
        With ``on_error="skip"`` bad images are left out (use :meth:`embed_detailed` to learn
        which); with ``"raise"`` the first bad one raises an :class:`~dinoserve.errors.ImageError`
        naming its position and path.

        With ``patch_tokens=True`` (a model exported with ``--patch-tokens``) it returns
        ``(embeddings, patch_tokens)``: the second float32 ``[N, P, D]``, the final-normed
        patch tokens in row-major grid order (``P = (S/p)^2`` at the model's size ``S``;
        CLS and register tokens left out), never normalised.
        """
        out = self.embed_detailed(images, normalize=normalize, on_error=on_error, names=names,
                                  patch_tokens=patch_tokens)
        return (out.vectors, out.patch_tokens) if patch_tokens else out.vectors

    def embed_detailed(self, images: ImageInput | Iterable[ImageInput], *, normalize: bool = True,
                       on_error: str = "raise", names: Sequence[str] | None = None,
                       progress: Callable[[int], None] | None = None, patch_tokens: bool = False) -> Embeddings:
        """Like :meth:`embed`, also returning which inputs were kept and why others were skipped.

        ``names`` label inputs in error messages (e.g. the path of raw bytes); ``progress`` is
        called with the number of inputs finished after each batch; ``patch_tokens`` fills
        :attr:`Embeddings.patch_tokens`.
        """
        if patch_tokens and not self.info.has_patch_tokens:
            raise ModelError(
                f"model {self.model!r} ({self.info.arch or self.info.family}) has no {PATCH_TOKENS!r} output; "
                f"export it with `dinoserve export --patch-tokens` (ViTs and ConvNeXts)")
        outputs = (EMBEDDING, PATCH_TOKENS) if patch_tokens else (EMBEDDING,)
        outs = self._run(images, outputs, on_error, names, progress)
        vectors = outs.vectors.astype(np.float32, copy=False)
        if normalize and len(vectors):
            vectors = l2_normalize(vectors)
        tokens = outs.patch_tokens.astype(np.float32, copy=False) if patch_tokens else None
        return Embeddings(vectors, outs.kept, outs.skipped, tokens)

    def embed_pixels(self, batch: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Embeddings of images already preprocessed by :func:`dinoserve.images.preprocess_batch`
        (uint8 ``[N, 3, S, S]`` at this model's size and crop), float32 ``[N, D]``.

        For engines that decode in other processes than the one holding the model (the Ray
        engine's CPU tasks): the same inference and normalisation as :meth:`embed`, in
        requests of at most ``batch_size`` images, one at a time.
        """
        batch = np.asarray(batch)
        size = self.info.image_size
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise InputTypeError(f"Client.embed_pixels: got {batch.dtype} {tuple(batch.shape)}; pass uint8 "
                                 f"[N, 3, {size}, {size}] from dinoserve.images.preprocess_batch")
        parts = [self._backend.infer(batch[i:i + self.batch_size], (EMBEDDING,))[EMBEDDING]
                 for i in range(0, len(batch), self.batch_size)]
        with self._stats_lock:
            self.stats.images += len(batch)
            self.stats.requests += len(parts)
        vectors = np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0, self.dim), np.float32)
        return l2_normalize(vectors) if normalize and len(vectors) else vectors

    def attention(self, images: ImageInput | Iterable[ImageInput], on_error: str = "raise",
                  names: Sequence[str] | None = None) -> np.ndarray:
        """Last-block CLS attention maps, float32 ``[N, heads, h, w]`` (ViT models only)."""
        if not self.info.has_attention:
            kind = "a ResNet" if self.info.family == "resnet" else f"a model without an {ATTENTION!r} output"
            raise ModelError(
                f"model {self.model!r} ({self.info.arch or self.info.family}) is {kind}: it has no "
                "attention maps; use a ViT model (e.g. one exported from dino_vits16) for attention"
            )
        return self._run(images, (ATTENTION,), on_error, names, None).vectors.astype(np.float32, copy=False)

    def search(self, images: ImageInput | Iterable[ImageInput], index: Any, k: int = 10) -> list:
        """The ``k`` nearest images in ``index`` (an :class:`~dinoserve.index.EmbeddingIndex`
        or its path) for each query image, best first: ``[[Hit(path, score, rank), ...], ...]``.

        Pass many queries in one call: they are embedded in batches and searched together,
        an exact index in one matrix product per block of its vectors
        (:func:`dinoserve.index_kinds.exact_search`), which costs far less per query than
        one call each. Shorthand for :func:`dinoserve.index.search` ``(self, images, index,
        k)``. Raises :class:`~dinoserve.errors.IndexMismatchError` if the index was built
        with another model or preprocessing.
        """
        from dinoserve.index import search

        return search(self, images, index, k)

    # -- machinery -------------------------------------------------------------------------
    def _run(self, images, outputs: tuple[str, ...], on_error: str, names, progress) -> Embeddings:
        """``outputs[0]`` as ``vectors``; a second output (``patch_tokens``) as ``patch_tokens``."""
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        items = as_image_list(images, f"Client.{'attention' if outputs[0] == ATTENTION else 'embed'}")
        if names is not None and len(names) != len(items):
            raise ConfigError(f"names has {len(names)} entries for {len(items)} images")
        chunks = [list(range(i, min(i + self.batch_size, len(items)))) for i in range(0, len(items), self.batch_size)]

        def work(positions: list[int]):
            return self._run_chunk(items, names, positions, outputs, on_error)

        parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        kept, skipped = [], []
        for got, kept_j, skipped_j in self._map(work, chunks):
            for o in outputs:
                if len(got[o]):
                    parts[o].append(got[o])
            kept += kept_j
            skipped += skipped_j
            if progress is not None:
                progress(len(kept_j) + len(skipped_j))
        empty = {EMBEDDING: (0, self.dim), ATTENTION: (0, 0, 0, 0), PATCH_TOKENS: (0, 0, self.dim)}
        out = {o: np.concatenate(parts[o]) if parts[o] else np.zeros(empty[o], np.float32) for o in outputs}
        return Embeddings(out[outputs[0]], kept, skipped, out.get(PATCH_TOKENS))

    def _map(self, fn, chunks: list) -> Iterator:
        if self.concurrency == 1 or len(chunks) <= 1:
            yield from map(fn, chunks)
            return
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="dinoserve-client")
        try:
            # Bounded look-ahead: at most 2x concurrency chunks are in flight (memory stays flat).
            pending, it = [], iter(chunks)
            for c in it:
                pending.append(pool.submit(fn, c))
                if len(pending) >= 2 * self.concurrency:
                    break
            while pending:
                yield pending.pop(0).result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(fn, nxt))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _run_chunk(self, items, names, positions, outputs, on_error):
        t0 = time.perf_counter()
        info = self.info
        batch, kept, skipped = preprocess_batch(
            [items[p] for p in positions], info.image_size, info.crop_pct, fit=info.fit, on_error=on_error,
            positions=positions, names=[names[p] for p in positions] if names is not None else None)
        t1 = time.perf_counter()
        got = {o: np.zeros((0,), np.float32) for o in outputs}
        if len(batch):
            if self._infer_lock is not None:
                with self._infer_lock:
                    got = self._backend.infer(batch, outputs)
            else:
                got = self._backend.infer(batch, outputs)
        t2 = time.perf_counter()
        with self._stats_lock:
            self.stats.images += len(kept)
            self.stats.requests += 1 if len(batch) else 0
            self.stats.preprocess_s += t1 - t0
            self.stats.infer_s += t2 - t1
        return got, kept, skipped


def as_image_list(images: Any, what: str = "Client.embed") -> list:
    """``images`` as a list of single images: one image becomes a list of one.

    Raises :class:`~dinoserve.errors.InputTypeError` (also a ``TypeError``) naming what was
    passed for anything else: None, numbers, 0-d/1-d or 5-d arrays, dicts and sets (no order).
    Single items of a list are checked when they are decoded, with their position.
    """
    if isinstance(images, _SINGLE):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise InputTypeError(f"{what}: got {_describe_argument(images)}; pass {ACCEPTED}")
    if images is None or isinstance(images, (Mapping, set, frozenset)) or not isinstance(images, Iterable):
        raise InputTypeError(f"{what}: got {_describe_argument(images)}; pass {ACCEPTED}")
    return list(images)


def _describe_argument(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, np.ndarray):
        kind = "a scalar" if value.ndim == 0 else f"shape {tuple(value.shape)}"
        return f"a {value.ndim}-d numpy array ({kind}, dtype {value.dtype})"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with {len(value)} keys (a mapping has no image order)"
    if isinstance(value, (set, frozenset)):
        return f"a {type(value).__name__} of {len(value)} items (a set has no order, rows could not be matched)"
    if isinstance(value, (bool, int, float, complex, np.generic)):
        return f"{type(value).__name__} {value!r}"
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"a {name} object"
