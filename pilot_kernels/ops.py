"""The PILoT step as a registered custom op, for ``torch.compile``.

Eager code calls the backends directly (a custom op's dispatch costs host time that
``step()`` is budgeted not to spend).  While Dynamo traces, :func:`pilot_kernels.pilot`
calls ``torch.ops.pilot_kernels.pilot_step`` instead: one opaque, in-place node in the
graph, so a compiled ``optimizer.step`` needs no graph break around the kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels import StepExtras, StepHparams, StepTensors, run_step

_MUTATED = ("xs", "ms", "ws", "momentum_ms", "momentum_ws", "l1_accum", "l1_clear")


@torch.library.custom_op("pilot_kernels::pilot_step", mutates_args=_MUTATED)
def pilot_step_op(
    xs: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ws: list[Tensor],
    momentum_ms: list[Tensor],
    momentum_ws: list[Tensor],
    firsts: list[bool],
    lr: float,
    lr_tensor: Optional[Tensor],
    momentum: float,
    dampening: float,
    nesterov: bool,
    alpha: float,
    alpha_tensor: Optional[Tensor],
    weight_decay: float,
    maximize: bool,
    beta: float,
    adopt_writes: bool,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    l1_accum: Optional[Tensor],
    l1_clear: Optional[Tensor],
    backend: str,
) -> None:
    """In-place PILoT step: :func:`pilot_kernels.kernels.run_step`'s arguments flattened
    (the op schema takes no NamedTuple), each of lr/alpha as a (float, optional tensor)
    pair (:func:`pilot_kernels.kernels.split_scalar`), no momentum as empty lists."""
    run_step(
        backend,
        StepTensors(xs, grads, ms, ws, momentum_ms or None, momentum_ws or None, firsts),
        StepHparams(lr=lr if lr_tensor is None else lr_tensor, momentum=momentum,
                    dampening=dampening, nesterov=nesterov,
                    alpha=alpha if alpha_tensor is None else alpha_tensor, beta=beta,
                    weight_decay=weight_decay, maximize=maximize, adopt_writes=adopt_writes),
        StepExtras(grad_scale=grad_scale, found_inf=found_inf, l1_accum=l1_accum, l1_clear=l1_clear),
    )


@pilot_step_op.register_fake
def _(xs, grads, ms, ws, momentum_ms, momentum_ws, firsts, lr, lr_tensor, momentum, dampening,
      nesterov, alpha, alpha_tensor, weight_decay, maximize, beta, adopt_writes, grad_scale,
      found_inf, l1_accum, l1_clear, backend) -> None:
    return None
