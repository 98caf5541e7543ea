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


# ---------------------------------------------------------------- steps through run_step
# Backends are driven directly (pilot_kernels.kernels.run_step), without the optimizer:
# a state is the lists one bucket holds, right after init.split_ (x == fl(m·w)).
STREAMS = ("xs", "ms", "ws", "momentum_ms", "momentum_ws")


def fresh_state(shapes, dtype=torch.float32, *, beta=1.0, momentum=True, device="cpu", seed=0):
    from pilot_kernels.init import split

    gen = torch.Generator().manual_seed(seed)
    s = {k: [] for k in STREAMS}
    for shape in shapes:
        m, w = split(torch.randn(shape, generator=gen).to(dtype), beta)
        s["xs"].append((m * w).to(device=device, dtype=dtype))
        s["ms"].append(m.to(device))
        s["ws"].append(w.to(device))
        s["momentum_ms"].append(torch.zeros_like(s["ms"][-1]))
        s["momentum_ws"].append(torch.zeros_like(s["ms"][-1]))
    if not momentum:
        s["momentum_ms"] = s["momentum_ws"] = None
    s["firsts"] = [True] * len(shapes)
    return s


def clone_state(s):
    return {k: (None if v is None else [u.clone() for u in v]) if k != "firsts" else list(v)
            for k, v in s.items()}


def hparams(beta=1.0, adopt_writes=True, lr=0.05, **opts):
    from pilot_kernels.kernels import StepHparams

    o = dict(momentum=0.9, dampening=0.0, nesterov=False, alpha=1e-2, weight_decay=0.0, maximize=False)
    o.update(opts)
    return StepHparams(lr=lr, beta=beta, adopt_writes=adopt_writes, **o)


def step(backend, s, grads, h, extras=None, workspace=None):
    """One call of run_step on the state ``s`` (in place); the momentum restarts once."""
    from pilot_kernels.kernels import StepExtras, StepTensors, run_step

    t = StepTensors(s["xs"], grads, s["ms"], s["ws"], s["momentum_ms"], s["momentum_ws"], s["firsts"])
    run_step(backend, t, h, extras or StepExtras(), workspace)
    s["firsts"] = [False] * len(s["xs"])


def random_grads(s, gen, dtype=None, scale=1.0):
    return [(torch.randn(x.shape, generator=gen) * scale).to(device=x.device, dtype=dtype or x.dtype)
            for x in s["xs"]]


def assert_states_equal(a, b):
    """Every tensor of two states bitwise equal (0 ulps)."""
    for k in STREAMS:
        if a[k] is None or b[k] is None:
            assert a[k] is b[k] is None, k
            continue
        for i, (u, v) in enumerate(zip(a[k], b[k])):
            assert u.dtype == v.dtype and u.shape == v.shape, (k, i)
            bits = torch.int32 if u.dtype == torch.float32 else torch.int16
            same = u.view(bits) == v.view(bits)   # 0 ulps, and NaN == NaN, -0 != +0
            assert bool(same.all()), f"{k}[{i}] differs in {int((~same).sum())} elements"


def write_every_kind(xs, gen):
    """Write into the x the ways users, pruning and checkpoint loaders do, all through
    ``.data`` (no version bump); returns a bool mask per x of the elements written."""
    written = []
    for i, x in enumerate(xs):
        before = x.detach().clone()
        flat = x.data.view(-1)
        n = flat.numel()
        kind = i % 5
        if kind == 0:      # copy_ of new values into a slice
            flat[: (n + 1) // 2].copy_(torch.randn((n + 1) // 2, generator=gen).to(x.dtype))
        elif kind == 1:    # scaling
            x.data.mul_(3.0)
        elif kind == 2:    # clamping
            x.data.clamp_(-0.25, 0.25)
        elif kind == 3:    # a pruning mask
            flat[torch.rand(n, generator=gen) < 0.5] = 0
        else:              # the storage swapped for another tensor
            x.data = (torch.randn(x.shape, generator=gen) * 2).to(device=x.device, dtype=x.dtype)
        bits = torch.int32 if x.dtype == torch.float32 else torch.int16
        written.append(x.detach().view(bits) != before.view(bits))
    return written
