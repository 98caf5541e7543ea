"""Splitting a weight ``x`` into PILoT's factors ``m, w`` (paper §3).

Solve ``m ⊙ w = x`` and ``m² − w² = β`` with ``m > 0``::

    m = sqrt((β + sqrt(β² + 4x²)) / 2),    w = x / m   (w = 0 where m = 0)

``β = 1`` is the paper's PILoT initialization: ``m`` stays away from zero, so ``w`` (and
with it ``x``) can change sign during training.  ``β = 0`` is spred's balanced split
``m = sqrt|x|``, ``w = sign(x)·sqrt|x|``, under which ``x`` can never cross zero.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["split", "split_", "exact_split_share", "splits_by_default"]

def splits_by_default(p: Tensor) -> bool:
    """PILoT's default rule (``reparam="auto"``), the one place it is written: weight
    tensors (``ndim >= 2``: linear, conv, embedding) are split; biases and norms are not."""
    return p.ndim >= 2


# Above this |x|, 4x² overflows fp32 (at |x| ≈ 9.2e18); there m is computed from
# hypot(β/2, x) instead, which is the same number without the square.
_HUGE = 2.0**60


def split(x: Tensor, beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Return fp32 ``(m, w)`` with ``m * w == x`` wherever fp32 allows, and ``m² − w² ≈ beta``.

    ``x`` may have any float dtype; the factors are always float32.  Every finite
    ``x`` splits without overflow.  The closed form gives ``m * w`` within an fp32 ulp
    of ``x``; then ``m`` is nudged by at most two ulps (first of ``0, +1, −1, +2, −2``,
    ``w`` recomputed from it) to the first pair whose fp32 product is ``x`` exactly, so
    that a step that changes nothing writes back exactly what was split (the share of
    fp32 values with no such pair: :func:`exact_split_share`).  The fused kernels run
    this same sequence of fp32 operations when they re-split a written element.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (m² − w² = beta has no real m > |w| otherwise), got {beta}")
    if not x.is_floating_point():
        raise TypeError(f"split needs a floating-point tensor, got {x.dtype}")
    x = x.detach().float()
    m = _closed_form_m(x, beta)
    w = _w_from_m(x, m, beta)
    exact = (m * w) == x
    for k in _NUDGES:
        mk = _nudge(m, k)
        wk = _w_from_m(x, mk, beta)
        take = ~exact & ((mk * wk) == x)
        m, w = torch.where(take, mk, m), torch.where(take, wk, w)
        exact = exact | take
    return m, w


# The m nudges split() tries, in order, after the closed form (in fp32 ulps).
_NUDGES = (1, -1, 2, -2)


def _sqrt_rn(v: Tensor) -> Tensor:
    """fp32 square root rounded to nearest, as IEEE (and the kernels' sqrt_rn) define it:
    through float64, whose rounding to fp32 is then exact.  torch's vectorized fp32
    sqrt on the CPU is off by an ulp for some inputs."""
    return v.double().sqrt().float()


def _closed_form_m(x: Tensor, beta: float) -> Tensor:
    if beta == 0:
        return _sqrt_rn(x.abs())
    m = _sqrt_rn((beta + _sqrt_rn(beta * beta + 4.0 * x * x)) * 0.5)
    huge = x.abs() > _HUGE
    # where() keeps the common formula's bits everywhere else (and costs nothing on the
    # host: no check of whether any entry is huge).
    return torch.where(huge, _sqrt_rn(beta * 0.5 + torch.hypot(x.new_tensor(beta * 0.5), x)), m)


def _w_from_m(x: Tensor, m: Tensor, beta: float) -> Tensor:
    if beta == 0:
        # spred's balanced split: w = sign(x)·m exactly.  x / m would be off by an ulp,
        # leaving m² − w² ≈ 1e-7 instead of 0, enough for an entry to cross zero late
        # in training, which the balanced split forbids.
        return torch.sign(x) * m
    return x / m  # m >= sqrt(beta) > 0 everywhere


def _nudge(m: Tensor, k: int) -> Tensor:
    """``m`` moved by ``k`` fp32 ulps (m >= 0; zeros, infs and NaNs stay as they are)."""
    moved = (m.view(torch.int32) + k).view(torch.float32)
    return torch.where((m > 0) & torch.isfinite(m), moved, m)


def exact_split_share(x: Tensor, beta: float = 1.0) -> float:
    """The share of ``x``'s entries whose split multiplies back to exactly ``x`` in fp32."""
    m, w = split(x, beta)
    return float(((m * w) == x.detach().float()).float().mean()) if x.numel() else 1.0


@torch.no_grad()
def split_(x: Tensor, beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """:func:`split`, then overwrite ``x`` with ``m * w`` so ``x == m ⊙ w`` holds exactly."""
    m, w = split(x, beta)
    x.copy_(m * w)
    return m, w
