"""Everything a training run does around its DINO steps: counters and clocks, log rows, the
progress bar, checkpoints (save and restore) and the stop checks.

:class:`Bookkeeper` is the one object the loop calls: ``timed(batches)`` around the batch
source, ``after_step`` after each step (True: stop now), ``end_epoch`` after a full epoch.
What changes as the run goes is in its :class:`Progress`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
import torch.distributed as dist

from dinoserve.errors import TrainingError
from dinoserve.training import distributed as D
from dinoserve.training.checkpoint import CHECKPOINT_NAME, rng_state, save_atomic, set_rng_state
from dinoserve.training.config import TrainConfig
from dinoserve.training.monitor import CollapseMonitor, JsonlLog, Throughput
from dinoserve.training.plan import Plan

if TYPE_CHECKING:  # the engine imports this module
    from dinoserve.training.engine import Run

logger = logging.getLogger("dinoserve.training")


@dataclass
class Progress:
    """What changes during a run."""

    step: int = 0  # steps taken, counting those before a resume
    images_seen: int = 0  # by this invocation, all processes together
    data_wait: float = 0.0  # seconds this invocation waited for batches
    first_step_done_at: float | None = None  # perf_counter after this invocation's first step
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    last_loss: float | None = None
    stopped: bool = False


class Bookkeeper:
    """Counts, logs, shows, saves and decides when to stop, for one run on one process
    (only the main process writes the log and the checkpoint)."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, t_start: float):
        self.cfg, self.info, self.t_start = cfg, info, t_start
        out = Path(cfg.out)
        self.log = JsonlLog(out / "log.jsonl" if info.is_main else None)
        self.checkpoint = out / CHECKPOINT_NAME
        self.progress = Progress()
        self.speed = Throughput()
        self.collapse = CollapseMonitor(cfg.out_dim)
        self._bar: Any = None

    # -- the loop's calls -------------------------------------------------------------

    def timed(self, batches: Iterable) -> Iterator:
        """``batches``, adding the time spent waiting for each to ``progress.data_wait``."""
        source = iter(batches)
        while True:
            t0 = time.perf_counter()
            batch = next(source, None)
            if batch is None:
                return
            self.progress.data_wait += time.perf_counter() - t0
            yield batch

    def start_epoch(self, plan: Plan, epoch: int, first_step: int) -> None:
        if first_step == 0:  # an epoch continued after its first steps keeps their loss and clock
            self.speed.reset()
            self.progress.epoch_loss_sum, self.progress.epoch_loss_steps = 0.0, 0
        if self._bar is None and first_step < plan.steps_per_epoch and self.info.is_main and self.cfg.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=plan.steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{plan.epochs}",
                             dynamic_ncols=True, leave=True)

    def after_step(self, run: "Run", plan: Plan, epoch: int, steps_in_epoch: int, stats: dict[str, float],
                   n_images: int) -> bool:
        """Account for the step that made ``steps_in_epoch`` of the epoch's batches done;
        True when the run must stop now (``--max-steps``, ``--time-limit``)."""
        p = self.progress
        p.step += 1
        p.images_seen += n_images * self.info.world_size
        self.speed.add(n_images * self.info.world_size)
        p.last_loss = stats["loss"]
        p.epoch_loss_sum += stats["loss"]
        p.epoch_loss_steps += 1
        if p.first_step_done_at is None:
            p.first_step_done_at = time.perf_counter()
        epoch_done = steps_in_epoch == plan.steps_per_epoch
        if self.info.is_main and (p.step % self.cfg.log_every == 0 or epoch_done):
            self._log_step(run, plan, epoch, plan.position(epoch, steps_in_epoch - 1), stats)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{p.last_loss:.3f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                                  H_t=f"{stats['teacher_entropy']:.2f}", img_s=f"{self.speed.rate:.1f}", refresh=False)
        if self.cfg.save_every and p.step % self.cfg.save_every == 0 and not epoch_done:
            self.save(run, plan, epoch, steps_in_epoch)
        p.stopped = self._should_stop()
        if (epoch_done or p.stopped) and self._bar is not None:
            self._bar.close()
            self._bar = None
        return p.stopped

    def end_epoch(self, epoch: int) -> float:
        """Log the finished ``epoch``; return its mean loss."""
        p = self.progress
        mean = p.epoch_loss_sum / p.epoch_loss_steps if p.epoch_loss_steps else float("nan")
        self.log.write("epoch", epoch=epoch, step=p.step, loss=mean, img_per_s=round(self.speed.rate, 2))
        return mean

    def seconds_per_step(self) -> float:
        """Mean time of the steps after the first (which warms up the kernels), the
        slowest process's."""
        per_step = (time.perf_counter() - self.progress.first_step_done_at) / max(self.progress.step - 1, 1)
        return float(D.all_reduce(torch.tensor(per_step), "max").item())

    def seconds_left(self) -> float:
        """Of ``--time-limit``, the least any process has left."""
        left = self.cfg.time_limit * 60 - (time.monotonic() - self.t_start)
        return float(D.all_reduce(torch.tensor(left), "min").item())

    # -- checkpoints ------------------------------------------------------------------

    def save(self, run: "Run", plan: Plan, epochs_done: int, steps_in_epoch: int) -> None:
        """The checkpoint (dino layout plus ``meta`` and ``progress``), on the main process;
        its ``args`` carry the planned epochs, so ``--resume`` continues this plan."""
        rngs = [rng_state(run.info.device)]
        if run.info.enabled:
            rngs = [None] * run.info.world_size
            dist.all_gather_object(rngs, rng_state(run.info.device))
        if not run.info.is_main:
            return
        state = {
            "student": run.nets.student.state_dict(), "teacher": run.nets.teacher.state_dict(),
            "optimizer": run.optimizer.state_dict(), "epoch": epochs_done,
            "args": {**run.cfg.to_dict(), "epochs": plan.epochs},
            "dino_loss": {"center": run.dino_loss.center.detach().cpu()},
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "meta": checkpoint_meta(run.nets.card, run.cfg),
            "progress": {"step": self.progress.step, "epoch_step": steps_in_epoch,
                         "steps_per_epoch": plan.steps_per_epoch, "world_size": run.info.world_size, "rng": rngs},
        }
        save_atomic(state, self.checkpoint)

    def restore(self, run: "Run", plan: Plan, resume: dict[str, Any]) -> tuple[int, int]:
        """Load a checkpoint into ``run``; return (epoch, batch within it) to start at."""
        nets = run.nets
        nets.student.load_state_dict(resume["student"])
        nets.teacher.load_state_dict(resume["teacher"])
        run.optimizer.load_state_dict(resume["optimizer"])
        run.dino_loss.center.copy_(resume["dino_loss"]["center"].to(run.info.device))
        if run.scaler is not None and resume.get("scaler"):
            run.scaler.load_state_dict(resume["scaler"])
        saved = resume["progress"]
        epoch, first_step, self.progress.step = int(resume["epoch"]), int(saved["epoch_step"]), int(saved["step"])
        if saved.get("steps_per_epoch") != plan.steps_per_epoch and first_step:
            raise TrainingError(f"--resume: the checkpoint stopped mid-epoch with {saved.get('steps_per_epoch')} steps "
                                f"per epoch, but this run has {plan.steps_per_epoch}; keep --batch-size and the "
                                f"process count")
        rngs = saved.get("rng", [])
        if len(rngs) == run.info.world_size:
            set_rng_state(rngs[run.info.rank], run.info.device)
        else:  # another process count: new, distinct streams
            torch.manual_seed(run.cfg.seed + run.info.rank + 1_000_003 * self.progress.step)
        return epoch, first_step

    # -- inside -----------------------------------------------------------------------

    def _log_step(self, run: "Run", plan: Plan, epoch: int, position: int, stats: dict[str, float]) -> None:
        row = dict(step=self.progress.step, epoch=epoch, lr=float(plan.lr[position]),
                   wd=float(plan.weight_decay[position]), momentum=float(plan.momentum[position]),
                   teacher_temp=run.dino_loss.teacher_temp(epoch), img_per_s=round(self.speed.rate, 2), **stats)
        if run.scaler is not None:
            row["grad_scale"] = float(run.scaler.get_scale())  # falling fast: fp16 overflow
        self.log.write("step", **row)
        if epoch >= max(1, math.ceil(self.cfg.warmup_epochs)):
            warning = self.collapse.check(row["loss"], row["teacher_mean_entropy"])
            if warning:
                logger.warning(warning)
                self.log.write("warning", step=self.progress.step, message=warning)

    def _should_stop(self) -> bool:
        stop = self.cfg.max_steps is not None and self.progress.step >= self.cfg.max_steps
        if self.cfg.time_limit is not None:
            late = torch.tensor(float(time.monotonic() - self.t_start > self.cfg.time_limit * 60))
            stop = stop or bool(D.all_reduce(late, "max").item())  # every process stops at the same step
        return stop


def checkpoint_meta(card: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Checkpoint ``meta``: the teacher backbone's model card, plus head and crop settings."""
    return {**card.to_dict(), "out_dim": cfg.out_dim, "hidden_dim": cfg.hidden_dim,
            "bottleneck_dim": cfg.bottleneck_dim, "head_layers": cfg.head_layers,
            "use_bn_in_head": cfg.use_bn_in_head, "norm_last_layer": cfg.norm_last_layer,
            "global_crop_size": cfg.global_crop_size, "local_crop_size": cfg.local_crop_size,
            "local_crops": cfg.local_crops, "format": "dinoserve-train-1"}
