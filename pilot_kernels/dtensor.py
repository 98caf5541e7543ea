"""The few DTensor (FSDP2) operations the package needs, in one place.

Under FSDP2 each parameter is a DTensor sharded over a device mesh.  The optimizer
updates local shards, and any sum over a model (the L1 norm, sparsity counts) is a
per-rank partial sum that must be all-reduced over the mesh dims the tensors are
sharded on: a collective, so every rank has to call it.
"""
from __future__ import annotations

from typing import Iterable

import torch.distributed as dist
from torch import Tensor

try:  # absent from minimal torch builds
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor, Shard = (), ()

__all__ = ["DTensor", "local", "shard_groups", "all_reduce_over_shards_"]


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that writes through), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_groups(tensors: Iterable[Tensor]) -> list:
    """Process groups of the mesh dims the first DTensor among ``tensors`` is sharded
    on (FSDP2 shards every parameter the same way); empty for plain tensors."""
    ref = next((t for t in tensors if isinstance(t, DTensor)), None)
    if ref is None:
        return []
    return [ref.device_mesh.get_group(i) for i, pl in enumerate(ref.placements) if isinstance(pl, Shard)]


def all_reduce_over_shards_(partial: Tensor, groups: list) -> Tensor:
    """Sum per-rank partial results over ``groups`` in place (a collective); returns it."""
    for group in groups:
        dist.all_reduce(partial, group=group)
    return partial
