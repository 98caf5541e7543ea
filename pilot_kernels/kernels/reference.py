"""Plain-torch PILoT step: the oracle every other backend is tested against.

:func:`pilot_step` performs the PILoT step (paper §3) for a list of reparameterized
tensors of one param group, written for clarity first: every numbered line is one line
of the update in the :class:`~pilot_kernels.PILoT` docstring, in fp32, per tensor.  The
fused backends repeat the same fp32 operations in the same order, so they agree with it
bit for bit (``Σ|m·w|`` aside: another summation order).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..init import split
from .api import StepExtras, StepHparams, StepTensors

__all__ = ["pilot_step", "written"]

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def written(x: Tensor, m: Tensor, w: Tensor) -> Tensor:
    """Where ``x`` is not, bit for bit, the ``m·w`` the last step wrote: the elements
    someone wrote since (through ``.data``, ``copy_``, a pruning mask, a broadcast...)."""
    bits = _BITS[x.dtype]
    return x.view(bits) != (m * w).to(x.dtype).view(bits)


def _first_or(first, d: Tensor, later: Tensor) -> Tensor:
    """``d`` where the momentum starts (a tensor's flag, or a mask of adopted elements)."""
    if isinstance(first, Tensor):
        return torch.where(first, d, later)
    return d if first else later


def pilot_step(t: StepTensors, h: StepHparams, e: StepExtras = StepExtras(), workspace: dict = None) -> None:
    """One PILoT step, in place, for tensors of one (device, param group).

    ``t.xs`` (any float dtype) are read and overwritten with ``m·w``; ``t.ms``, ``t.ws``
    and the momentum buffers (fp32) are updated in place.  With ``h.adopt_writes`` every
    element of ``x`` that differs from the ``m·w`` the previous step wrote is first
    re-split from its current value with ``h.beta`` (:func:`pilot_kernels.init.split`)
    and takes this step as its momentum's first (``b = d``).  ``e.found_inf`` nonzero:
    nothing changes, ``x`` included.  Nothing is read on the host (no sync).
    ``workspace`` is unused here.
    """
    if e.l1_clear is not None:
        e.l1_clear.zero_()
    skip = None if e.found_inf is None else e.found_inf.reshape(()).ne(0)
    lr, alpha, momentum = h.lr, h.alpha, h.momentum
    for i, (x, g, m, w) in enumerate(zip(t.xs, t.grads, t.ms, t.ws)):
        first = t.firsts[i]
        if h.adopt_writes:                              # (0) keep what was written into x
            new = written(x, m, w)
            sm, sw = split(x, h.beta)
            m0, w0 = m, w
            m, w = torch.where(new, sm, m), torch.where(new, sw, w)
            first = new | first
        else:
            m0, w0 = m, w
        g = g.float()                                   # (1) fp32 math whatever x's dtype
        if e.grad_scale is not None:
            g = g / e.grad_scale.reshape(())
        if h.maximize:                                  # (2)
            g = -g
        if h.weight_decay != 0:                         # (3) L2 on x = m·w
            g = g + h.weight_decay * (m * w)
        d_m = g * w + (2 * alpha) * m                   # (4) both from the old m, w
        d_w = g * m + (2 * alpha) * w
        if momentum != 0:                               # (5) torch.optim.SGD's momentum
            b_m, b_w = t.momentum_ms[i], t.momentum_ws[i]
            new_b_m = _first_or(first, d_m, momentum * b_m + (1 - h.dampening) * d_m)
            new_b_w = _first_or(first, d_w, momentum * b_w + (1 - h.dampening) * d_w)
            if h.nesterov:
                d_m = d_m + momentum * new_b_m
                d_w = d_w + momentum * new_b_w
            else:
                d_m, d_w = new_b_m, new_b_w
        new_m = m - lr * d_m                            # (6)
        new_w = w - lr * d_w
        x_new = (new_m * new_w).to(x.dtype)             # (7) x ← m·w
        l1 = (new_m * new_w).abs()
        if skip is not None:                            # AMP: an inf/NaN step changes nothing
            # Buffers are allocated as zeros, so a skipped first step leaves them zero
            # and the next step's b = μ·0 + (1−τ)·d equals SGD's b = d whenever
            # dampening is 0 (the optimizer cannot tell without a sync).
            new_m, new_w = torch.where(skip, m0, new_m), torch.where(skip, w0, new_w)
            x_new = torch.where(skip, x, x_new)
            l1 = torch.where(skip, (m0 * w0).abs(), l1)
            if momentum != 0:
                new_b_m = torch.where(skip, b_m, new_b_m)
                new_b_w = torch.where(skip, b_w, new_b_w)
        if momentum != 0:
            b_m.copy_(new_b_m)
            b_w.copy_(new_b_w)
        t.ms[i].copy_(new_m)
        t.ws[i].copy_(new_w)
        x.copy_(x_new)
        if e.l1_accum is not None:
            e.l1_accum.add_(l1.sum())
