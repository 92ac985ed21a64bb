"""Teacher updates: the momentum (EMA) teacher and the paper's alternatives.

- ``ema``: after every step ``t <- m t + (1 - m) s`` on parameters (buffers such as
  BatchNorm statistics stay the teacher's own), with ``m`` following a cosine to 1;
- ``epoch``: the teacher is the student of the previous epoch, frozen during an epoch;
- ``copy``: the teacher equals the student after every step (the paper: does not converge).
"""

from __future__ import annotations

import torch
from torch import nn

TEACHER_UPDATES = ("ema", "epoch", "copy")


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t <- momentum * t + (1 - momentum) * s`` for every parameter (same order)."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


@torch.no_grad()
def copy_weights(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher parameters := student parameters."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.copy_(s)


def update_after_step(mode: str, teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    if mode == "ema":
        ema_update(teacher, student, momentum)
    elif mode == "copy":
        copy_weights(teacher, student)
    elif mode != "epoch":
        raise ValueError(f"teacher update {mode!r} is not one of {TEACHER_UPDATES}")


def update_at_epoch_start(mode: str, teacher: nn.Module, student: nn.Module) -> None:
    if mode == "epoch":
        copy_weights(teacher, student)
