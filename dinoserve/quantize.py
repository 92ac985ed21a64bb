"""int8 for CPU serving: static (QDQ) quantisation of an exported graph, and its quality gate.

>>> from dinoserve.quantize import calibration_batch, quantize_int8, int8_quality
>>> batch, source = calibration_batch("photos/", size=224)             # uint8 [N, 3, 224, 224]
>>> quantize_int8("fp32/model.onnx", "int8/model.onnx", batch)
>>> report = int8_quality("fp32/model.onnx", "int8/model.onnx", batch)  # cosine, top-10 agreement

Why static QDQ and not dynamic: onnxruntime's dynamic quantisation turns convolutions into
``ConvInteger``, which runs a ResNet about four times slower than fp32; static QDQ with
activation ranges calibrated on real images lets onnxruntime fuse Conv/MatMul into its int8
kernels (VNNI/AMX where the CPU has them). The settings below are the fast ones: uint8
activations with int8 per-channel weights (the u8s8 kernels; int8 activations run slower
than fp32).

Why 7-bit weights by default (scheme ``u8s7``, onnxruntime's ``reduce_range``): on x86 CPUs
without VNNI the u8s8 kernels add pairs of products in saturating int16, and full-range
weights overflow it (:mod:`dinoserve.cpu` explains it). 7-bit weights are right on every CPU
and cost nothing measurable in speed or accuracy on a VNNI CPU
(``benchmarks/int8_portable.py``); ``u8s8`` stays available for VNNI-only fleets, and the
card records which one a model holds so that serving can refuse it on the wrong CPU.

Why a gate: one user's DINO model fell to ~25 % accuracy after QDQ quantisation. So every
int8 graph is compared with its fp32 graph on the calibration images: the mean cosine
similarity of their embeddings and how much of each image's top-10 neighbour list survives.
:func:`dinoserve.export.export_onnx` writes the int8 model only when both pass.

Images go through :func:`dinoserve.images.preprocess_batch`, the one preprocessing of the
project. No torch here.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dinoserve.contract import EMBEDDING, INPUT
from dinoserve.cpu import INT8_SCHEMES, PORTABLE, cpu_features, cpu_name
from dinoserve.errors import DataError, DinoserveError, ExportError
from dinoserve.filelist import find_images
from dinoserve.images import DEFAULT_CROP_PCT, l2_normalize, preprocess_batch
from dinoserve.onnx_files import model_files

__all__ = ["PORTABLE", "INT8_SCHEMES", "Int8Quality", "calibration_batch", "calibration_paths", "quantize_int8", "int8_quality",
           "weight_products", "neighbour_agreement", "row_cosines", "MIN_CALIBRATION", "VIT_OPS", "DEFAULT_CALIBRATION",
           "MIN_COSINE", "MIN_TOP10_AGREEMENT", "TOP_K"]

log = logging.getLogger(__name__)

#: Fewer images than this give activation ranges (and a gate) too noisy to trust.
MIN_CALIBRATION = 16
#: How many images a calibration uses by default (a seeded sample of a larger source).
DEFAULT_CALIBRATION = 256
#: Default gate: mean cosine of int8 to fp32 embeddings, and mean top-10 neighbour overlap.
MIN_COSINE = 0.99
MIN_TOP10_AGREEMENT = 0.8
TOP_K = 10
#: Images per gate batch (bounded memory at any calibration size).
_BATCH = 16
#: Images per calibration run. The calibration graph keeps every intermediate tensor of a run
#: alive, so its memory grows with this: at 224 px, 16 images per run peaked at 5.3 GB for
#: ViT-B/16 and 3.8 GB for ResNet-50, 2 images at 2.2 and 0.8 GB, in the same time and with
#: the same int8 graph bit for bit (min/max ranges merge exactly across runs).
_CALIBRATION_BATCH = 2


# --------------------------------------------------------------------------------------
# Calibration images
# --------------------------------------------------------------------------------------


def calibration_paths(source: str | os.PathLike, limit: int = DEFAULT_CALIBRATION, seed: int = 0) -> list[str]:
    """Image paths of ``source``: a folder (recursive, the one folder rule), a CSV file list
    (``path,category,split``) or a dinoserve index (its indexed images). A seeded sample of
    ``limit`` when there are more, so the same command calibrates the same way.

    Raises:
        DataError: ``source`` does not exist or holds no images.
    """
    src = Path(source).expanduser()
    fix = "pass --calibration with a folder of images, a CSV file list or an index"
    if not src.exists():
        raise DataError(f"calibration data {src}: no such file or folder; {fix}")
    if src.is_dir() and (src / "CURRENT").is_file():  # a dinoserve index (see dinoserve.index_store)
        from dinoserve.index import EmbeddingIndex

        try:
            paths = list(EmbeddingIndex.load(src, verify=False).paths)
        except DinoserveError as e:
            raise DataError(f"calibration data {src}: not a readable index ({e}); {fix}") from None
    elif src.is_dir() or src.suffix.lower() == ".csv":
        try:
            paths = [str(p) for p in find_images(src) if p.is_file()]
        except DataError as e:
            raise DataError(f"calibration data {e}; {fix}") from None
    else:
        raise DataError(f"calibration data {src}: not a folder, a .csv file list or a .index; {fix}")
    if not paths:
        raise DataError(f"calibration data {src}: holds no images (.png, .jpg, ...); {fix}")
    if len(paths) > limit:
        paths = sorted(random.Random(seed).sample(paths, limit))
    return paths


def calibration_batch(source: str | os.PathLike | Sequence[str], size: int, crop_pct: float = DEFAULT_CROP_PCT,
                      *, fit: str = "crop", limit: int = DEFAULT_CALIBRATION, minimum: int = MIN_CALIBRATION,
                      workers: int = 2) -> tuple[np.ndarray, str]:
    """The calibration images of ``source`` preprocessed to uint8 ``[N, 3, size, size]``, and a
    description of where they came from. Unreadable images are skipped; fewer than
    ``minimum`` readable ones is an error.

    Raises:
        DataError: missing source, no images, or too few readable ones (one line naming the
            source, the counts and the fix).
    """
    if isinstance(source, (str, os.PathLike)):
        paths, where = calibration_paths(source, limit), str(source)
    else:
        paths, where = [str(p) for p in source][:limit], f"{len(source)} listed images"
    batch, kept, skipped = preprocess_batch(paths, size, crop_pct, fit=fit, on_error="skip", workers=workers)
    if len(kept) < minimum:
        why = f" ({len(skipped)} unreadable, first: {skipped[0][1]})" if skipped else ""
        raise DataError(
            f"calibration data {where}: {len(kept)} readable images of {len(paths)}{why}; int8 calibration "
            f"needs at least {minimum} (a few hundred is best): pass --calibration with more images"
        )
    if skipped:
        log.warning("calibration: skipped %d unreadable images of %s", len(skipped), where)
    return batch, f"{len(kept)} images from {where}"


# --------------------------------------------------------------------------------------
# Quantisation
# --------------------------------------------------------------------------------------


def _reader(batch: np.ndarray, input_name: str = INPUT):
    """An onnxruntime CalibrationDataReader over a uint8 batch, in runs of ``_CALIBRATION_BATCH``."""
    from onnxruntime.quantization import CalibrationDataReader

    step = _CALIBRATION_BATCH

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._chunks = iter([{input_name: batch[i:i + step]} for i in range(0, len(batch), step)])

        def get_next(self):
            return next(self._chunks, None)

    return Reader()


#: Operators quantised in a ViT: only the products with a weight matrix (see
#: :func:`weight_products`). Quantising LayerNorm, Softmax, GELU and the residual adds as
#: well costs too much accuracy: a random-init ViT-S/16's mean cosine to fp32 fell to 0.94
#: (min 0.60), against 0.9996 with matrix products only.
VIT_OPS = ("Conv", "MatMul", "Gemm")


def weight_products(graph_path: str | os.PathLike) -> list[str]:
    """Names of the nodes of :data:`VIT_OPS` whose second input is a stored weight.

    Why not every MatMul: with attention's two activation products (q @ k^T,
    probabilities @ v) quantised on both sides, onnxruntime fuses the softmax between them
    into ``QLinearSoftmax``, which is several times slower than the float softmax (measured
    on ViT-S/16), so attention left in float makes the whole int8 graph faster.
    """
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    weights |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return [n.name for n in graph.node
            if n.op_type in VIT_OPS and len(n.input) > 1 and n.input[1] in weights]


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray,
                  *, family: str = "resnet", per_channel: bool = True, scheme: str = PORTABLE) -> Path:
    """Write a static QDQ int8 copy of the fp32 graph at ``fp32_path`` to ``out_path``.

    Activation ranges come from running ``calibration`` (uint8 ``[N, 3, H, W]``, as clients
    send) through the graph (min/max). Activations are uint8 and weights int8, per output
    channel by default. A ResNet has every supported operator quantised (so Conv, Relu and
    Add fuse into int8 kernels); a ViT (``family="vit"``) only its products with weight
    matrices (:func:`weight_products`), so attention stays float. The uint8 input and its
    normalisation stay as they are; the outputs stay float32, so the graph's contract (and
    Triton's config) does not change.

    ``scheme`` (:data:`dinoserve.cpu.INT8_SCHEMES`): ``u8s7`` (default) int8 weights in 7
    bits, right on every CPU; ``u8s8`` full-range int8 weights, right only on CPUs with VNNI
    or AMX-INT8; ``u8u8`` uint8 weights (onnxruntime's u8u8 kernels, which widen to int16 and
    never saturate).

    Raises:
        ExportError: onnxruntime's quantiser failed (the message names the graph), or an
            unknown ``scheme``.
    """
    if scheme not in INT8_SCHEMES:
        raise ExportError(f"int8 scheme {scheme!r}: choose one of {', '.join(INT8_SCHEMES)} "
                          f"({PORTABLE} is right on every CPU)")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    external = len(model_files(fp32_path)) > 1  # over protobuf's 2 GiB: every copy keeps its weights outside
    with tempfile.TemporaryDirectory(prefix="dinoserve-quant-", dir=out_path.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            # Folds constants and fuses patterns first, so fewer QDQ pairs are needed. The
            # symbolic shape pass is skipped: it cannot follow a ViT's dynamic spatial axes.
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True, save_as_external_data=external)
        except Exception as e:  # noqa: BLE001 - a graph the pre-pass cannot handle is quantised as is
            log.info("quantisation pre-processing skipped for %s (%s)", fp32_path, e)
            pre = fp32_path
        try:
            quantize_static(
                str(pre), str(out_path), _reader(calibration), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QUInt8 if scheme == "u8u8" else QuantType.QInt8, per_channel=per_channel,
                reduce_range=scheme == PORTABLE,
                calibrate_method=CalibrationMethod.MinMax, calibration_providers=["CPUExecutionProvider"],
                # int8 weights symmetric, -127..127 (onnxruntime's default, said here because ARM's
                # NEON kernel without dot product wraps on a -128 weight against a 0 activation)
                extra_options={"WeightSymmetric": scheme != "u8u8"},
                op_types_to_quantize=list(VIT_OPS) if family == "vit" else None,
                nodes_to_quantize=weight_products(pre) if family == "vit" else None,
                use_external_data_format=external,
            )
        except DinoserveError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises many types here
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"int8 quantisation of {fp32_path} failed: {type(e).__name__}: {first}") from e
    return out_path


# --------------------------------------------------------------------------------------
# The quality gate
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Quality:
    """How close an int8 graph's embeddings are to its fp32 graph's, on the same images."""

    images: int
    mean_cosine: float  # mean over images of cos(int8 embedding, fp32 embedding)
    min_cosine: float
    top10_agreement: float  # mean over images of |top-10 neighbours fp32 & int8| / 10
    min_cosine_required: float = MIN_COSINE
    top10_agreement_required: float = MIN_TOP10_AGREEMENT
    # Where the gate ran: the figures hold for CPUs with the same int8 kernels (dinoserve.cpu).
    scheme: str = ""
    cpu: str = ""
    cpu_features: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """True when both figures clear their thresholds."""
        return self.mean_cosine >= self.min_cosine_required and self.top10_agreement >= self.top10_agreement_required

    def describe(self) -> str:
        """One line with the figures and the thresholds."""
        return (f"mean cosine to fp32 {self.mean_cosine:.4f} (needs >= {self.min_cosine_required:g}, "
                f"min {self.min_cosine:.4f}), top-{TOP_K} neighbour agreement {self.top10_agreement:.3f} "
                f"(needs >= {self.top10_agreement_required:g}) on {self.images} calibration images"
                + (f", {self.scheme} on a CPU with {' '.join(self.cpu_features) or 'no listed features'}"
                   if self.scheme else ""))

    def to_dict(self) -> dict:
        """Every field plus ``passed``, for JSON."""
        return {**asdict(self), "cpu_features": list(self.cpu_features), "passed": self.passed}


def _embeddings(path: Path, batch: np.ndarray) -> np.ndarray:
    from dinoserve.ort_session import open_session

    session = open_session(path, device="cpu")
    out = [session.run([EMBEDDING], {INPUT: batch[i:i + _BATCH]})[0] for i in range(0, len(batch), _BATCH)]
    return np.concatenate(out).astype(np.float64)


def neighbour_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = TOP_K) -> float:
    """Mean fraction of each row's ``k`` nearest other rows (cosine) that ``candidate`` keeps."""
    k = min(k, len(reference) - 1)
    if k < 1:
        return 1.0

    def top(x: np.ndarray) -> np.ndarray:
        x = l2_normalize(x.astype(np.float32))
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)  # an image is not its own neighbour
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = top(reference), top(candidate)
    return float(np.mean([len(set(ra) & set(rb)) / k for ra, rb in zip(a, b)]))


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``candidate`` to the same row of ``reference`` (float64); a row
    with a NaN counts as the worst match, -1."""
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cos = np.sum(reference * candidate, axis=1) / np.maximum(norms, 1e-12)
    return np.where(np.isfinite(cos), cos, -1.0)


def int8_quality(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, images: np.ndarray, *,
                 min_cosine: float = MIN_COSINE, min_agreement: float = MIN_TOP10_AGREEMENT,
                 scheme: str = "") -> Int8Quality:
    """Compare the int8 graph (quantised with ``scheme``) with the fp32 graph on ``images``
    (uint8 ``[N, 3, H, W]``), on this CPU: the result names its features, because the int8
    kernels onnxruntime runs (and a u8s8 model's accuracy) depend on them."""
    ref = _embeddings(Path(fp32_path), images)
    got = _embeddings(Path(int8_path), images)
    cos = row_cosines(ref, got)
    return Int8Quality(len(images), float(cos.mean()), float(cos.min()), neighbour_agreement(ref, got),
                       float(min_cosine), float(min_agreement), scheme, cpu_name(), tuple(cpu_features()))

