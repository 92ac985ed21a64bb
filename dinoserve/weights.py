"""Weights: resolve a source, read it once, convert it to a backbone state dict, load it strictly.

:func:`read_weights` does the first three steps and returns one :class:`Weights` record
(the local file, its format and sha256, the backbone state dict and the architecture it
was made for), so a caller that needs to look at the weights before building a model
(training's ``--pretrained`` sets the ViT image size from them) never reads a file twice.
:func:`load_state_dict_strict` is the last step. :mod:`dinoserve.models` builds on these.

Weight sources (``source``), detected in this order:

- ``timm:<arch>.<tag>`` such as ``timm:vit_small_patch16_224.dino``: the Hugging Face
  cache, or a download when online;
- an official alias such as ``dino_vits16``: the weights that belong to it;
- an ``http(s)://`` URL: the torch hub cache, or a download when online;
- a local file or a folder holding ``checkpoint.pth`` or ``model.safetensors``. The file's
  bytes say what it is: a ``.safetensors`` file (a flat backbone state dict), or a
  ``torch.save`` file: a dinoserve training checkpoint (``meta`` + ``teacher``/``student``),
  a facebookresearch/dino full checkpoint (``teacher``/``student`` with ``module.``/
  ``backbone.`` prefixes and an ``argparse.Namespace`` in ``args``), or a backbone-only
  state dict such as the released ``*_pretrain.pth`` (DINO, DINOv2 and DINOv3 layouts; the
  last two are renamed to timm's by :mod:`dinoserve.official_layouts`).

Files are read with ``torch.load(weights_only=True)`` allowing ``argparse.Namespace`` only.
An empty, truncated or foreign file is an :class:`~dinoserve.errors.UnreadableWeightsError`
naming the file and what to do. Loading is strict: a missing, unexpected or mis-shaped key
is an error that lists them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import pickle
import re
import socket
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinoserve.arch_detect import detect_dino_arch, register_count, weights_generation
from dinoserve.errors import (
    IncompatibleWeightsError,
    UnreadableWeightsError,
    UnsafeCheckpointError,
    WeightsError,
    WeightsNotFoundError,
)
from dinoserve.official_layouts import to_timm_layout
from dinoserve.registry import ALIASES, generation_of

__all__ = [
    "Weights",
    "read_weights",
    "read_checkpoint",
    "resolve_source",
    "extract_backbone_state_dict",
    "load_state_dict_strict",
    "file_sha256",
]

_SOURCES = "a checkpoint/.pth/.safetensors path, timm:<arch>.<tag> (e.g. timm:vit_small_patch16_224.dino) or an alias"


# --------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """A weight source, read once: where it came from and the backbone state dict it holds."""

    source: str  # as given: a path, timm:<arch>.<tag>, an alias or a URL
    path: Path  # the local file read
    format: str  # "dinoserve", "dino-full" or "backbone"
    sha256: str  # of the file's bytes
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    # The timm architecture (and constructor options) the weights were made for, from the
    # source's name, a dinoserve checkpoint's meta or the keys; None with the reason when
    # it cannot be told.
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    arch_problem: str = ""
    # The DINO projection head stored beside the backbone (``head.*`` keys of a training
    # checkpoint's network, or of a shipped file), so fine-tuning can continue the same
    # objective; empty when the source has none.
    head_state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # How the images it was trained on were fitted into its input (a dinoserve checkpoint's
    # meta says; "crop" for everything else): the model card carries it on to serving.
    fit: str = "crop"

    @property
    def image_size(self) -> int | None:
        """The input size a ViT's position embeddings were made for (None: not a ViT)."""
        sd = self.state_dict
        if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
            return None
        # The table holds a CLS entry, except in timm's register models (no_embed_class):
        # a square count means patches only.
        n = int(sd["pos_embed"].shape[1])
        side = math.isqrt(n) if math.isqrt(n) ** 2 == n else math.isqrt(n - 1)
        return side * int(sd["patch_embed.proj.weight"].shape[-1])


def read_weights(source: str | os.PathLike, checkpoint_key: str = "teacher") -> Weights:
    """Resolve ``source`` to a local file, read it once and find the backbone in it.

    ``checkpoint_key`` picks ``teacher`` or ``student`` in training checkpoints. Raises a
    :class:`~dinoserve.errors.WeightsError` subclass naming the source and what to do.
    """
    path = resolve_source(source)
    obj, sha = _read_file(path)
    sd, fmt = extract_backbone_state_dict(obj, checkpoint_key, source=str(source))
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else _safetensors_card(path)
    named = _arch_of_source(str(source))
    arch, kwargs, problem = (named, {}, "") if named else _detect_architecture(meta, sd)
    fit = str(meta.get("fit") or "crop") if meta is not None else "crop"
    return Weights(str(source), path, fmt, sha, sd, arch, kwargs, problem, _head_state_dict(obj, checkpoint_key), fit)


def _safetensors_card(path: Path) -> dict[str, Any] | None:
    """The model card a dinoserve-written .safetensors file keeps in its header metadata
    (``{"card": "<json>"}``, as ``benchmarks/ship_model.py`` writes it); None otherwise."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:  # the JSON header of a real file; anything else is not one
                return None
            header = json.loads(f.read(size))
        card = json.loads(((header.get("__metadata__") or {}).get("card")) or "null")
    except (OSError, ValueError, AttributeError):
        return None
    return card if isinstance(card, dict) else None


def _head_state_dict(obj: dict[str, Any], checkpoint_key: str) -> dict[str, torch.Tensor]:
    net = obj.get(checkpoint_key) if ("teacher" in obj or "student" in obj) else obj
    if not isinstance(net, dict):
        return {}
    net = _strip_prefix(dict(net), "module.")
    return {k[len("head."):]: v for k, v in net.items() if k.startswith("head.") and isinstance(v, torch.Tensor)}


def _arch_of_source(source: str) -> str | None:
    if source in ALIASES:
        return ALIASES[source].arch
    if source.startswith("timm:"):
        return source[len("timm:"):].split(".")[0]
    return None


# --------------------------------------------------------------------------------------
# Resolving a source to a local file
# --------------------------------------------------------------------------------------


def resolve_source(source: str | os.PathLike) -> Path:
    """Turn a weight source into a local file path (downloading only when online)."""
    s = str(source)
    if s.startswith("timm:"):
        return _resolve_timm_tag(s[len("timm:"):])
    if s in ALIASES:
        return resolve_source(ALIASES[s].weights)
    if s.startswith(("http://", "https://")):
        return _resolve_url(s)
    path = Path(s).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"{s}: no such file. --weights takes {_SOURCES} ({', '.join(ALIASES)})")
    if path.is_dir():
        for name in ("checkpoint.pth", "model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise WeightsNotFoundError(f"{s}: a folder without checkpoint.pth or model.safetensors")
    return path


def _online(host: str, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") and "huggingface" in host:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _resolve_timm_tag(tag: str) -> Path:
    repo = f"timm/{tag}"
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    if not _online("huggingface.co"):
        raise WeightsNotFoundError(
            f"timm:{tag}: not in the local Hugging Face cache and the hub is unreachable (or "
            f"HF_HUB_OFFLINE is set). Download model.safetensors from "
            f"https://huggingface.co/{repo} on a connected machine and pass its path as --weights."
        )
    try:
        return Path(hf_hub_download(repo, "model.safetensors"))
    except Exception as e:  # the hub raises many types; all mean "not available"
        raise WeightsNotFoundError(f"timm:{tag}: download from the Hugging Face hub failed: {e}") from None


def _resolve_url(url: str) -> Path:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    host = url.split("/")[2]
    if not _online(host):
        raise WeightsNotFoundError(
            f"{url}: not cached at {target} and {host} is unreachable. Download the file on a "
            f"connected machine and pass its path as --weights."
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    urllib.request.urlretrieve(url, tmp)
    tmp.replace(target)
    return target


# --------------------------------------------------------------------------------------
# Reading a file
# --------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``torch.save`` or ``.safetensors`` file safely: tensors, containers and
    ``argparse.Namespace`` only, never arbitrary code."""
    return _read_file(Path(path))[0]


def _read_file(path: Path) -> tuple[dict[str, Any], str]:
    """``(contents, sha256)`` of a weights file, from one read of its bytes."""
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: no such weights file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UnreadableWeightsError(path, f"cannot be read ({e.strerror or e})") from None
    sha = hashlib.sha256(data).hexdigest()
    kind = _sniff(data)
    if kind == "safetensors":
        obj = _load_safetensors(path, data)
    elif kind == "torch":
        obj = _load_torch(path, data)
    elif not data:
        raise UnreadableWeightsError(path, "empty file (0 bytes), not a checkpoint; it was probably cut short "
                                           "while being written, downloaded or copied")
    elif _is_text(data):
        lines = data[:200].decode("utf-8", "replace").strip().splitlines()
        start = f"it starts {lines[0][:40]!r}" if lines else "blank"
        raise UnreadableWeightsError(path, f"a text file ({start}), not a checkpoint")
    else:
        raise UnreadableWeightsError(path, f"not a checkpoint: neither a torch.save file nor a .safetensors file "
                                           f"(it starts with bytes {data[:8].hex(' ')})")
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint")
    return obj, sha


def _sniff(data: bytes) -> str:
    """``"torch"``, ``"safetensors"`` or ``""`` from a file's first bytes."""
    # safetensors first: its 8-byte little-endian header length may begin with 0x80 (a
    # header of 128, 384, ... bytes), the byte a legacy torch pickle begins with; a pickle
    # never has "{" at byte 8 after a length that fits the file
    if len(data) > 8 and data[8:9] == b"{" and 8 + int.from_bytes(data[:8], "little") <= len(data):
        return "safetensors"  # an 8-byte header length, then the JSON header
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":  # torch.save's zip, or its legacy pickle
        return "torch"
    return ""


def _is_text(data: bytes) -> bool:
    head = data[:512]
    for cut in range(4):  # the 512th byte may cut a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return False
    return all(c.isprintable() or c in "\t\r\n\f" for c in text)


def _reason(e: BaseException) -> str:
    """The first sentence of an exception's message (never empty). For torch's restricted
    unpickler, the reason it gives after its boilerplate about ``weights_only``."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0].split(". ")[0].rstrip(".")
    return first if len(first) <= 120 else first[:117] + "..."


def _load_safetensors(path: Path, data: bytes) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError) as e:
        raise UnreadableWeightsError(path, f"a damaged .safetensors file ({_reason(e)})") from None


def _load_torch(path: Path, data: bytes) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "pickle protocol 4 ...": the outcome says enough
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if blocked:
            raise UnsafeCheckpointError(
                f"{path}: refused: loading it would execute code or build objects other than "
                f"tensors and argparse.Namespace ({blocked[0]}). There is no unsafe fallback; "
                f"re-save the state dict alone (torch.save(model.state_dict(), ...))."
            ) from None
        raise UnreadableWeightsError(path, f"not a readable PyTorch checkpoint ({_reason(e)})") from None
    # A cut-short zip or pickle stream fails in the archive reader or inside the restricted
    # unpickler, which reports malformed opcodes with these types.
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, OSError) as e:
        raise UnreadableWeightsError(
            path, f"a truncated or damaged PyTorch checkpoint ({type(e).__name__}: {_reason(e)})") from None


# --------------------------------------------------------------------------------------
# Converting: the backbone inside any supported layout, and its architecture
# --------------------------------------------------------------------------------------


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def extract_backbone_state_dict(obj: dict[str, Any], checkpoint_key: str = "teacher", *,
                                source: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """Find the backbone state dict inside any supported checkpoint layout.

    Returns ``(state_dict, format)`` where format is ``dinoserve``, ``dino-full`` or
    ``backbone``. Pure: no model needed, so each layout is easy to test.
    """
    if "teacher" in obj or "student" in obj:
        fmt = "dinoserve" if "meta" in obj else "dino-full"
        if checkpoint_key not in obj:
            raise WeightsError(
                f"{source}: checkpoint has no {checkpoint_key!r} entry; it has "
                f"{sorted(k for k in obj if k in ('teacher', 'student'))} (use --checkpoint-key)"
            )
        sd = obj[checkpoint_key]
    else:
        fmt = "backbone"
        sd = obj
        for key in ("state_dict", "model"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{source}: does not hold a state dict of tensors")
    # Prefixes are only ever stripped as prefixes of every key, never inside a name.
    sd = _strip_prefix(dict(sd), "module.")
    sd = _strip_prefix(sd, "_orig_mod.")
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    sd, _ = to_timm_layout(sd, source)  # facebookresearch/dinov2 and dinov3 names -> timm's
    return sd, fmt


_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
_VIT_DEPTHS = {"tiny": 12, "small": 12, "base": 12, "large": 24}
_RESNETS = {(2, 2, 2, 2): "resnet18", (3, 4, 23, 3): "resnet101", (3, 8, 36, 3): "resnet152"}


def _detect_architecture(meta: dict[str, Any] | None, sd: dict[str, torch.Tensor]) -> tuple[str | None, dict[str, Any], str]:
    """``(timm arch, constructor options, "")`` the weights were made for, or
    ``(None, {}, why not)``: from a dinoserve checkpoint's meta, else from the keys."""
    if meta is not None and "arch" in meta:
        kwargs = dict(meta.get("model_kwargs") or {})
        if meta.get("family") == "resnet" and meta.get("image_size"):
            kwargs.setdefault("img_size", int(meta["image_size"]))
        return meta["arch"], kwargs, ""
    dino = detect_dino_arch(sd)
    if dino is not None:
        return dino[0], dino[1], ""
    if "pos_embed" in sd and "patch_embed.proj.weight" in sd:
        dim, _, p, _ = sd["patch_embed.proj.weight"].shape
        size = _VIT_SIZES.get(dim)
        if size is None:
            return None, {}, f"ViT with embedding dim {dim} is not a standard size; pass --arch"
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        arch = f"vit_{size}_patch{p}_{grid * p}"
        import timm

        kw: dict[str, Any] = {}
        if not timm.is_model(arch):
            arch, kw = f"vit_{size}_patch16_224", {"patch_size": p, "img_size": grid * p}
        if depth != _VIT_DEPTHS[size]:
            kw["depth"] = depth
        return arch, kw, ""
    if "layer1.0.conv1.weight" in sd:
        blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in sd
        arch = ("resnet50" if bottleneck else "resnet34") if blocks == (3, 4, 6, 3) else _RESNETS.get(blocks)
        if arch:
            return arch, {}, ""
    return None, {}, "cannot tell the architecture from the weights; pass --arch"


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


_NEWER_GENERATIONS = {"DINOv2 ViT", "DINOv3 ViT", "DINOv3 ConvNeXt"}


def _check_generation(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Refuse, naming both, weights of one DINO generation given to an architecture of another,
    and a register count that differs: clearer than the list of keys that do not fit."""
    have, want = weights_generation(sd), weights_generation(own)
    # DINO ViT vs ResNet keeps the key listing below (it names what the file looks like).
    if have and want and have != want and {have, want} & _NEWER_GENERATIONS:
        found = _detect_architecture(None, sd)[0]
        use = f"use --arch {found} or omit --arch" if found else "pass the --arch it was trained as"
        raise IncompatibleWeightsError(
            f"{source}: weights do not fit {arch}: these are {have} weights, and {arch} is a "
            f"{generation_of(arch) or want}; {use}")
    regs, model_regs = register_count(sd), register_count(own)
    if regs != model_regs:
        found = _detect_architecture(None, sd)[0]
        use = f"use --arch {found}" if found else f"use an architecture with {regs} register tokens"
        raise IncompatibleWeightsError(
            f"{source}: weights do not fit {arch}: the weights hold {regs} register tokens, {arch} has "
            f"{model_regs}; {use}")


def load_state_dict_strict(model: nn.Module, weights: Weights, arch: str) -> None:
    """Copy ``weights`` into ``model`` (the ``arch`` backbone); every key must match in name
    and shape, else :class:`~dinoserve.errors.IncompatibleWeightsError` lists the ones that
    do not and names the architecture the file looks like."""
    sd, own = weights.state_dict, model.state_dict()
    _check_generation(sd, own, weights.source, arch)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mis_shaped = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = [f"{weights.source}: weights do not fit {arch}"]
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatch: {show(mis_shaped)}")
        found = _detect_architecture(None, sd)[0]
        looks_like = f" The file looks like {found} weights." if found else ""
        raise IncompatibleWeightsError("; ".join(parts) + f".{looks_like} Check --arch (or omit it to infer it).")
    model.load_state_dict(sd, strict=True)
