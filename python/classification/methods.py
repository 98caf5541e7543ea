"""The four training methods: optimizer, α schedule and the per-step extras.

========  ==========================================================================
dense     ``torch.optim.SGD`` on the plain weights ``x``
pilot     :class:`pilot_kernels.PILoT`, ``β = 1``, adaptive α (paper Algorithm 1); the
          trainer's no-flag job on the embedded data steers α to 97% sparsity instead
spred     :class:`pilot_kernels.PILoT`, ``β = 0``, constant α (Ziyin & Wang, 2023)
l1        ``torch.optim.SGD`` on ``x`` plus the explicit L1 subgradient ``α·sign(x)``
          on the tensors with ``ndim >= 2`` (:func:`pilot_kernels.sparsity.add_l1_subgradient_`)
========  ==========================================================================

α lives in the param groups for every method but dense: PILoT's ``alpha``, and for l1
an ``"alpha"`` entry of SGD's group that the training step reads (so that it travels
with the optimizer's state_dict and an α schedule can drive it).

Target sparsity (``--target-sparsity S``).  pilot and spred get
:class:`pilot_kernels.schedules.TargetSparsity` (``--alpha-schedule target``) on their
reparameterized tensors; l1 gets the same controller on SGD's ``"alpha"``, measuring
the tensors with ``ndim >= 2``; dense has no α and is only pruned to ``S`` at the end.
The trainer decides ``S`` and α0 (``flags.py``: ``MAIN_JOB_TARGET``, ``TARGET_ALPHA_STEPS``).

Weight decay.  ``dense``/``l1`` use ``--wd`` on every tensor (torchvision's habit).
``pilot``/``spred`` use two param groups: the reparameterized tensors (``ndim >= 2``)
get ``--x-weight-decay`` (PILoT's ``weight_decay``: an L2 term on ``m ⊙ w``), the others
(BatchNorm, biases) get ``--wd``, which defaults to 0 for these methods — the paper's
ImageNet setting.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from pilot_kernels import PILoT
from pilot_kernels.schedules import (
    AdaptiveAlpha,
    AlphaScheduler,
    ConstantAlpha,
    GeometricAlpha,
    HarmonicAlpha,
    QuadraticAlpha,
    TargetSparsity,
    prunable_share,
)
from pilot_kernels.init import splits_by_default
from pilot_kernels.dtensor import all_reduce_over_shards_, local, shard_groups
from pilot_kernels.sparsity import sparsity_report

METHODS = ("dense", "pilot", "spred", "l1")
ALPHA_SCHEDULES = ("adaptive", "constant", "geometric", "harmonic", "quadratic", "target")
# ε of TargetSparsity in the trainer: the relative drop of the epoch's train accuracy
# from its best that still lets α grow (looser than the library's 0.01, which a high α's
# few-epoch dip in train accuracy keeps tripping; docs/trainer.md has the measurements).
TARGET_ACC_TOLERANCE = 0.03
# Default weight decay on the tensors that are not reparameterized / on all tensors.
DEFAULT_WD = {"dense": 1e-4, "l1": 1e-4, "pilot": 0.0, "spred": 0.0}


def uses_pilot(method: str) -> bool:
    return method in ("pilot", "spred")


def default_beta(method: str) -> float:
    return 0.0 if method == "spred" else 1.0


def build_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """The optimizer of ``args.method`` over ``model``'s parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not uses_pilot(args.method):
        # l1: one group as for dense, carrying the α that the step's α·sign(x) reads.
        groups = [{"params": params, "alpha": args.alpha}] if args.method == "l1" else params
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                               weight_decay=args.wd)
    reparam = [p for p in params if splits_by_default(p)]
    rest = [p for p in params if not splits_by_default(p)]
    groups = [{"params": reparam, "weight_decay": args.x_weight_decay, "reparam": True}]
    if rest:
        groups.append({"params": rest, "weight_decay": args.wd, "reparam": False})
    return PILoT(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                 alpha=args.alpha, beta=args.beta)


def weights(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's tensors with ``ndim >= 2``: the ones α sparsifies and the sweep prunes."""
    return [p for g in optimizer.param_groups for p in g["params"] if splits_by_default(p)]


def build_alpha_scheduler(optimizer: torch.optim.Optimizer, args, epochs: int,
                          chance: Optional[float] = None) -> Optional[AlphaScheduler]:
    """The α schedule (stepped once per epoch); ``None`` for dense, and for l1 without
    ``--target-sparsity`` (its α stays constant).  ``chance`` (train top-1 of a uniform
    guess, in percent) lets the accuracy-driven schedules cut α instead of raising it
    while the model sits at chance."""
    pilot = isinstance(optimizer, PILoT)
    kind = args.alpha_schedule
    # l1 with --target-sparsity resolves to "target" too (l1 takes no other schedule).
    if kind == "target" and (pilot or args.method == "l1"):
        return TargetSparsity(optimizer, args.target_sparsity, epochs, tolerance=args.share_tolerance,
                              acc_tolerance=TARGET_ACC_TOLERANCE, measure=None if pilot else weights(optimizer),
                              chance=chance)
    if not pilot:
        return None
    if kind == "adaptive":
        return AdaptiveAlpha(optimizer, total_epochs=epochs, delta=args.delta, l1_threshold=args.l1_threshold,
                             chance=chance)
    if kind == "constant":
        return ConstantAlpha(optimizer)
    if kind == "geometric":
        return GeometricAlpha(optimizer, p=args.alpha_p)
    if kind == "harmonic":
        return HarmonicAlpha(optimizer)
    if kind == "quadratic":
        return QuadraticAlpha(optimizer)
    raise ValueError(f"unknown --alpha-schedule {kind!r}; choose from {ALPHA_SCHEDULES}")


def step_alpha(scheduler: Optional[AlphaScheduler], train_acc: float) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, (AdaptiveAlpha, TargetSparsity)):
        scheduler.step(train_acc)
    else:
        scheduler.step()


def current_alpha(optimizer: torch.optim.Optimizer) -> float:
    """α of the reparameterized group (PILoT) or the L1 strength of SGD's group (l1); 0 for dense."""
    return float(optimizer.param_groups[0].get("alpha", 0.0))


@torch.no_grad()
def share_at(optimizer: torch.optim.Optimizer, target: float) -> float:
    """:func:`~pilot_kernels.schedules.prunable_share` at ``target`` of the tensors with
    ``ndim >= 2`` (PILoT: its reparameterized ones, the same set in this trainer): the
    share of ``Σ|x|`` that pruning to ``target`` removes.  With FSDP2 parameters a
    collective: call it on every rank."""
    return float(prunable_share(optimizer if isinstance(optimizer, PILoT) else weights(optimizer), target))


@torch.no_grad()
def sparsity_optimizer(optimizer: torch.optim.Optimizer) -> Optional[PILoT]:
    """What :mod:`pilot_kernels.sparsity` should get: the PILoT optimizer (so ``m``, ``w``
    and the momenta are pruned with ``x``) or ``None`` (the tensors with ``ndim >= 2``)."""
    return optimizer if isinstance(optimizer, PILoT) else None


@torch.no_grad()
def l1_norm(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """``Σ|x|`` over the tensors with ``ndim >= 2`` (PILoT: ``opt.l1_norm()``, from its step).
    With FSDP2 parameters a collective: call it on every rank."""
    if isinstance(optimizer, PILoT):
        return float(optimizer.l1_norm())
    params = [p for p in model.parameters() if splits_by_default(p)]
    partial = torch.stack([local(p).detach().abs().sum(dtype=torch.float64) for p in params]).sum()
    return float(all_reduce_over_shards_(partial, shard_groups(params)))


@torch.no_grad()
def sparsities_at(model: nn.Module, optimizer, thresholds: list[float]) -> dict[str, float]:
    """Global fraction of ``|x| <= t`` over the reparameterized tensors, per threshold.
    With FSDP2 parameters a collective per threshold: call it on every rank."""
    opt = sparsity_optimizer(optimizer)
    return {f"{t:g}": sparsity_report(model, opt, threshold=t).sparsity for t in thresholds}


def lr_lambda_factory(warmup_iters: int, total_iters: int):
    """Linear warmup from ~0 over ``warmup_iters`` steps, then cosine to 0 at
    ``total_iters``; restarts every ``total_iters`` steps (each pruning cycle)."""

    def factor(it: int) -> float:
        it = it % total_iters
        if it < warmup_iters:
            return (it + 1) / warmup_iters
        t = (it - warmup_iters) / max(1, total_iters - warmup_iters)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return factor

