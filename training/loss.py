"""The DINO loss: cross-entropy between a sharpened, centred teacher and the student.

``P_t = softmax((t - c) / tau_t)`` over the two global crops, ``P_s = softmax(s / tau_s)``
over every crop; the loss averages ``-sum_k P_t log P_s`` over all (teacher crop i, student
crop v) pairs with ``v != i``. After the loss, :meth:`DINOLoss.update_center` moves the
center ``c`` (a registered buffer, so it is checkpointed) towards the batch mean of the
teacher outputs, all-reduced across processes when distributed training is running.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    """Cross-entropy of centred/sharpened teacher vs student over multi-crop pairs."""

    def __init__(self, out_dim: int, ncrops: int, *, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
                 epochs: int = 100, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # teacher temperature per epoch: linear warmup, then constant
        self.teacher_temps = np.concatenate([
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.full(max(epochs - warmup_teacher_temp_epochs, 0), teacher_temp),
        ])

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def teacher_probs(self, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Centred, sharpened teacher distribution (no gradient)."""
        return F.softmax((teacher_output.float() - self.center) / self.teacher_temp(epoch), dim=-1).detach()

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """``student_output``: ``[ncrops * B, K]``; ``teacher_output``: ``[2 * B, K]`` (global
        crops first, as the student's). Returns the scalar loss; call :meth:`update_center`
        afterwards."""
        student = (student_output.float() / self.student_temp).chunk(self.ncrops)
        teacher = self.teacher_probs(teacher_output, epoch).chunk(2)
        total, terms = 0.0, 0
        for i, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == i:
                    continue  # the same view for teacher and student carries no signal
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher outputs' mean, over all processes' batches."""
        t = teacher_output.float()
        stats = torch.cat([t.sum(dim=0), t.new_tensor([t.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


@torch.no_grad()
def teacher_entropy(probs: torch.Tensor) -> tuple[float, float]:
    """Mean per-sample entropy of the teacher distribution, and the entropy of its batch
    mean (both in nats). Per-sample entropy near ln K: uniform collapse; batch-mean entropy
    near 0: everything assigned to one prototype."""
    p = probs.float().clamp_min(1e-12)
    per_sample = -(p * p.log()).sum(dim=-1).mean()
    mean = p.mean(dim=0)
    return float(per_sample), float(-(mean * mean.log()).sum())
