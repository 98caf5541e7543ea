"""Small utilities shared by the tests (not fixtures: plain functions)."""
from __future__ import annotations

import itertools

import torch

# Every option of the PILoT step that changes the arithmetic.  Kept small but covering each
# branch of the update at least once together with momentum on and off.
OPTION_GRID = [
    dict(momentum=m, nesterov=n, dampening=d, weight_decay=wd, maximize=mx, alpha=a)
    for m, n, d, wd, mx, a in itertools.product([0.0, 0.9], [False, True], [0.0, 0.3], [0.0, 1e-2],
                                                [False, True], [0.0, 5e-2])
    if not (n and (m == 0 or d != 0))
]


def option_id(opts: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in opts.items())


def state_tensors(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


def assert_same_state(opt_a, params_a, opt_b, params_b, *, exact: bool, rtol=1e-5, atol=1e-6):
    """Parameters and every state tensor of two optimizers agree."""
    for pa, pb in zip(params_a, params_b):
        _close(pa, pb, exact, rtol, atol, "param")
        sa, sb = state_tensors(opt_a, pa), state_tensors(opt_b, pb)
        assert sa.keys() == sb.keys(), (sa.keys(), sb.keys())
        for k in sa:
            _close(sa[k], sb[k], exact, rtol, atol, k)


def _close(a, b, exact, rtol, atol, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    if exact:
        assert torch.equal(a, b), f"{what} differs: max |Δ| = {(a.float() - b.float()).abs().max()}"
    else:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
