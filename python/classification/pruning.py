"""Iterative magnitude pruning with learning-rate or weight rewinding (paper Fig. 4/6).

Training runs ``cycles + 1`` times for ``--epochs`` epochs each.  Before cycle
``c = 1 … cycles`` the fraction ``r`` (``--prune-rate``) of the still-unpruned weights is
pruned by global magnitude with :func:`pilot_kernels.sparsity.prune_`, i.e. the target
sparsity is ``1 − (1 − r)^c``, and then:

* ``--rewind lr``: the weights are kept and the learning-rate schedule (warmup + cosine)
  restarts (Renda et al., 2020);
* ``--rewind weight``: the surviving weights are reset to their values at the end of
  epoch ``--rewind-epoch`` of the first cycle (0 = initialization) and the schedule
  restarts (Frankle et al., 2019).  BatchNorm statistics and the other tensors are
  reset with them; for PILoT the factors ``m, w`` are rewound too.

Each cycle is a fresh run: momentum buffers are cleared and α restarts from its initial
value with a fresh schedule over the cycle's epochs.

How the pruned entries stay exactly zero:

* PILoT/spred: ``prune_`` zeroes ``x``, ``m``, ``w`` and both momenta.  With
  ``m = w = 0`` both factor updates vanish for any gradient, α and weight decay, so the
  step itself keeps them at zero and **no mask enters the step**.
* dense/l1 (plain SGD on ``x``, no such fixed point): the gradients of pruned entries
  are zeroed before every step and the entries themselves after it
  (:meth:`Masks.mask_grads_`, :meth:`Masks.mask_weights_`).

:meth:`Masks.violations` counts pruned entries that are not exactly zero; the trainer
checks it after every epoch and stops with an error if it is ever nonzero.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pilot_kernels import PILoT
from pilot_kernels.sparsity import apply_keep_masks_, prune_

from methods import sparsity_optimizer


def cycle_sparsity(prune_rate: float, cycle: int) -> float:
    """Target global sparsity after ``cycle`` pruning rounds of rate ``prune_rate``."""
    return 1.0 - (1.0 - prune_rate) ** cycle


class Masks:
    """Keep-masks (``True`` = kept) of the pruned tensors, by parameter name."""

    def __init__(self, model: nn.Module, keep: dict[str, torch.Tensor], enforce: bool):
        params = dict(model.named_parameters())
        self.keep = {n: k.to(device=params[n].device, dtype=torch.bool) for n, k in keep.items()}
        self._pairs = [(params[n], k) for n, k in self.keep.items()]
        # dense/l1 need the mask in every step; PILoT's zeros are a fixed point of its step.
        self.enforce = enforce

    @torch.no_grad()
    def mask_grads_(self) -> None:
        if not self.enforce:
            return
        for p, k in self._pairs:
            if p.grad is not None:
                p.grad.mul_(k)

    @torch.no_grad()
    def mask_weights_(self) -> None:
        if not self.enforce:
            return
        for p, k in self._pairs:
            p.mul_(k)

    @torch.no_grad()
    def violations(self) -> int:
        """Pruned entries of ``x`` that are not exactly zero."""
        return int(sum(int((p[~k] != 0).sum()) for p, k in self._pairs))

    def sparsity(self) -> float:
        total = sum(k.numel() for k in self.keep.values())
        return sum(int((~k).sum()) for k in self.keep.values()) / max(total, 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: k.cpu() for n, k in self.keep.items()}


@torch.no_grad()
def reset_momentum_(optimizer: torch.optim.Optimizer) -> None:
    """Clear every momentum buffer, so the next step starts momentum afresh (b = d), as
    in a new run."""
    for state in optimizer.state.values():
        if PILoT.STARTED_KEY in state:  # PILoT: keep the (zeroed) buffers, mark them unstarted
            for key in PILoT.MOMENTUM_KEYS:
                if key in state:
                    state[key].zero_()
            state[PILoT.STARTED_KEY] = False
        elif "momentum_buffer" in state:  # torch.optim.SGD re-creates it on the next step
            del state["momentum_buffer"]


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The weights to rewind to (CPU copies): the model's state_dict and, for PILoT,
    the factors ``m, w`` of every reparameterized tensor."""
    snap: dict[str, Any] = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    if isinstance(optimizer, PILoT):
        factors = {}
        for name, p in model.named_parameters():
            state = optimizer.state.get(p, {})
            if PILoT.FACTOR_KEYS[0] in state:
                factors[name] = {k: state[k].detach().cpu().clone() for k in PILoT.FACTOR_KEYS}
        snap["factors"] = factors
    return snap


@torch.no_grad()
def rewind_weights_(model: nn.Module, optimizer: torch.optim.Optimizer, snap: dict[str, Any]) -> None:
    model.load_state_dict(snap["model"])
    if isinstance(optimizer, PILoT):
        params = dict(model.named_parameters())
        for name, factors in snap["factors"].items():
            state = optimizer.state[params[name]]
            for key in PILoT.FACTOR_KEYS:
                state[key].copy_(factors[key])


def start_cycle(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cycle: int,
    prune_rate: float,
    rewind: str,
    rewind_snapshot: Optional[dict[str, Any]],
) -> tuple[Masks, float]:
    """Prune for ``cycle`` (≥ 1), rewind, reset momenta; returns the masks and target."""
    target = cycle_sparsity(prune_rate, cycle)
    keep = prune_(model, sparsity_optimizer(optimizer), sparsity=target, scope="global")
    if rewind == "weight":
        if rewind_snapshot is None:
            raise RuntimeError("weight rewinding needs the snapshot of --rewind-epoch, which is missing")
        rewind_weights_(model, optimizer, rewind_snapshot)
    apply_keep_masks_(model, sparsity_optimizer(optimizer), keep)  # again, after a rewind
    reset_momentum_(optimizer)
    return Masks(model, keep, enforce=not isinstance(optimizer, PILoT)), target
