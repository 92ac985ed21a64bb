"""Export a DINO backbone to ONNX into a Triton model repository, verified against PyTorch.

The exported graph (see docs/DESIGN.md, "ONNX and Triton contract"):

- input ``images``: UINT8 ``[B, 3, H, W]``; the graph converts to float and normalises;
- output ``embedding``: FP32 ``[B, D]``;
- output ``attention`` (ViTs): FP32 ``[B, heads, H/p, W/p]``, the last block's CLS attention
  over the patches (register tokens left out);
- output ``patch_tokens`` (``patch_tokens=True``; ViTs and ConvNeXts): FP32 ``[B, N, D]``;
- the batch dimension is dynamic, and so are a ViT's ``H`` and ``W`` (multiples of the patch)
  and a ConvNeXt's (32 px or more);
- ``config.pbtxt`` is written by :mod:`dinoserve.repository` and carries the backbone's
  :class:`~dinoserve.card.ModelCard` (with the export's image size, crop and precision).

:func:`export_onnx` builds everything in a staging folder next to the repository, runs
the ONNX file with onnxruntime against the PyTorch model on real (decoded, preprocessed)
images, and only then renames the new version into place. A failed export leaves the
repository exactly as it was.

With ``int8=True`` the verified fp32 graph is then quantised (static QDQ,
:mod:`dinoserve.quantize`) with activation ranges from the user's calibration images, and the
int8 graph replaces it only if it passes the quality gate against the fp32 graph on those
images (mean cosine, top-10 neighbour agreement). A graph that fails is never written.
"""

from __future__ import annotations

import copy
import gc
import io
import logging
import os
import re
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from dinoserve.atomic import fsync_path
from dinoserve.attention import AttentionTap
from dinoserve.card import ModelCard
from dinoserve.contract import INPUT, output_names
from dinoserve.errors import DinoserveError, ExportError, ModelFileError
from dinoserve.images import DEFAULT_CROP_PCT, ImageInput, check_fit, normalize, preprocess_batch, walk_images
from dinoserve.models import backbone_card, backbone_outputs, forward_outputs, load_backbone, patch_token_error
from dinoserve.onnx_attention import use_onnx_attention
from dinoserve.onnx_files import model_files, needs_external_data, save_model
from dinoserve.ort_session import open_session
from dinoserve.registry import memory_shortfall, not_exportable
from dinoserve.repository import (ONNX_FILENAME, check_writable, commit_version, latest_version, staging_folder,
                                  write_model_config)

__all__ = ["ExportResult", "export_onnx", "ExportWrapper", "sample_images"]

log = logging.getLogger(__name__)

#: Opset 23: its ``Attention`` operator carries a ViT's attention in one node
#: (:mod:`dinoserve.onnx_attention`), and its ``Gelu`` (since opset 20) is fused by
#: onnxruntime with the bias before it, where an erf decomposition runs as five operators;
#: together they bring a ViT-S/16 fp32 graph level with PyTorch eager on one thread.
#: OpenVINO reads both operators (tested); onnxruntime's CUDA provider lists kernels for them.
OPSET = 23
#: Default max abs difference allowed between onnxruntime and PyTorch, per unit of the
#: reference's largest magnitude (so a backbone with large activations is not failed for
#: float rounding): fp32 export and fp16 export.
TOLERANCE_FP32 = 1e-4
TOLERANCE_FP16 = 5e-2

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote."""

    model_dir: Path
    version: int
    onnx_path: Path
    max_abs_diff: float  # onnxruntime vs PyTorch, over every verified output and size
    card: ModelCard  # as written into config.pbtxt
    image_size: int = 0
    tolerance: float = 0.0
    sizes_checked: tuple[tuple[int, int], ...] = ()
    int8: Any = None  # dinoserve.quantize.Int8Quality of an int8 export, None otherwise
    calibration: str = ""  # where an int8 export's calibration images came from
    files: tuple[Path, ...] = ()  # model.onnx, then model.onnx.data when the weights are kept outside it


class ExportWrapper(nn.Module):
    """The exported graph: uint8 images -> normalised float -> backbone -> outputs.

    For ViTs an :class:`~dinoserve.attention.AttentionTap` (the one
    :func:`dinoserve.models.forward_with_attention` uses) stays installed on the last block,
    so the ``attention`` output is the tensor PyTorch code sees; the other blocks' attention
    exports as one ONNX ``Attention`` operator (:mod:`dinoserve.onnx_attention`) where it is
    a plain timm attention; DINOv3's RoPE attention keeps timm's forward, whose fused
    attention the exporter turns into the same operator. The outputs are
    :func:`dinoserve.models.backbone_outputs`, the function verification calls.
    Both change the backbone, so pass a copy.
    """

    def __init__(self, backbone: nn.Module, fp16: bool = False, patch_tokens: bool = False):
        super().__init__()
        card = backbone_card(backbone)
        self.backbone = backbone.half() if fp16 else backbone
        self.fp16 = fp16
        self.patch_tokens = patch_tokens
        self.register_buffer("mean", torch.tensor(card.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(card.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.tap = AttentionTap(backbone) if card.family == "vit" else None
        if self.tap is not None:  # the tapped block keeps the path that exposes its probabilities
            use_onnx_attention(backbone, keep=[self.tap.module])

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """uint8 ``[B, 3, H, W]`` images -> the outputs of :func:`dinoserve.contract.output_names`."""
        # Same arithmetic as dinoserve.images.normalize, so clients and the graph agree.
        x = (images.to(torch.float32) / 255.0 - self.mean) / self.std
        if self.fp16:
            x = x.half()
        outputs = [o.float() for o in backbone_outputs(self.backbone, x, self.tap, self.patch_tokens)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


# --------------------------------------------------------------------------------------
# Verification inputs
# --------------------------------------------------------------------------------------


def sample_images(n: int = 4, size: int = 96, seed: int = 0) -> list[bytes]:
    """``n`` small encoded PNG pictures (shapes, gradients, noise) for verification.

    They are decoded and preprocessed by :mod:`dinoserve.images` exactly like user images,
    so verification exercises the real input path without needing a dataset.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = size + 16 * (i % 3), size + 8 * (i % 2)  # varied aspect ratios
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
        noise = rng.integers(0, 40, (h, w, 3))
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            x1, y1 = x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=colour)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _verify_inputs(images: Sequence[ImageInput] | str | os.PathLike | None, size: int, crop_pct: float) -> np.ndarray:
    if images is None:
        images = sample_images()
    elif isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise ExportError(f"verify images {folder}: not a folder of images")
        images = walk_images(folder)[:8]  # the one folder rule, as training and the index use
        if not images:
            raise ExportError(f"verify images {folder}: holds no .png/.jpg/... images")
    batch, _, _ = preprocess_batch(list(images), size, crop_pct)
    return batch


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def export_onnx(
    weights: str | os.PathLike | None = None, *, name: str, arch: str | None = None,
    model: nn.Module | None = None, repo: str | os.PathLike = "model_repository", image_size: int | None = None,
    max_batch: int = 64, fp16: bool = False, device: str = "cpu", trt_fp16: bool = False,
    verify_images: Sequence[ImageInput] | str | os.PathLike | None = None, tolerance: float | None = None,
    checkpoint_key: str = "teacher", crop_pct: float = DEFAULT_CROP_PCT, fit: str | None = None,
    int8: bool = False, calibration: Sequence[str] | str | os.PathLike | None = None,
    min_cosine: float | None = None, min_agreement: float | None = None, int8_scheme: str | None = None,
    patch_tokens: bool = False, external_data: bool | None = None,
) -> ExportResult:
    """Export a backbone as the next version of ``<repo>/<name>`` and verify it.

    Args:
        weights: any weight source of :func:`dinoserve.models.load_backbone` (a dinoserve
            checkpoint, an official DINO file, ``timm:<arch>.<tag>``, a ``.safetensors``
            file or an alias such as ``dino_vits16``).
        name: the Triton model name (folder name).
        arch: the timm architecture, when it cannot be read from the weights.
        model: an already built backbone from :func:`dinoserve.models.create_backbone`,
            instead of ``weights`` (used by tests).
        repo: the model repository folder (created if missing).
        image_size: the input size clients send; the backbone's own size by default.
        max_batch: Triton's ``max_batch_size``.
        fp16: half-precision weights and compute inside the graph; inputs and outputs
            stay uint8/float32. Verified with a looser tolerance.
        device: ``cpu`` or ``gpu``: Triton's instance kind, and onnxruntime's provider
            for verification when CUDA is available.
        trt_fp16: add Triton's TensorRT FP16 accelerator to the config (GPU only).
        verify_images: images (or a folder of them) to verify with; generated by default.
        tolerance: max abs difference allowed per unit of the reference's magnitude.
        checkpoint_key: ``teacher`` or ``student`` for training checkpoints.
        crop_pct: the evaluation crop recorded for clients.
        fit: how clients fit images into the input, ``"crop"`` or ``"pad"``
            (:func:`dinoserve.images.fit_image`); default what the model was trained with.
        int8: quantise to int8 (static QDQ) for CPU serving, gated against the fp32 graph.
        calibration: int8 calibration images: a folder, a CSV file list, a dinoserve index or
            a list of paths. Default: the training data a dinoserve checkpoint names.
        min_cosine: int8 gate, mean cosine to fp32 embeddings (default 0.99).
        min_agreement: int8 gate, mean top-10 neighbour overlap with fp32 (default 0.8).
        int8_scheme: ``u8s7`` (default: 7-bit weights, right on every CPU), ``u8u8`` or
            ``u8s8`` (full-range weights, right only on CPUs with VNNI or AMX-INT8; serving
            refuses it elsewhere); recorded in the card (:mod:`dinoserve.cpu`).
        patch_tokens: add the ``patch_tokens`` output, float32 ``[B, N, D]``: the final-normed
            patch tokens in row-major order (a ViT's CLS and register tokens left out).
        external_data: keep the weights in ``model.onnx.data`` beside ``model.onnx``. By
            default only when they are over
            :data:`~dinoserve.onnx_files.SINGLE_FILE_MAX_BYTES` (protobuf caps one file at
            2 GiB: DINOv2 ViT-g, DINOv3 ViT-H+).

    Raises:
        ExportError: bad arguments, an unwritable repository, an export or a verification
            failure. Weight errors (:class:`~dinoserve.errors.WeightsError`) pass through.
    """
    _check_args(name, device, trt_fp16, max_batch, image_size, weights, model)
    _check_precision(int8, fp16, calibration, int8_scheme)
    repo = Path(repo).expanduser().absolute()
    check_writable(repo)
    if int8:  # bad calibration data fails here, before minutes of export work
        int8_scheme = _check_int8_scheme(int8_scheme)
        calibration = calibration if calibration is not None else _training_data_of(weights)
    model = model if model is not None else _load_exportable(weights, arch, checkpoint_key)
    short = memory_shortfall(weight_bytes(model), int8=int8)
    if short:  # refused now, not after minutes of work and the machine swapping
        fix = "export it without --int8 (fp32 or --fp16) here, or" if int8 else "export it"
        raise ExportError(f"{backbone_card(model).arch}: {short}; {fix} on a machine with more memory")
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    card = _export_card(model, image_size, crop_pct, fit, precision, int8_scheme or "", patch_tokens)
    tol = tolerance if tolerance is not None else (TOLERANCE_FP16 if fp16 else TOLERANCE_FP32)
    batch = _verify_inputs(verify_images, card.image_size, crop_pct)
    gate = _Int8Gate.calibrate(calibration, card, crop_pct, min_cosine, min_agreement) if int8 else None

    model_dir = repo / name
    version = (latest_version(model_dir) or 0) + 1
    with staging_folder(repo) as stage:
        onnx_path = stage / name / str(version) / ONNX_FILENAME
        onnx_path.parent.mkdir(parents=True)
        if external_data is None:
            external_data = needs_external_data(weight_bytes(model, fp16))
        _torch_export(model, card, onnx_path, fp16=fp16, size=card.image_size, patch_tokens=patch_tokens,
                      external_data=external_data)
        diff, sizes = _verify(model, card, onnx_path, batch, tol, device, crop_pct, verify_images, patch_tokens)
        quality = None
        if gate is not None:
            del model  # the quantiser holds the graph several times over; a ViT-g is 4.5 GB per copy
            gc.collect()
            quality = gate.quantize(onnx_path, card.family)
        write_model_config(stage / name, name, card, max_batch=max_batch, device=device, trt_fp16=trt_fp16,
                           patch_tokens=patch_tokens)
        names = [p.name for p in model_files(onnx_path)]
        for n in names:
            fsync_path(onnx_path.parent / n)
        commit_version(stage / name, model_dir, version)
    log.info("exported %s version %d to %s (max abs diff %.3g)", name, version, model_dir, diff)
    final = model_dir / str(version)
    return ExportResult(model_dir, version, final / ONNX_FILENAME, diff, card, card.image_size, tol, sizes,
                        quality, gate.source if gate is not None else "", tuple(final / n for n in names))


def weight_bytes(model: nn.Module, fp16: bool = False) -> int:
    """Bytes of ``model``'s parameters and buffers as an exported graph stores them."""
    def size(t: torch.Tensor) -> int:
        return t.numel() * (2 if fp16 and t.is_floating_point() else t.element_size())

    return sum(size(t) for t in [*model.parameters(), *model.buffers()])


def _load_exportable(weights: Any, arch: str | None, checkpoint_key: str) -> nn.Module:
    """The backbone ``weights`` hold, refused before any weights are read when its
    architecture cannot be exported."""
    named = arch or (str(weights)[len("timm:"):].split(".")[0] if str(weights).startswith("timm:") else "")
    if not_exportable(named):
        raise ExportError(f"{named}: {not_exportable(named)}")
    return load_backbone(weights, arch, checkpoint_key=checkpoint_key)


def _export_card(model: nn.Module, image_size: int | None, crop_pct: float, fit: str | None, precision: str,
                 int8_scheme: str, patch_tokens: bool) -> ModelCard:
    """The card ``config.pbtxt`` carries: what the model is, and what clients must do to feed it."""
    built = backbone_card(model)
    if patch_tokens and patch_token_error(built):
        raise ExportError(f"--patch-tokens: {patch_token_error(built)}")
    size = int(image_size or built.image_size)
    _check_size(built, size)
    return built.replace(image_size=size, crop_pct=float(crop_pct), fit=check_fit(fit or built.fit),
                         precision=precision, int8_scheme=int8_scheme)


@dataclass
class _Int8Gate:
    """An int8 export's calibration images and the bar its int8 graph must clear."""

    calibration: np.ndarray
    source: str  # where the calibration images came from, for messages and the result
    scheme: str
    min_cosine: float | None
    min_agreement: float | None

    @classmethod
    def calibrate(cls, calibration: Any, card: ModelCard, crop_pct: float, min_cosine: float | None,
                  min_agreement: float | None) -> "_Int8Gate":
        """Read the calibration images, preprocessed as the served model's clients will."""
        from dinoserve import quantize

        batch, source = quantize.calibration_batch(calibration, card.image_size, crop_pct, fit=card.fit)
        return cls(batch, source, card.int8_scheme, min_cosine, min_agreement)

    def quantize(self, onnx_path: Path, family: str):
        """Replace the verified fp32 graph at ``onnx_path`` by its int8 copy if the copy
        passes the gate; the :class:`~dinoserve.quantize.Int8Quality` measured."""
        from dinoserve import quantize

        int8_path = onnx_path.with_name("model.int8.onnx")
        quantize.quantize_int8(onnx_path, int8_path, self.calibration, family=family, scheme=self.scheme)
        quality = quantize.int8_quality(
            onnx_path, int8_path, self.calibration, scheme=self.scheme,
            min_cosine=quantize.MIN_COSINE if self.min_cosine is None else self.min_cosine,
            min_agreement=quantize.MIN_TOP10_AGREEMENT if self.min_agreement is None else self.min_agreement)
        if not quality.passed:
            raise ExportError(f"int8 model refused: {quality.describe()} ({self.source}); the repository is "
                              f"unchanged; export without --int8, or try other --calibration images")
        log.info("int8 gate passed: %s", quality.describe())
        if len(model_files(onnx_path)) == 1:
            os.replace(int8_path, onnx_path)
        else:  # int8 weights are a quarter of fp32's: often one file again, named as export names it
            import onnx

            save_model(onnx.load(str(int8_path)), onnx_path)
            for path in model_files(int8_path):
                path.unlink()
        return quality


def _training_data_of(weights: Any) -> str:
    """The training data a dinoserve checkpoint records (its ``args["data"]``), for int8 calibration."""
    fix = "pass --calibration with a folder of images, a CSV file list or a dinoserve index (a few hundred images)"
    data = None
    if weights is not None and Path(str(weights)).is_file():
        try:
            from dinoserve.weights import read_checkpoint

            args = read_checkpoint(weights).get("args")
            data = args.get("data") if isinstance(args, dict) else getattr(args, "data_path", None)
        except Exception:  # noqa: BLE001 - not a checkpoint we can read: no default to offer
            data = None
    if not data:
        raise ExportError(f"--int8 needs calibration images and the weights name no training data; {fix}")
    if not Path(str(data)).exists():
        raise ExportError(f"--int8: the training data {data} recorded in {weights} is not here; {fix}")
    return str(data)


def _check_args(name: str, device: str, trt_fp16: bool, max_batch: int, image_size: int | None,
                weights: Any, model: Any) -> None:
    if not _NAME.match(name or ""):
        raise ExportError(
            f"model name {name!r} is not a valid Triton model folder name: use letters, digits, "
            f"'_', '-' and '.', starting with a letter or digit"
        )
    if device not in ("cpu", "gpu"):
        raise ExportError(f"--device {device!r}: use 'cpu' or 'gpu'")
    if trt_fp16 and device != "gpu":
        raise ExportError("--trt-fp16 needs --device gpu: TensorRT runs on NVIDIA GPUs only")
    if max_batch < 1:
        raise ExportError(f"--max-batch {max_batch}: must be at least 1")
    if image_size is not None and image_size < 1:
        raise ExportError(f"--image-size {image_size}: must be positive")
    if (weights is None) == (model is None):
        raise ExportError("pass exactly one of weights (--weights) or model")


def _check_precision(int8: bool, fp16: bool, calibration: Any, int8_scheme: str | None) -> None:
    if int8 and fp16:
        raise ExportError("--int8 and --fp16 exclude each other: choose one precision")
    if not int8 and calibration is not None:
        raise ExportError("--calibration is for --int8 exports only; add --int8 or leave it out")
    if not int8 and int8_scheme is not None:
        raise ExportError("--int8-scheme is for --int8 exports only; add --int8 or leave it out")


def _check_int8_scheme(int8_scheme: str | None) -> str:
    """``int8_scheme``, or the default that is right on every CPU; an error for an unknown one."""
    from dinoserve import quantize

    scheme = int8_scheme or quantize.PORTABLE
    if scheme not in quantize.INT8_SCHEMES:
        raise ExportError(f"--int8-scheme {int8_scheme!r}: choose one of {', '.join(quantize.INT8_SCHEMES)} "
                          f"({quantize.PORTABLE}, the default, is right on every CPU)")
    return scheme


#: The smallest input a ConvNeXt takes: its four stages downsample 32 times.
CONVNEXT_MIN_SIZE = 32


def _check_size(card: ModelCard, size: int) -> None:
    """One line naming the sizes ``card``'s architecture takes when ``size`` is not one."""
    p = card.patch_size
    if card.family == "vit" and size % p:
        lower, upper = size - size % p, size - size % p + p
        near = f"{lower} or {upper}" if lower else f"{upper}"
        raise ExportError(f"--image-size {size}: {card.arch} takes multiples of its patch size {p} (e.g. {near})")
    if card.family == "convnext" and size < CONVNEXT_MIN_SIZE:
        raise ExportError(f"--image-size {size}: {card.arch} takes sizes of {CONVNEXT_MIN_SIZE} px or more "
                          f"(its stages downsample 32 times)")


def _torch_export(model: nn.Module, card: ModelCard, path: Path, *, fp16: bool, size: int,
                  patch_tokens: bool = False, external_data: bool = False) -> None:
    # Traced on the CPU whatever the model's device: the graph itself is device-free.
    wrapper = ExportWrapper(copy.deepcopy(model).cpu().float().eval(), fp16=fp16, patch_tokens=patch_tokens).eval()
    # Batch 2 and a patch grid of at least 2 x 2: the exporter specialises any axis of size 1.
    side = max(size, 2 * card.patch_size)
    example = torch.zeros(2, 3, side, side, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    outputs = output_names(card.family, patch_tokens)
    if card.family == "vit":
        p = card.patch_size
        hp, wp = torch.export.Dim("h_patches", min=1, max=4096), torch.export.Dim("w_patches", min=1, max=4096)
        dynamic = {INPUT: {0: batch, 2: p * hp, 3: p * wp}}
    elif card.family == "convnext":  # convolutions and a global pool: any size from 32 px
        h, w = (torch.export.Dim(n, min=CONVNEXT_MIN_SIZE, max=16384) for n in ("height", "width"))
        dynamic = {INPUT: {0: batch, 2: h, 3: w}}
    else:
        dynamic = {INPUT: {0: batch}}
    try:
        # The exporter prints progress lines and warns about onnxscript internals; the CLI
        # reports what matters.
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (example,), str(path), dynamo=True, opset_version=OPSET,
                external_data=external_data, input_names=[INPUT], output_names=outputs,
                dynamic_shapes=dynamic, optimize=True, verbose=False,
            )
    except DinoserveError:
        raise
    except Exception as e:  # the exporter raises many types; all mean "this model did not export"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"ONNX export of {card.arch} failed: {type(e).__name__}: {first}") from e
    if not path.is_file():
        raise ExportError(f"ONNX export of {card.arch} wrote no file at {path}")


@torch.no_grad()
def _reference(model: nn.Module, card: ModelCard, batch: np.ndarray, patch_tokens: bool = False) -> list[np.ndarray]:
    # The reference is the exact float32 model on the CPU: on a GPU, cuDNN's default TF32
    # convolutions alone differ from float32 by ~1e-4.
    on_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    # No copy when there is nothing to convert: a ViT-g is 4.5 GB per copy.
    reference = model if on_cpu else copy.deepcopy(model).cpu().float()
    training = reference.training
    x = torch.from_numpy(normalize(batch, card.mean, card.std))
    try:
        return [t.numpy() for t in forward_outputs(reference.eval(), x, patch_tokens).values()]
    finally:
        reference.train(training)


def _verify(model: nn.Module, card: ModelCard, onnx_path: Path, batch: np.ndarray, tol: float,
            device: str, crop_pct: float, verify_images: Any,
            patch_tokens: bool = False) -> tuple[float, tuple[tuple[int, int], ...]]:
    """Run onnxruntime and PyTorch on the same uint8 batch; raise above tolerance.

    ViTs and ConvNeXts are also checked at a second, non-square size, so the dynamic spatial
    axes are proven to work, not just declared.
    """
    try:
        # "gpu" uses CUDA when this onnxruntime build has it and the CPU otherwise.
        session = open_session(onnx_path, device="auto" if device == "gpu" else "cpu")
    except ModelFileError as e:
        raise ExportError(f"onnxruntime cannot load the exported graph of {card.arch}: {e}") from e
    batches = [batch]
    if card.family in ("vit", "convnext"):
        p = card.patch_size
        big = _verify_inputs(verify_images, batch.shape[2] + 2 * p, crop_pct)
        batches.append(np.ascontiguousarray(big[:3, :, : batch.shape[2] + p, :]))  # non-square
    worst = 0.0
    sizes = []
    names = output_names(card.family, patch_tokens)
    for b in batches:
        ref = _reference(model, card, b, patch_tokens)
        try:
            got = session.run(names, {INPUT: b})
        except Exception as e:
            raise ExportError(f"onnxruntime failed on a {tuple(b.shape)} batch of {card.arch}: {e}") from e
        for name, r, g in zip(names, ref, got):
            if g.shape != r.shape:
                raise ExportError(f"ONNX output {name!r} has shape {g.shape}, PyTorch {r.shape}")
            diff = float(np.max(np.abs(g.astype(np.float64) - r)))
            limit = tol * max(1.0, float(np.max(np.abs(r))))
            if not np.isfinite(diff) or diff > limit:
                raise ExportError(
                    f"verification failed: onnxruntime {name!r} differs from PyTorch by {diff:.3g} "
                    f"(allowed {limit:.3g}) at input {tuple(b.shape)}; the repository is unchanged"
                )
            worst = max(worst, diff)
        sizes.append((int(b.shape[2]), int(b.shape[3])))
    return worst, tuple(sizes)
