"""Checkpoints in the facebookresearch/dino layout, written atomically.

``checkpoint.pth`` holds ``student`` and ``teacher`` (plain module state dicts, keys
``backbone.*`` and ``head.*``), ``optimizer``, ``epoch`` (finished epochs), ``args`` (the
config as a plain dict), ``dino_loss`` (``{"center": ...}``), ``scaler``, ``meta`` (the
teacher backbone's :class:`~dinoserve.card.ModelCard` plus head and crop settings),
and ``progress``: what an exact resume needs (global step, step within the epoch, RNG
states, skipped files). Everything is tensors, containers and plain values, so
``torch.load(weights_only=True)`` -- :func:`dinoserve.models.read_checkpoint` -- reads it.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from dinoserve.atomic import atomic_write
from dinoserve.errors import TrainingError, UnreadableWeightsError
from dinoserve.models import read_checkpoint

CHECKPOINT_NAME = "checkpoint.pth"


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temp file, fsync and rename: a crash at any moment leaves
    either the old checkpoint or the new one, never half of one."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files that a run killed while writing ``path`` left beside it (the
    atomic write names them ``.<name>.*.tmp``); return what was removed."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_for_resume(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``<out_dir>/checkpoint.pth`` for ``--resume``; a clear error when it is missing
    or not one of ours."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise TrainingError(f"--resume: {path} does not exist; start without --resume or point --out at a run folder")
    try:
        ckpt = read_checkpoint(path)
    except UnreadableWeightsError as e:
        raise TrainingError(
            f"--resume: {path}: {e.problem}. Restore it from a copy, or start a new run without "
            f"--resume in another --out folder"
        ) from None
    missing = [k for k in ("student", "teacher", "optimizer", "epoch", "args", "dino_loss", "meta", "progress") if k not in ckpt]
    if missing:
        raise TrainingError(f"--resume: {path} is not a dinoserve training checkpoint (no {', '.join(missing)})")
    return ckpt


#: ``format`` in the metadata of a packaged teacher: its model card travels in the file.
PACKAGED_FORMAT = "dinoserve-shipped-1"


def packed_fp16(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as packaged: fp16 when floating point (half the size, and features equal to
    about 1e-3), integers (BatchNorm's step count) as they are; contiguous for safetensors."""
    return (tensor.half() if tensor.is_floating_point() else tensor).contiguous()


def teacher_in_fp16(ckpt: dict[str, Any], parts: tuple[str, ...] = ("backbone.",)) -> dict[str, torch.Tensor]:
    """The teacher tensors of a training checkpoint whose names start with one of ``parts``,
    packed by :func:`packed_fp16`."""
    return {k: packed_fp16(v) for k, v in ckpt["teacher"].items() if k.startswith(parts)}


def package_teacher(checkpoint: str | os.PathLike, target: str | os.PathLike,
                    with_head: bool = False) -> dict[str, Any]:
    """Write the teacher backbone of a training ``checkpoint`` as fp16 ``.safetensors`` with
    its model card in the metadata (what ``weights/`` ships and ``--pretrained`` reads),
    atomically: an interrupted write leaves the previous file. ``with_head`` keeps the DINO
    head too, so that ``--pretrained`` continues training with it. Returns the checkpoint's
    ``args``, ``meta``, ``epoch`` (epochs finished), ``step`` and ``epoch_step`` (steps
    into the next epoch when it stopped mid-epoch, at ``--time-limit``)."""
    from safetensors.torch import save

    ckpt = read_checkpoint(checkpoint)
    # a DINO head (6M parameters for resnet18's) would double a file that is only served
    tensors = teacher_in_fp16(ckpt, ("backbone.", "head.") if with_head else ("backbone.",))
    data = save(tensors, metadata={"format": PACKAGED_FORMAT, "card": json.dumps(ckpt["meta"])})
    atomic_write(target, lambda f: f.write(data))
    return {"args": ckpt["args"], "meta": ckpt["meta"], "epoch": int(ckpt["epoch"]),
            "step": int(ckpt["progress"]["step"]), "epoch_step": int(ckpt["progress"].get("epoch_step", 0))}
