"""DINO backbones: timm architectures, the official aliases, and weights from every source.

``create_backbone(name)`` is the one way to build a backbone; ``load_weights(model, src)``
the one way to fill it; ``load_backbone(src)`` does both, working the architecture out
of the weights when it can.

Weight sources (``src``), detected in this order:

- ``timm:<arch>.<tag>`` such as ``timm:vit_small_patch16_224.dino``: the Hugging Face
  cache, or a download when online;
- an official alias such as ``dino_vits16``: the weights that belong to it;
- a ``.safetensors`` file (a flat backbone state dict);
- a ``torch.save`` file: a dinoserve training checkpoint (``meta`` + ``teacher``/``student``),
  a facebookresearch/dino full checkpoint (``teacher``/``student`` with ``module.``/
  ``backbone.`` prefixes and an ``argparse.Namespace`` in ``args``), or a backbone-only
  state dict such as the released ``*_pretrain.pth``.

Loading is strict: a missing, unexpected or mis-shaped key is an error that lists them.
Files are read with ``torch.load(weights_only=True)`` allowing ``argparse.Namespace`` only.

ViTs are built with ``dynamic_img_size=True`` and interpolate their position embeddings
exactly as the reference implementation does, so official weights give the reference's
outputs at any input size.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import fnmatch
import hashlib
import math
import os
import pickle
import re
import socket
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinoserve.errors import (
    IncompatibleWeightsError,
    UnknownModelError,
    UnsafeCheckpointError,
    WeightsError,
    WeightsNotFoundError,
)
from dinoserve.images import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "AliasConfig",
    "BackboneSpec",
    "ALIASES",
    "create_backbone",
    "load_backbone",
    "load_weights",
    "list_models",
    "backbone_spec",
    "forward_with_attention",
    "read_checkpoint",
    "extract_backbone_state_dict",
    "file_sha256",
]

# --------------------------------------------------------------------------------------
# Registry: the official DINO aliases
# --------------------------------------------------------------------------------------

_FB = "https://dl.fbaipublicfiles.com/dino"


@dataclass(frozen=True)
class AliasConfig:
    """An official DINO model: a timm architecture plus the weights that belong to it."""

    name: str
    arch: str
    weights: str  # a weight source (timm tag or URL)
    official_url: str  # the facebookresearch/dino backbone-only file
    knn_top1: float  # ImageNet k-NN top-1 reported by the paper
    linear_top1: float
    description: str = ""


ALIASES: dict[str, AliasConfig] = {
    a.name: a
    for a in [
        AliasConfig("dino_vits16", "vit_small_patch16_224", "timm:vit_small_patch16_224.dino",
                    f"{_FB}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", 74.5, 77.0,
                    "ViT-S/16, 21M params"),
        AliasConfig("dino_vits8", "vit_small_patch8_224", "timm:vit_small_patch8_224.dino",
                    f"{_FB}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", 78.3, 79.7,
                    "ViT-S/8, 21M params"),
        AliasConfig("dino_vitb16", "vit_base_patch16_224", "timm:vit_base_patch16_224.dino",
                    f"{_FB}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", 76.1, 78.2,
                    "ViT-B/16, 85M params"),
        AliasConfig("dino_vitb8", "vit_base_patch8_224", "timm:vit_base_patch8_224.dino",
                    f"{_FB}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", 77.4, 80.1,
                    "ViT-B/8, 85M params"),
        AliasConfig("dino_resnet50", "resnet50",
                    f"{_FB}/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
                    f"{_FB}/dino_resnet50_pretrain/dino_resnet50_pretrain.pth", 67.5, 75.3,
                    "ResNet-50, 23M params (timm hosts no DINO ResNet-50)"),
    ]
}


@dataclass
class BackboneSpec:
    """What a consumer needs to know about a backbone; travels with checkpoints and exports."""

    arch: str
    family: str  # "vit" or "resnet"
    embed_dim: int
    image_size: int
    patch_size: int = 0  # 0 for ResNets
    num_heads: int = 0  # 0 for ResNets
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackboneSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["mean"], kw["std"] = tuple(kw.get("mean", IMAGENET_MEAN)), tuple(kw.get("std", IMAGENET_STD))
        return cls(**kw)


def _family(arch: str) -> str | None:
    if arch.startswith("vit"):
        return "vit"
    if arch.startswith("resnet"):
        return "resnet"
    return None


def list_models(pattern: str = "*") -> list[str]:
    """Aliases and every timm ``resnet*``/``vit*`` architecture matching ``pattern``."""
    import timm

    names = list(ALIASES) + timm.list_models("resnet*") + timm.list_models("vit*")
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def _unknown_model(name: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownModelError(
        f"unknown model {name!r}: use a DINO alias ({', '.join(ALIASES)}) or a timm resnet*/vit* "
        f"architecture (see `dinoserve models`).{hint}"
    )


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


class ReferencePosEmbedViT:
    """Mixin: position embeddings resampled the way facebookresearch/dino does it.

    timm resamples to a target size; the reference resamples by scale factors
    ``(H/p + 0.1) / sqrt(N)`` (bicubic, no antialias) and keeps the table unchanged only
    when the grid is square with the trained token count. The two differ by ~2e-2 at
    160x96, so we follow the reference to reproduce official outputs.
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.view(B, -1, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return self.pos_drop(x + reference_pos_embed(self.pos_embed, H, W))


def reference_pos_embed(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The reference ``interpolate_pos_encoding`` for a ``h x w`` patch grid (CLS first)."""
    if torch.compiler.is_exporting():
        # The Python branch and scale factors below would be baked into an exported graph
        # at the example size; the matrix form keeps the patch grid dynamic.
        return traceable_reference_pos_embed(pos_embed, h, w)
    n = pos_embed.shape[1] - 1
    if h * w == n and h == w:
        return pos_embed
    side = math.sqrt(n)
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = patch_pos.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


_CUBIC_A = -0.75  # PyTorch's (and the reference's) bicubic convolution constant


def _bicubic_matrix(out: int, side: int, same: torch.Tensor) -> torch.Tensor:
    """``[out, side]`` weights of PyTorch's bicubic resize (align_corners=False) by the
    reference's scale ``(out + 0.1) / side``, or the identity when ``same`` is true
    (scale 1.0 gives the weights 0, 1, 0, 0 exactly)."""
    o = torch.arange(out, dtype=torch.float64)
    target = torch.scalar_tensor(out, dtype=torch.float64)
    scale = torch.where(same, torch.ones((), dtype=torch.float64), (target + 0.1) / side)
    real = (o + 0.5) / scale - 0.5
    idx = torch.floor(real)
    t = real - idx
    a = _CUBIC_A
    weights = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
               ((a + 2) * t - (a + 3)) * t * t + 1,
               ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
               ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
    cols = torch.arange(side, dtype=torch.float64)
    m = torch.zeros(out, side, dtype=torch.float64)
    for k, wk in enumerate(weights):  # taps at idx-1 .. idx+2, clamped to the border
        tap = torch.clamp(idx + (k - 1), 0, side - 1)
        m = m + (tap[:, None] == cols[None, :]).to(torch.float64) * wk[:, None]
    return m


def traceable_reference_pos_embed(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """:func:`reference_pos_embed` as tensor operations only, for ONNX export with a dynamic
    patch grid: the separable bicubic resize is two small matrix products. Equal to the
    eager formula up to float rounding (it is closer to a float64 resize than PyTorch's
    float32 kernel), and exactly the table itself at the trained grid."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    dim = pos_embed.shape[-1]
    same = torch.scalar_tensor(h == side, dtype=torch.bool) & torch.scalar_tensor(w == side, dtype=torch.bool)
    grid = pos_embed[0, 1:].reshape(side, side, dim)
    mh = _bicubic_matrix(h, side, same).to(pos_embed.dtype)
    mw = _bicubic_matrix(w, side, same).to(pos_embed.dtype)
    patches = torch.einsum("hi,ijd,wj->hwd", mh, grid, mw)
    return torch.cat([pos_embed[:, :1], patches.reshape(1, -1, dim)], dim=1)


def create_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    checkpoint_key: str = "teacher",
    **kwargs: Any,
) -> nn.Module:
    """Build a DINO backbone (no classifier) by alias or timm ``resnet*``/``vit*`` name.

    Args:
        name: ``dino_vits16`` ... ``dino_resnet50``, or a timm architecture.
        weights: a weight source to load strictly (see the module docstring).
        pretrained: load the alias's own weights (aliases only).
        checkpoint_key: ``teacher`` or ``student`` for training checkpoints.
        **kwargs: passed to timm (``img_size``, ``depth``, ``drop_path_rate`` ...); ``None``
            values mean "use the architecture's default".

    The returned module maps a float ``[B, 3, H, W]`` normalised batch to ``[B, D]`` features
    (ViT: final-normed CLS token; ResNet: global average pool) and carries a
    :class:`BackboneSpec` as ``model.dino_spec``.
    """
    import timm

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    alias = ALIASES.get(name)
    arch = alias.arch if alias else name
    family = _family(arch)
    if family is None or (alias is None and not timm.is_model(arch)):
        raise _unknown_model(name)
    if pretrained and alias is None and weights is None:
        raise UnknownModelError(
            f"{name!r} has no default DINO weights; pass weights=... (e.g. timm:{name}.dino) "
            f"or use an alias: {', '.join(ALIASES)}"
        )
    if family == "vit":
        kwargs.setdefault("dynamic_img_size", True)
    # A ResNet has no size of its own; img_size only records the size it was trained and
    # is meant to be evaluated at, so it stays out of timm's constructor.
    timm_kwargs = {k: v for k, v in kwargs.items() if not (family == "resnet" and k == "img_size")}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **timm_kwargs)
    except TypeError as e:  # timm rejects unknown kwargs with a TypeError; report it as ours
        raise UnknownModelError(f"cannot build {arch!r} with options {kwargs}: {e}") from None
    if family == "vit":
        model.__class__ = type("Dino" + type(model).__name__, (ReferencePosEmbedViT, type(model)), {})
    model.dino_spec = _spec_of(model, arch, family, kwargs)
    if weights is not None or pretrained:
        load_weights(model, weights if weights is not None else alias.weights, checkpoint_key)
    return model


def _spec_of(model: nn.Module, arch: str, family: str, kwargs: dict[str, Any]) -> BackboneSpec:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if family == "vit":
        ps = model.patch_embed.patch_size
        return BackboneSpec(
            arch=arch, family=family, embed_dim=model.embed_dim,
            image_size=int(model.patch_embed.img_size[0]), patch_size=int(ps[0]),
            num_heads=model.blocks[-1].attn.num_heads,
            model_kwargs={k: v for k, v in kwargs.items() if k != "dynamic_img_size"},
        )
    size = cfg.get("input_size", (3, 224, 224))[-1]
    return BackboneSpec(arch=arch, family=family, embed_dim=model.num_features,
                        image_size=int(kwargs.get("img_size", size)), model_kwargs=dict(kwargs))


def backbone_spec(model: nn.Module) -> BackboneSpec:
    """The :class:`BackboneSpec` of a backbone made by :func:`create_backbone`."""
    spec = getattr(model, "dino_spec", None)
    if spec is None:
        raise TypeError("model was not built by dinoserve.models.create_backbone")
    return spec


@torch.no_grad()
def forward_with_attention(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features plus the last block's CLS->patch attention, ``[B, heads, H/p, W/p]``.

    The softmax output is captured from the last block's attention dropout (which sees
    the probabilities only on the non-fused path, hence ``fused_attn = False``).
    """
    spec = backbone_spec(model)
    if spec.family != "vit":
        raise UnknownModelError(f"{spec.arch} is a ResNet: attention maps exist for ViT models only")
    attn = model.blocks[-1].attn
    captured: list[torch.Tensor] = []
    hook = attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        features = model(x)
    finally:
        attn.fused_attn = fused
        hook.remove()
    h, w = x.shape[-2] // spec.patch_size, x.shape[-1] // spec.patch_size
    cls_row = captured[-1][:, :, 0, model.num_prefix_tokens:]
    return features, cls_row.reshape(x.shape[0], spec.num_heads, h, w)


# --------------------------------------------------------------------------------------
# Reading weight files
# --------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``.pth``/``.safetensors`` file safely: tensors, containers and
    ``argparse.Namespace`` only, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if blocked:
            raise UnsafeCheckpointError(
                f"{path}: refused: loading it would execute code or build objects other than "
                f"tensors and argparse.Namespace ({blocked[0]}). There is no unsafe fallback; "
                f"re-save the state dict alone (torch.save(model.state_dict(), ...))."
            ) from None
        raise WeightsError(f"{path}: not a PyTorch checkpoint (unreadable pickle data)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a PyTorch checkpoint or truncated ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint")
    return obj


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def extract_backbone_state_dict(obj: dict[str, Any], checkpoint_key: str = "teacher", *, source: str = "") -> tuple[dict[str, torch.Tensor], str]:
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
    return sd, fmt


def _arch_from_checkpoint(obj: dict[str, Any], sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """Work out the timm architecture (and kwargs) that a checkpoint was made for."""
    meta = obj.get("meta")
    if isinstance(meta, dict) and "arch" in meta:
        kwargs = dict(meta.get("model_kwargs") or {})
        if meta.get("family") == "resnet" and meta.get("image_size"):
            kwargs.setdefault("img_size", int(meta["image_size"]))
        return meta["arch"], kwargs
    if "pos_embed" in sd and "patch_embed.proj.weight" in sd:
        dim, _, p, _ = sd["patch_embed.proj.weight"].shape
        size = {192: "tiny", 384: "small", 768: "base", 1024: "large"}.get(dim)
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        grid = int(math.isqrt(sd["pos_embed"].shape[1] - 1))
        if size is None:
            raise WeightsError(f"ViT with embedding dim {dim} is not a standard size; pass --arch")
        arch = f"vit_{size}_patch{p}_{grid * p}"
        import timm

        kw: dict[str, Any] = {}
        if not timm.is_model(arch):
            arch, kw = f"vit_{size}_patch16_224", {"patch_size": p, "img_size": grid * p}
        default_depth = {"tiny": 12, "small": 12, "base": 12, "large": 24}[size]
        if depth != default_depth:
            kw["depth"] = depth
        return arch, kw
    if "layer1.0.conv1.weight" in sd:
        blocks = [len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
        bottleneck = "layer1.0.conv3.weight" in sd
        table = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet50" if bottleneck else "resnet34",
                 (3, 4, 23, 3): "resnet101", (3, 8, 36, 3): "resnet152"}
        if tuple(blocks) in table:
            return table[tuple(blocks)], {}
    raise WeightsError("cannot tell the architecture from the weights; pass --arch")


# --------------------------------------------------------------------------------------
# Resolving a source to a local file
# --------------------------------------------------------------------------------------


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
        raise WeightsNotFoundError(
            f"{s}: no such file. --weights takes a checkpoint/.pth/.safetensors path, "
            f"timm:<arch>.<tag> (e.g. timm:vit_small_patch16_224.dino) or an alias ({', '.join(ALIASES)})"
        )
    if path.is_dir():
        for name in ("checkpoint.pth", "model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise WeightsNotFoundError(f"{s}: a folder without checkpoint.pth or model.safetensors")
    return path


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@dataclass
class WeightsInfo:
    """Where loaded weights came from."""

    source: str
    path: str
    format: str
    sha256: str


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mis_shaped = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        arch = getattr(getattr(model, "dino_spec", None), "arch", type(model).__name__)

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = [f"{source}: weights do not fit {arch}"]
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatch: {show(mis_shaped)}")
        try:
            looks_like = f" The file looks like {_arch_from_checkpoint({}, sd)[0]} weights."
        except WeightsError:
            looks_like = ""
        raise IncompatibleWeightsError("; ".join(parts) + f".{looks_like} Check --arch (or omit it to infer it).")
    model.load_state_dict(sd, strict=True)


def _read_source(source: str | os.PathLike, checkpoint_key: str) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor], str]:
    """(local path, whole checkpoint, backbone state dict, format) of a weight source."""
    path = resolve_source(source)
    obj = read_checkpoint(path)
    sd, fmt = extract_backbone_state_dict(obj, checkpoint_key, source=str(source))
    return path, obj, sd, fmt


def _fill(model: nn.Module, sd: dict[str, torch.Tensor], source: str | os.PathLike, path: Path, fmt: str) -> WeightsInfo:
    _load_strict(model, sd, str(source))
    model.dino_weights = WeightsInfo(str(source), str(path), fmt, file_sha256(path))
    return model.dino_weights


def load_weights(model: nn.Module, source: str | os.PathLike, checkpoint_key: str = "teacher") -> WeightsInfo:
    """Load a weight source into a backbone, strictly. Returns where they came from."""
    path, _, sd, fmt = _read_source(source, checkpoint_key)
    return _fill(model, sd, source, path, fmt)


def load_backbone(
    weights: str | os.PathLike,
    arch: str | None = None,
    *,
    checkpoint_key: str = "teacher",
    **kwargs: Any,
) -> nn.Module:
    """Build the backbone that ``weights`` belongs to and load them.

    ``arch`` may be omitted for aliases, timm tags and checkpoints whose architecture can
    be read from their contents (dinoserve metadata, official ``args`` or the keys). When
    it is given and the file says how that same architecture was built (image size, depth,
    patch size), those settings are used; explicit ``kwargs`` win over both.
    """
    s = str(weights)
    if s in ALIASES:
        return create_backbone(s, pretrained=True, checkpoint_key=checkpoint_key, **kwargs)
    if s.startswith("timm:"):
        arch = arch or s[len("timm:"):].split(".")[0]
        return create_backbone(arch, weights=weights, checkpoint_key=checkpoint_key, **kwargs)
    path, obj, sd, fmt = _read_source(weights, checkpoint_key)
    try:
        found, found_kwargs = _arch_from_checkpoint(obj, sd)
    except WeightsError:
        if arch is None:
            raise
        found, found_kwargs = None, {}
    if arch is None:
        arch = found
    model = create_backbone(arch, **{**(found_kwargs if found == arch else {}), **kwargs})
    _fill(model, sd, weights, path, fmt)
    return model
