"""What carries a side-by-side run (``benchmarks/peer_lightly.py``) from one machine to the next.

A 50-epoch comparison takes more CPU hours than one session has, and a later session often
runs on a fresh machine without the run folder. So, as ``benchmarks/long_run.py`` does for
the long run, each trainer's current teacher (backbone and DINO head, fp16) and its per-epoch
rows are packaged into ``weights/progress/<results name>_<trainer>_seed<N>.safetensors`` and
``.json``, to be committed. A session that finds the run folder gone continues from them:
student and teacher both start from the packaged teacher, at the epoch the record names, with
the learning-rate schedule where the whole plan has it then. Lost are the optimizer's momentum
and the loss's center (both rebuilt within a few steps), the same for both trainers; every
record lists its segments, so a reader sees where a trainer was continued this way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import machine
from benchmarks.long_run import PROGRESS, repo_relative

LIGHTLY_FORMAT = "peer-lightly-teacher-1"
#: lightly's teacher modules (keys of run_lightly's ``stateful``) and their prefixes in the file
LIGHTLY_PARTS = {"teacher": "backbone.", "teacher_head": "head."}


def packaged_path(name: str, trainer: str, seed: int) -> Path:
    """Where a trainer's packaged teacher lives (its record: the same path, ``.json``)."""
    return PROGRESS / f"{name}_{trainer}_seed{seed}.safetensors"


def read_record(target: Path) -> dict[str, Any] | None:
    """The packaged record beside ``target``, or None when there is none."""
    f = target.with_suffix(".json")
    return json.loads(f.read_text()) if f.is_file() else None


def segment(how: str, first_epoch: int) -> dict[str, Any]:
    """A new segment of a run: how it began, at which epoch, on which CPU."""
    return {"how": how, "first_epoch": first_epoch, "last_epoch": first_epoch,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": machine()["cpu"]}


def _write_record(target: Path, record: dict[str, Any]) -> None:
    from dinoserve.atomic import atomic_write_text

    record = {**record, "file": repo_relative(target), "machine": machine()}
    atomic_write_text(target.with_suffix(".json"), json.dumps(record, indent=1) + "\n")


def package_lightly(saved: dict[str, Any], target: Path) -> dict[str, Any]:
    """lightly's teacher from ``saved`` (the state its per-epoch checkpoint holds) to fp16
    ``target`` + record (the weights first, both written atomically, so a stop between them
    leaves a record that names fewer epochs, never more). Returns the record."""
    from safetensors.torch import save

    from dinoserve.atomic import atomic_write
    from dinoserve.training.checkpoint import packed_fp16

    tensors = {prefix + k: packed_fp16(v) for part, prefix in LIGHTLY_PARTS.items() for k, v in saved[part].items()}
    data = save(tensors, metadata={"format": LIGHTLY_FORMAT})
    atomic_write(target, lambda f: f.write(data))
    record = {"trainer": "lightly", "epochs_done": len(saved["rows"]), "epochs_planned": saved["epochs_planned"],
              "steps_per_epoch": saved["steps_per_epoch"], "segments": saved["segments"], "rows": saved["rows"]}
    _write_record(target, record)
    return record


def load_lightly(target: Path, nets: dict) -> None:
    """Student and teacher (backbone and head) both from the packaged teacher in ``target``."""
    from safetensors.torch import load_file

    fix = f"restore it (git checkout -- {target.name}) or remove it and its .json to start this trainer over"
    try:
        tensors = load_file(target)
    except Exception as e:  # safetensors raises its own error types for a damaged header or body
        raise SystemExit(f"{target}: not readable as safetensors ({e}); {fix}") from None
    for part, prefix in LIGHTLY_PARTS.items():
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise SystemExit(f"{target}: no '{prefix}' tensors, not a packaged lightly teacher "
                             f"(format {LIGHTLY_FORMAT}); {fix}")
        student = "student" if part == "teacher" else "head"
        for name in (part, student):
            nets[name].load_state_dict(state)  # copies into the fp32 parameters


def package_dinoserve(out: Path, target: Path, run: dict[str, Any], planned: int) -> dict[str, Any]:
    """Our trainer's teacher from its checkpoint in ``out`` to fp16 ``target`` (the format
    ``--pretrained`` reads, with the head) + record of ``run`` (as the results JSON keeps it).
    Returns the record."""
    from dinoserve.training.checkpoint import package_teacher

    facts = package_teacher(out / "checkpoint.pth", target, with_head=True)
    # our trainer stops mid-epoch at its time limit (lightly's loop at an epoch's end): the
    # teacher has trained these steps of the next epoch, which a continuation runs again whole
    record = {"trainer": "dinoserve", "epochs_done": facts["epoch"], "epochs_planned": planned,
              "teacher_steps_into_next_epoch": facts["epoch_step"],
              **{k: run[k] for k in ("precision", "images", "steps_per_epoch") if k in run},
              "segments": run["segments"], "rows": run["epochs"]}
    _write_record(target, record)
    return record
