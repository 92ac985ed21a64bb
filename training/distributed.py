"""Distributed set-up decided by the environment, the nanoGPT way.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; when ``RANK`` is present we join a
process group (nccl on CUDA, gloo on CPU), otherwise everything runs in one process and
no collective is ever called. Only the main process logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dinoserve.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: the process's CUDA device when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"--device {requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(requested_device: str = "auto") -> DistInfo:
    """Join the torchrun process group if ``RANK`` is set; pick this process's device."""
    if "RANK" not in os.environ:
        return DistInfo(device=resolve_device(requested_device))
    rank = int(os.environ["RANK"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown(info: DistInfo) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across processes when distributed; a no-op otherwise. CPU tensors are
    carried through the GPU under nccl, which reduces CUDA tensors only."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=reduce_op)
        t.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(t, op=reduce_op)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
