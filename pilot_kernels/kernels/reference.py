"""Plain-torch PILoT step: the CPU path and the oracle every other backend is tested against.

One function, :func:`pilot_step`, performs the PILoT step (paper §3) for a list of reparameterized tensors
that share one param group.  It is written for clarity first: every line is one line
of the update equations in the :class:`~pilot_kernels.PILoT` docstring, in fp32, per
tensor.  The fused backends (Triton, CUDA) implement exactly the same signature.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["pilot_step"]


def pilot_step(
    xs: Sequence[Tensor],
    grads: Sequence[Tensor],
    ms: Sequence[Tensor],
    ws: Sequence[Tensor],
    momentum_ms: Optional[Sequence[Tensor]],
    momentum_ws: Optional[Sequence[Tensor]],
    firsts: Sequence[bool],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    alpha: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    l1_accum: Optional[Tensor] = None,
    l1_clear: Optional[Tensor] = None,
    workspace: Optional[dict] = None,
) -> None:
    """One PILoT step, in place, for tensors of one (device, param group).

    Args:
        xs: the model's parameters ``x`` (any float dtype); overwritten with ``m * w``.
        grads: ``x.grad`` for each tensor (same dtype as ``x``).
        ms, ws: fp32 factors, updated in place.
        momentum_ms, momentum_ws: fp32 momentum buffers (``None`` when ``momentum == 0``).
        firsts: per tensor, ``True`` if its momentum buffers hold no history yet
            (``torch.optim.SGD``'s first step: ``b = d``).
        grad_scale, found_inf: 1-element fp32 tensors from ``torch.amp.GradScaler``.
            Gradients are divided by ``grad_scale``; when ``found_inf`` is non-zero no
            tensor changes.  Neither is read on the host (no sync).
        l1_accum: 0-dim fp32 tensor; ``Σ|m⊙w|`` of the new values is *added* to it.
        l1_clear: 0-dim fp32 tensor zeroed by this call (the optimizer's next
            accumulator; see ``PILoT.l1_norm``).
        workspace: scratch space a fused backend may keep between calls (unused here).

    ``lr`` and ``alpha`` may also be 0-dim fp32 tensors on the device (capturable
    mode); they are then read on the device, never on the host.
    """
    if l1_clear is not None:
        l1_clear.zero_()
    skip = None if found_inf is None else found_inf.reshape(()).ne(0)
    for i, (x, g, m, w) in enumerate(zip(xs, grads, ms, ws)):
        g = g.float()                                   # (1) fp32 math whatever x's dtype
        if grad_scale is not None:
            g = g / grad_scale.reshape(())
        if maximize:                                    # (2)
            g = -g
        if weight_decay != 0:                           # (3) L2 on x = m·w
            g = g + weight_decay * (m * w)
        d_m = g * w + (2 * alpha) * m                   # (4) both from the old m, w
        d_w = g * m + (2 * alpha) * w
        if momentum != 0:                               # (5) torch.optim.SGD's momentum
            b_m, b_w = momentum_ms[i], momentum_ws[i]
            if firsts[i]:
                new_b_m, new_b_w = d_m, d_w
            else:
                new_b_m = momentum * b_m + (1 - dampening) * d_m
                new_b_w = momentum * b_w + (1 - dampening) * d_w
            if nesterov:
                d_m = d_m + momentum * new_b_m
                d_w = d_w + momentum * new_b_w
            else:
                d_m, d_w = new_b_m, new_b_w
        new_m = m - lr * d_m                            # (6)
        new_w = w - lr * d_w
        if skip is not None:                            # AMP: an inf/NaN step changes nothing
            new_m = torch.where(skip, m, new_m)
            new_w = torch.where(skip, w, new_w)
            if momentum != 0:
                # Buffers are allocated as zeros, so a skipped first step leaves them
                # zero and the next step's b = μ·0 + (1−τ)·d equals SGD's b = d
                # whenever dampening is 0 (the optimizer cannot tell without a sync).
                new_b_m = torch.where(skip, b_m, new_b_m)
                new_b_w = torch.where(skip, b_w, new_b_w)
        if momentum != 0:
            b_m.copy_(new_b_m)
            b_w.copy_(new_b_w)
        m.copy_(new_m)
        w.copy_(new_w)
        x_new = m * w                                   # (7) x is recomputed, never read
        x.copy_(x_new)
        if l1_accum is not None:
            l1_accum.add_(x_new.abs().sum())
