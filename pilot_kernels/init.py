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

__all__ = ["split", "split_"]

# Above this |x|, 4x² overflows fp32 (at |x| ≈ 9.2e18); there m is computed from
# hypot(β/2, x) instead, which is the same number without the square.
_HUGE = 2.0**60


def split(x: Tensor, beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Return fp32 ``(m, w)`` with ``m * w ≈ x`` and ``m² − w² = beta``.

    ``x`` may have any float dtype; the factors are always float32.  Every finite
    ``x`` splits without overflow.  ``m * w`` rounds back to ``x`` within an fp32 ulp
    (exactly for bf16/fp16 ``x``).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (m² − w² = beta has no real m > |w| otherwise), got {beta}")
    if not x.is_floating_point():
        raise TypeError(f"split needs a floating-point tensor, got {x.dtype}")
    x = x.detach().float()
    if beta == 0:
        # spred's balanced split: w = sign(x)·m exactly.  x / m would be off by an ulp,
        # leaving m² − w² ≈ 1e-7 instead of 0, enough for an entry to cross zero late
        # in training, which the balanced split forbids.
        m = x.abs().sqrt()
        return m, torch.sign(x) * m
    m = torch.sqrt((beta + torch.sqrt(beta * beta + 4.0 * x * x)) * 0.5)
    huge = x.abs() > _HUGE
    # where() keeps the common formula's bits everywhere else (and costs nothing on the
    # host: no check of whether any entry is huge).
    m = torch.where(huge, torch.sqrt(beta * 0.5 + torch.hypot(x.new_tensor(beta * 0.5), x)), m)
    # m >= sqrt(beta) > 0 everywhere.
    return m, x / m


@torch.no_grad()
def split_(x: Tensor, beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """:func:`split`, then overwrite ``x`` with ``m * w`` so ``x == m ⊙ w`` holds exactly."""
    m, w = split(x, beta)
    x.copy_(m * w)
    return m, w
