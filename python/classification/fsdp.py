"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``train.py --fsdp``.

* :func:`shard_model` — ``fully_shard`` on every block that holds parameters, then on
  the root.  Blocks are torchvision's residual/encoder blocks (``BasicBlock``,
  ``Bottleneck``, …); every ``Conv``/``Linear`` outside such a block (the default CNN's
  layers, a ResNet's stem and classifier) is a unit of its own; what is left
  (BatchNorm of the stem, …) belongs to the root.  FSDP2 all-gathers a unit's
  parameters in one buffer and needs one dtype per unit, so with ``--param-dtype bf16``
  (BatchNorm kept in fp32) the BatchNorm layers of each block form a unit of their own.
* :func:`full_state_dicts` / :func:`load_full_state_dicts` — the checkpoint as full,
  plain tensors on rank 0 (``get_model_state_dict``/``get_optimizer_state_dict`` with
  ``full_state_dict=True, cpu_offload=True``), and back, sharded, from rank 0's copy
  (``broadcast_from_rank0=True``).  The model part has the same keys as an unsharded
  model's ``state_dict()``; the optimizer part is keyed by parameter name (FQN) —
  :func:`optimizer_sd_to_ids` / :func:`optimizer_sd_to_fqns` convert between that and
  ``optimizer.state_dict()``'s positional ids, so DDP and FSDP checkpoints resume
  each other.
* :func:`unsharded_copy` — a plain model holding the full weights on every rank (for
  the sweep and the export).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# torchvision building blocks that form one FSDP unit each.
BLOCK_CLASSES = ("BasicBlock", "Bottleneck", "InvertedResidual", "EncoderBlock", "CNBlock", "MBConv", "FusedMBConv",
                 "SwinTransformerBlock", "SwinTransformerBlockV2")
_LAYER_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def fsdp_units(model: nn.Module, split_batchnorm: bool) -> list[Any]:
    """The modules (or lists of modules, one unit each) to ``fully_shard`` before the
    root, innermost first."""
    units: list[Any] = []
    inside: set[int] = set()
    for m in model.modules():
        if m is model or id(m) in inside or type(m).__name__ not in BLOCK_CLASSES or not _has_params(m):
            continue
        inside.update(id(s) for s in m.modules())
        if split_batchnorm:
            bns = [b for b in m.modules() if isinstance(b, _BN) and _has_params(b)]
            if bns:
                units.append(bns if len(bns) > 1 else bns[0])
        units.append(m)
    for m in model.modules():
        if m is not model and id(m) not in inside and isinstance(m, _LAYER_CLASSES) and _has_params(m):
            units.append(m)
    if split_batchnorm:
        rest = [b for b in model.modules() if id(b) not in inside and isinstance(b, _BN) and _has_params(b)]
        if rest:
            units.append(rest if len(rest) > 1 else rest[0])
    return units


def shard_model(model: nn.Module, device_type: str, world_size: int, split_batchnorm: bool = False) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over a 1-D mesh of all ranks; returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    for unit in fsdp_units(model, split_batchnorm):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ---------------------------------------------------------------------- state dicts
def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(model_sd, optimizer_sd)`` as full CPU tensors on rank 0 (empty elsewhere).
    A collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load rank 0's full state dicts into the sharded ``model`` and ``optimizer`` (the
    other ranks may pass empty dicts).  A collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in its (state_dict id) order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _is_fqn_keyed(sd: dict) -> bool:
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    return bool(ids) and isinstance(ids[0], str)


def optimizer_sd_to_fqns(sd: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An ``optimizer.state_dict()`` (positional ids) keyed by parameter names instead,
    as ``get_optimizer_state_dict`` writes it; unchanged if it already is."""
    if _is_fqn_keyed(sd):
        return sd
    names = _param_names(model, optimizer)
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise ValueError(f"the checkpoint's optimizer holds {len(ids)} tensors, this one {len(names)}: the model differs")
    to_name = dict(zip(ids, names))
    return {"state": {to_name[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [to_name[i] for i in g["params"]]} for g in sd["param_groups"]]}


def optimizer_sd_to_ids(sd: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of :func:`optimizer_sd_to_fqns` (for ``optimizer.load_state_dict``)."""
    if not _is_fqn_keyed(sd):
        return sd
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    missing = [n for g in sd["param_groups"] for n in g["params"] if n not in index]
    if missing:
        raise ValueError(f"the checkpoint's optimizer has tensors this model lacks: {missing[:5]}")
    return {"state": {index[n]: s for n, s in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]}


# ---------------------------------------------------------------------- full copy
def unsharded_copy(model: nn.Module, fresh: nn.Module) -> nn.Module:
    """Load the sharded ``model``'s full weights and buffers into the plain ``fresh``
    (same architecture, already on the device and in the dtype wanted) on every rank.
    A collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    fresh.load_state_dict(sd, strict=True)
    return fresh
