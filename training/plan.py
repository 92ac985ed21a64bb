"""The plan of a run: how many epochs, and the learning rate, weight decay and teacher
momentum of every step, fixed before the loop starts.

One change is allowed, at one point: with ``--plan-to-time-limit``, after the first
:data:`REPLAN_AFTER_STEPS` steps the epoch count becomes what the measured speed fits in
the time limit (:func:`replan`), so the schedules anneal before the time runs out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinoserve.training.config import TrainConfig
from dinoserve.training.schedules import cosine_schedule

#: Steps trained before ``--plan-to-time-limit`` plans the run; the first is not timed
#: because it warms up the kernels.
REPLAN_AFTER_STEPS = 6

#: Share of the time limit kept for checkpoints and evaluation when planning to it.
TIME_RESERVE = 0.05


@dataclass(frozen=True)
class Plan:
    """Epochs and per-step schedules; index a schedule with :meth:`position`."""

    epochs: int
    steps_per_epoch: int
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray

    def position(self, epoch: int, step_in_epoch: int) -> int:
        """Index into the schedules of batch ``step_in_epoch`` of ``epoch``."""
        return epoch * self.steps_per_epoch + step_in_epoch


def schedules(cfg: TrainConfig, epochs: int, steps_per_epoch: int, world_size: int) -> Plan:
    """The plan for ``epochs`` epochs: the reference's cosine schedules, the learning rate
    scaled linearly with the total batch (``lr * batch * world_size / 256``)."""
    total_batch = cfg.batch_size * world_size
    lr = cosine_schedule(cfg.lr * total_batch / 256, cfg.min_lr, epochs, steps_per_epoch, cfg.warmup_epochs)
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, epochs, steps_per_epoch)
    if cfg.momentum_constant:  # short runs: the cosine would freeze the teacher before the student learns
        momentum = np.full(epochs * steps_per_epoch, cfg.momentum_teacher)
    else:
        momentum = cosine_schedule(cfg.momentum_teacher, 1.0, epochs, steps_per_epoch)
    return Plan(epochs, steps_per_epoch, lr, wd, momentum)


def replan(cfg: TrainConfig, plan: Plan, steps_done: int, seconds_per_step: float, seconds_left: float,
           world_size: int) -> Plan:
    """``plan`` refitted to the time left: as many epochs (at least one) as the measured
    ``seconds_per_step`` fits in ``seconds_left`` less :data:`TIME_RESERVE`, counting the
    ``steps_done``; every schedule is rebuilt, so the learning rate still warms up, peaks and
    anneals within the run."""
    total_steps = steps_done + max(0.0, (1 - TIME_RESERVE) * seconds_left) / seconds_per_step
    epochs = max(1, int(round(total_steps / plan.steps_per_epoch)))
    return schedules(cfg, epochs, plan.steps_per_epoch, world_size)
