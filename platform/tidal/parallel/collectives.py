"""The few collectives the training code uses, each a no-op on a single rank (or when no
process group is up), so the same code runs in one process and on N workers."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def distributed(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


def broadcast(obj: Any, world: int) -> Any:
    """Rank 0's value of ``obj`` (any JSON-like value) on every rank."""
    if not distributed(world):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: int) -> None:
    if distributed(world):
        dist.barrier()


def all_true(flag: bool, world: int, device: torch.device = torch.device("cpu")) -> bool:
    """Whether ``flag`` holds on every rank (``device``: where the process group's
    collectives run, CUDA for NCCL)."""
    if not distributed(world):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_true(flag: bool, world: int, device: torch.device = torch.device("cpu")) -> bool:
    """Whether ``flag`` holds on some rank."""
    if not distributed(world):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    """The element-wise sum over ranks of ``values`` (in place when distributed)."""
    if distributed(world):
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_max(values: torch.Tensor, world: int) -> torch.Tensor:
    """The element-wise maximum over ranks of ``values`` (in place when distributed)."""
    if distributed(world):
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values
