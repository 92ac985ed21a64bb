"""Optimiser set-up and the gradient surgery of a DINO step.

- :func:`param_groups`: group 0 holds the regularised weights (ndim > 1, not biases), group
  1 the rest with weight decay 0; the weight-decay schedule writes group 0 only.
- :func:`build_optimizer`: AdamW, SGD (momentum 0.9) or LARS.
- :func:`set_lr_and_weight_decay`: a step's values of the two schedules.
- :func:`clip_gradients`: each parameter's gradient norm clipped on its own.
- :func:`cancel_last_layer_grads`: the head's last layer is frozen for the first epoch(s).
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: decayed (ndim > 1, not bias) and not decayed (biases, norms, gains)."""
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".bias") or p.ndim <= 1:
            not_regularized.append(p)
        else:
            regularized.append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio ``eta * ||w|| / ||g + wd w||``, applied
    to parameters with ndim > 1 only (biases and norms take plain SGD steps)."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(dp)
                    trust = torch.where((p_norm > 0) & (d_norm > 0), g["eta"] * p_norm / d_norm,
                                        torch.ones_like(p_norm))
                    dp = dp.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def build_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """lr and weight decay start at 0: the schedules set them before every step. AdamW and
    SGD use the fused kernels (CPU and CUDA): on a CPU the default per-tensor AdamW step of
    a resnet18 costs as much as its forward and backward passes together."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, fused=True)
    if name == "lars":
        return LARS(groups)
    raise ValueError(f"optimizer {name!r} is not one of adamw, sgd, lars")


def set_lr_and_weight_decay(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """This step's rates: ``lr`` for every group, ``weight_decay`` for the first, the
    regularised one (:func:`param_groups`: biases and norms are not decayed)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Scale each parameter's gradient so its own L2 norm is at most ``clip``; return the
    norms before clipping (one tensor, no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads, 2.0))
    coefs = (clip / (norms.float() + 1e-6)).clamp(max=1.0)
    for g, c in zip(grads, coefs.unbind()):
        g.mul_(c.to(g.dtype))
    return norms


def cancel_last_layer_grads(model: nn.Module, epoch: int, freeze_epochs: int) -> None:
    """Drop the gradients of the head's last layer during the first ``freeze_epochs``."""
    if epoch >= freeze_epochs:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
