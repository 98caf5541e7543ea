"""Worker processes for test_distributed.py (spawned; importable by module name)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from pilot_kernels import PILoT, sparsity_report

WORLD = 2
STEPS = 3
HPARAMS = dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3)


def model_fn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Odd sizes: the FSDP2 shards of the first weight are uneven (4 and 3 rows).
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))


def batches(steps: int = STEPS, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 6, generator=g) for _ in range(steps)]


def train(model, opt, xs, rank: int, world: int) -> None:
    for x in xs:
        shard = x.chunk(world)[rank]
        opt.zero_grad()
        model(shard).pow(2).mean().backward()
        opt.step()


def single_process_reference() -> dict:
    model = model_fn()
    opt = PILoT(model.parameters(), **HPARAMS)
    train(model, opt, batches(), 0, 1)
    return {"params": [p.detach().clone() for p in model.parameters()], "l1": opt.l1_norm(),
            "zeros": sparsity_report(model, opt, threshold=0.1).layer_zeros}


def _init(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)
    model = nn.parallel.DistributedDataParallel(model_fn())
    opt = PILoT(model.parameters(), **HPARAMS)
    train(model, opt, batches(), rank, WORLD)
    torch.save({"params": [p.detach() for p in model.module.parameters()], "l1": opt.l1_norm()},
               os.path.join(out_dir, f"ddp{rank}.pt"))
    dist.destroy_process_group()


def ddp_after_optimizer_worker(rank: int, init_file: str, out_dir: str) -> None:
    """The Accelerate order: each rank builds its own model (another seed per rank) and
    optimizer, then DDP, whose broadcast of rank 0's weights is a write to PILoT."""
    _init(rank, init_file)
    model = model_fn(seed=rank)
    opt = PILoT(model.parameters(), **HPARAMS)
    ddp = nn.parallel.DistributedDataParallel(model)
    broadcast = [p.detach().clone() for p in model.parameters()]
    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = 0.0  # one step that keeps the weights: they must stay rank 0's
    train(ddp, opt, batches(1), rank, WORLD)
    kept = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = lr
    train(ddp, opt, batches(), rank, WORLD)
    torch.save({"broadcast": broadcast, "kept": kept, "params": [p.detach() for p in model.parameters()],
                "state": [{k: v for k, v in opt.state[p].items()} for p in model.parameters()]},
               os.path.join(out_dir, f"ddp_after{rank}.pt"))
    dist.destroy_process_group()


def _sharded(seed: int = 0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = model_fn(seed)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, PILoT(model.parameters(), **HPARAMS)


def fsdp2_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    _init(rank, init_file)
    model, opt = _sharded()
    w = model[0].weight
    state = opt.state[w]
    assert isinstance(w, DTensor) and isinstance(state["m"], DTensor)
    assert state["m"].placements == w.placements and state["m"].to_local().shape == w.to_local().shape
    train(model, opt, batches(), rank, WORLD)
    result = {
        "params": [p.full_tensor() for p in model.parameters()],
        "l1": opt.l1_norm(),
        "m_full": state["m"].full_tensor(),
        "zeros": sparsity_report(model, opt, threshold=0.1).layer_zeros,  # counted over the shards
    }

    # Save through torch.distributed.checkpoint, load into a fresh model and optimizer
    # (built from another seed), continue both: they must agree exactly.
    ckpt = os.path.join(out_dir, "dcp")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=ckpt)
    fresh, fresh_opt = _sharded(seed=123)
    sd = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(fresh, sd["model"])
    set_optimizer_state_dict(fresh, fresh_opt, sd["optim"])
    more = batches(seed=7)
    train(model, opt, more, rank, WORLD)
    train(fresh, fresh_opt, more, rank, WORLD)
    result["resumed_equal"] = all(
        torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(model.parameters(), fresh.parameters())
    ) and all(
        torch.equal(opt.state[a][k].full_tensor(), fresh_opt.state[b][k].full_tensor())
        for a, b in zip(model.parameters(), fresh.parameters())
        for k, v in opt.state[a].items() if isinstance(v, torch.Tensor)
    )
    result["l1_resumed"] = (opt.l1_norm(), fresh_opt.l1_norm())
    torch.save(result, os.path.join(out_dir, f"fsdp{rank}.pt"))
    dist.destroy_process_group()


# TargetSparsity: its measure and decisions under DDP (replicated) and FSDP2 (sharded).
TARGET = dict(target=0.6, total_epochs=4, tolerance=0.05)
TARGET_ACCS = (0.5, 0.7, 0.6)  # the same on every rank, as a trainer's all-reduced accuracy


def _drive_target(model, opt, rank: int, world: int) -> dict:
    from pilot_kernels.schedules import TargetSparsity, prunable_share

    sched = TargetSparsity(opt, **TARGET)
    shares = []
    for i, acc in enumerate(TARGET_ACCS):
        train(model, opt, batches(seed=10 + i), rank, world)
        shares.append(prunable_share(opt, TARGET["target"]))
        sched.step(acc)
    return {"shares": torch.stack(shares), "state": sched.state_dict(),
            "alphas": [g["alpha"] for g in opt.param_groups]}


def target_sparsity_reference() -> dict:
    model = model_fn()
    opt = PILoT(model.parameters(), **HPARAMS)
    result = _drive_target(model, opt, 0, 1)
    result["weights"] = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    return result


def target_sparsity_worker(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)
    ddp = nn.parallel.DistributedDataParallel(model_fn())
    result = {"ddp": _drive_target(ddp, PILoT(ddp.parameters(), **HPARAMS), rank, WORLD)}
    model, opt = _sharded()
    result["fsdp"] = _drive_target(model, opt, rank, WORLD)
    result["fsdp_local_numel"] = model[0].weight.to_local().numel()
    torch.save(result, os.path.join(out_dir, f"target{rank}.pt"))
    dist.destroy_process_group()
