"""Splitting a weight ``x`` into PILoT's factors ``m, w`` (spec §4).

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


def split(x: Tensor, beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Return fp32 ``(m, w)`` with ``m * w ≈ x`` and ``m² − w² = beta``.

    ``x`` may have any float dtype; the factors are always float32 (spec §3).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (m² − w² = beta has no real m > |w| otherwise), got {beta}")
    if not x.is_floating_point():
        raise TypeError(f"split needs a floating-point tensor, got {x.dtype}")
    x = x.detach().float()
    m = torch.sqrt((beta + torch.sqrt(beta * beta + 4.0 * x * x)) * 0.5)
    if beta == 0:
        # spred's balanced split: w = sign(x)·m exactly.  x / m would be off by an ulp,
        # leaving m² − w² ≈ 1e-7 instead of 0, enough for an entry to cross zero late
        # in training, which the balanced split forbids.
        return m, torch.sign(x) * m
    # m >= sqrt(beta) > 0 everywhere.
    return m, x / m


@torch.no_grad()
def split_(x: Tensor, beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """:func:`split`, then overwrite ``x`` with ``m * w`` so ``x == m ⊙ w`` holds exactly."""
    m, w = split(x, beta)
    x.copy_(m * w)
    return m, w
