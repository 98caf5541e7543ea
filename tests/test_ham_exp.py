"""det_exp: HAM's exp from IEEE basic ops, within 2 ulp of e^z over the clamped range."""
from __future__ import annotations

import numpy as np
import torch

from pilot_kernels.kernels.ham_reference import EXP_CLAMP, det_exp


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    ulp = torch.from_numpy(np.spacing(got.abs().numpy())).double()
    return (got.double() - exact).abs() / ulp


def test_det_exp_within_two_ulp_over_the_clamped_range():
    z = torch.cat([torch.linspace(-EXP_CLAMP, EXP_CLAMP, 400_001),
                   torch.rand(400_000, generator=torch.Generator().manual_seed(0)) * 10 - 5,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.34657359, -0.34657359])])
    got = det_exp(z)
    assert _ulps(got, torch.exp(z.double())).max() <= 2
    assert (got.view(torch.int32) - torch.exp(z).view(torch.int32)).abs().max() <= 2
    assert det_exp(torch.tensor([0.0])).item() == 1.0   # α = β = 0 leaves θ untouched


def test_det_exp_nan_propagates():
    assert torch.isnan(det_exp(torch.tensor([float("nan")]))).all()
