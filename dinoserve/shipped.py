"""What a clone of this repository ships beside the package: the model this project trained
on openclipart (``weights/``, with its record) and the fixed openclipart k-NN file list
(``data/openclipart_knn.csv``, images from Debian's ``openclipart-png``).

The record beside the weights (``<name>.json``) holds the command that made them, their
k-NN top-1, their training options and the file's sha256; :func:`shipped_record` checks
the file against it before anything trains on or serves it; :func:`choose` says when a model
fine-tuned from it is served instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinoserve.errors import WeightsError

#: The repository checkout this package runs from (an installed wheel has no weights/ or data/).
CHECKOUT = Path(__file__).resolve().parent.parent

#: The model this project trained on openclipart and ships: fp16 safetensors + record.
SHIPPED_WEIGHTS = CHECKOUT / "weights" / "dinoserve_resnet18_openclipart.safetensors"

#: The fixed k-NN protocol on openclipart: knn_train (bank), knn_val (queries), pool (unlabelled).
OPENCLIPART_CSV = CHECKOUT / "data" / "openclipart_knn.csv"
OPENCLIPART_ROOT = Path("/usr/share/openclipart/png")

_WAY_OUT = "pass --from-scratch to train from random initialisation, or --weights PATH for other weights"


def shipped_record(weights: str | Path = SHIPPED_WEIGHTS) -> dict[str, Any]:
    """The record beside a shipped weights file (``<name>.json``), after checking that the
    file is there and whole; a one-line error naming the file and the way out otherwise."""
    path = Path(weights)
    record_path = path.with_suffix(".json")
    if not path.is_file() or not record_path.is_file():
        missing = path if not path.is_file() else record_path
        raise WeightsError(f"{missing}: the shipped model is missing (a clone of the repository has it under "
                           f"weights/); {_WAY_OUT}")
    try:
        record = json.loads(record_path.read_text())
        expected = record["file_sha256"]
    except (ValueError, KeyError) as e:
        raise WeightsError(f"{record_path}: not a shipped-model record ({e}); {_WAY_OUT}") from None
    from dinoserve.models import file_sha256  # torch: only once the files are there

    if file_sha256(path) != expected:
        raise WeightsError(f"{path}: damaged or replaced (its sha256 is not the one in {record_path.name}); "
                           f"restore it with `git checkout -- {path.name}` or {_WAY_OUT}")
    return record


@dataclass
class Candidate:
    """A model that could be served, with its k-NN top-1 once measured."""

    label: str  # "shipped", "fine-tuned", "from scratch" or "--weights"
    weights: str
    arch: str | None
    image_size: int  # its model card's, unless the user chose another
    knn_top1: float | None = None  # the fixed split: what the serving rule compares
    fit: str = "crop"  # how images are fitted into its input (images.fit_image), as trained
    knn_loo: float | None = None  # leave-one-out over every labelled image (about half the error)


def choose(candidates: list[Candidate]) -> tuple[Candidate, str]:
    """The model to serve and why: the last (trained) one, unless it scores below the
    shipped one (the first) on k-NN."""
    chosen = candidates[-1]
    if len(candidates) == 1:
        return chosen, f"the {chosen.label} model"
    shipped, tuned = candidates[0], candidates[-1]
    if shipped.knn_top1 is None or tuned.knn_top1 is None:
        return tuned, "the fine-tuned model (no labels to compare it with the shipped one)"
    if tuned.knn_top1 < shipped.knn_top1:
        return shipped, (f"the shipped model: fine-tuning lowered k-NN top-1 from {shipped.knn_top1:.1f} % to "
                         f"{tuned.knn_top1:.1f} %, so the fine-tuned model is not served")
    return tuned, f"the fine-tuned model (k-NN {tuned.knn_top1:.1f} % >= shipped {shipped.knn_top1:.1f} %)"
