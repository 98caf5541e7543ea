"""What every backend's step receives (the interface of :mod:`pilot_kernels.kernels`).

A backend module exposes ``pilot_step(t: StepTensors, h: StepHparams, e: StepExtras,
workspace: dict) -> None`` and steps exactly what it is given: the dispatcher
(:func:`pilot_kernels.kernels.run_step`) has already picked it, handed the reference
whatever it cannot walk, put every scalar tensor on the tensors' device, and bumps the
version counters of everything written after it returns.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

from torch import Tensor

Scalar = Union[float, Tensor]  # a float, or a 0-dim fp32 tensor on the step's device


class StepTensors(NamedTuple):
    """The lists of one call: tensors of one device, one ``x`` dtype, one param group."""

    xs: list          # the model's parameters x (fp32, bf16 or fp16); read, then written m·w
    grads: list       # x.grad
    ms: list          # fp32 factor m
    ws: list          # fp32 factor w
    momentum_ms: Optional[list]   # fp32 momentum buffers, None when momentum == 0
    momentum_ws: Optional[list]
    firsts: list      # per tensor: True when its momentum buffers hold no history (b = d)


class StepHparams(NamedTuple):
    lr: Scalar
    momentum: float
    dampening: float
    nesterov: bool
    alpha: Scalar
    beta: float          # the split m² − w² = β that written elements are re-split with
    weight_decay: float
    maximize: bool
    adopt_writes: bool   # read x and adopt elements written since the last step


class StepExtras(NamedTuple):
    """Per-call tensors besides the lists, all on the step's device (or None)."""

    grad_scale: Optional[Tensor] = None   # AMP: g ← g / grad_scale
    found_inf: Optional[Tensor] = None    # AMP: nonzero → the call changes nothing
    l1_accum: Optional[Tensor] = None     # 0-dim fp32: Σ|m·w| of the new values is added
    l1_clear: Optional[Tensor] = None     # 0-dim fp32: zeroed by the call
