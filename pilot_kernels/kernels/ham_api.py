"""What every backend's HAM step receives (the HAM twin of :mod:`pilot_kernels.kernels.api`).

A backend module exposes ``step(t: HamTensors, h: HamHparams, e: HamExtras, workspace:
dict) -> None`` and steps exactly what it is given: tensors of one device, one parameter
dtype and one param group, every scalar tensor already on that device.  ``h.base`` says
which update runs before the hyperbolic mirror step:

* ``"none"``  — the parameters already hold the base optimizer's θ½ (the :class:`HAM`
  wrapper ran it); only the mirror step runs;
* ``"adamw"`` — torch.optim.AdamW's step, then the mirror step, in one pass;
* ``"sgd"``   — torch.optim.SGD's step (momentum, dampening, nesterov, L2 weight decay),
  then the mirror step, in one pass.

Every scalar that depends on the step count or on ``lr`` (``decay``, ``step_size``,
``bias_correction2_sqrt``) is computed once per call by :func:`adamw_scalars`, on the
host as a Python float, or as a 0-dim fp32 device tensor in capturable mode; backends
never recompute them, so they cannot disagree about their rounding.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .layout import walkable

Scalar = Union[float, Tensor]  # a float, or a 0-dim fp32 tensor on the step's device

BASES = ("none", "adamw", "sgd")

#: Parameter and gradient dtypes the fused HAM kernels step.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class HamTensors(NamedTuple):
    """The lists of one call: tensors of one device, one parameter dtype, one param group."""

    params: list                  # θ (fp32, bf16 or fp16): read, then written θ_{k+1}
    grads: list                   # ∇f(θ_k), the gradient the base step sees
    exp_avgs: Optional[list] = None      # adamw: fp32 first moment
    exp_avg_sqs: Optional[list] = None   # adamw: fp32 second moment
    momentum_bufs: Optional[list] = None  # sgd with momentum: fp32 buffer
    firsts: Optional[list] = None        # sgd: True where the buffer holds no history yet


class HamHparams(NamedTuple):
    base: str = "none"            # one of BASES
    lr: Scalar = 1e-3             # η: the base step's lr and the mirror step's
    alpha: float = 200.0          # HAM's α (gradient weight of the mirror step)
    beta: float = 1e-3            # HAM's β (decay of the mirror step)
    maximize: bool = False
    weight_decay: float = 0.0     # adamw: decoupled (θ·(1 − lr·wd)); sgd: L2 (g + wd·θ)
    # adamw
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    decay: Scalar = 1.0                  # 1 − lr·weight_decay
    step_size: Scalar = 1e-3             # lr / (1 − β1^t)
    bias_correction2_sqrt: Scalar = 1.0  # sqrt(1 − β2^t)
    # sgd
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


class HamExtras(NamedTuple):
    """Per-call tensors besides the lists, on the step's device (or None)."""

    grad_scale: Optional[Tensor] = None   # AMP: g ← g / grad_scale
    found_inf: Optional[Tensor] = None    # AMP: nonzero → the call changes nothing


def adamw_scalars(lr: Scalar, beta1: float, beta2: float, weight_decay: float,
                  step: Union[int, Tensor]) -> tuple:
    """``(decay, step_size, bias_correction2_sqrt)`` for step number ``step`` (≥ 1).

    With a Python ``lr`` and ``step`` these are the doubles torch.optim.AdamW computes
    (each later rounded to fp32 where it multiplies an fp32 tensor, as torch does).  With a
    tensor ``lr`` or ``step`` (capturable) they are computed on the device in fp64, with no
    host sync, and rounded to 0-dim fp32 tensors: the same values as the host path's
    wherever the device's fp64 ``pow`` rounds like the host's (bitwise on the CPU)."""
    if not isinstance(lr, Tensor) and not isinstance(step, Tensor):
        return 1 - lr * weight_decay, lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5
    device = lr.device if isinstance(lr, Tensor) else step.device
    lr = torch.as_tensor(lr, device=device).double()
    step = torch.as_tensor(step, device=device).double()
    decay = 1 - lr * weight_decay
    step_size = lr / (1 - torch.pow(beta1, step))
    bc2_sqrt = (1 - torch.pow(beta2, step)) ** 0.5
    return decay.float(), step_size.float(), bc2_sqrt.float()


def kernel_groups(t: HamTensors, h: HamHparams, device_type: Optional[str] = None) -> tuple:
    """A call cut for a fused kernel: ``(groups, rest)``, one :class:`HamTensors` per
    gradient dtype of the entries it can walk (parameter and gradient of
    :data:`KERNEL_DTYPES`, fp32 state laid out like the parameter, on ``device_type`` where
    given), and the other entries for the reference (None when there are none)."""
    momentum = h.base == "sgd" and h.momentum != 0
    fused, rest = {}, []
    for i, (p, g) in enumerate(zip(t.params, t.grads)):
        state = []
        if h.base == "adamw":
            state = [t.exp_avgs[i], t.exp_avg_sqs[i]]
        elif momentum:
            state = [t.momentum_bufs[i]]
        ok = ((device_type is None or p.device.type == device_type)
              and p.dtype in KERNEL_DTYPES and g.dtype in KERNEL_DTYPES
              and all(s.dtype == torch.float32 for s in state) and walkable(p, g, *state))
        (fused.setdefault(g.dtype, []) if ok else rest).append(i)

    def pick(idx):
        return HamTensors(*(None if seq is None else [seq[i] for i in idx] for seq in t))

    return [pick(idx) for idx in fused.values()], (pick(rest) if rest else None)
