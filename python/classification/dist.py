"""Distributed setup for ``torchrun`` (NCCL on GPUs, gloo on CPU) and small helpers.

Without the ``torchrun`` environment (``RANK``/``WORLD_SIZE``) everything runs in one
process and the collectives below are no-ops; ``--fsdp`` then starts a process group
of one (FSDP2 needs a device mesh), on which they are trivial.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str | None, need_group: bool = False) -> DistInfo:
    """Read torchrun's environment, pick the device and start the process group.

    ``need_group``: start a process group of one process when not under ``torchrun``
    (FSDP2's device mesh needs one); otherwise one process runs without any.
    """
    want = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device(want)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if need_group and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        return DistInfo(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.device(want).type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device(want)
        backend = "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of numbers over all ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of ``value`` over all ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` (just ``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_buffers_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) to every rank.

    DDP broadcasts them at the start of each forward, so after the last training step
    every rank holds statistics updated by its own last batch; syncing them lets all
    ranks evaluate (and rank 0 save) one and the same model.
    """
    if not dist.is_initialized():
        return
    for b in module.buffers():
        dist.broadcast(b, src)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
