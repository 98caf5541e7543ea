"""HAM's fused backends against the plain-torch reference, bit for bit, over several steps:
every base (none, AdamW, SGD), parameter dtypes, sizes (1, block ± 1, odd) and options."""
from __future__ import annotations

import pytest
import torch

from pilot_kernels.kernels import ham_reference
from pilot_kernels.kernels.ham_api import HamExtras, HamHparams, HamTensors, adamw_scalars, kernel_groups
from pilot_kernels.kernels.ham_backends import run_step

from conftest import KERNEL_DEVICES

BLOCK = 1024  # ham_triton.BLOCK_SIZE
SIZES = [(1,), (BLOCK - 1,), (BLOCK,), (4, BLOCK // 4 + 1), (37, 29)]

OPTIONS = {
    "none": [dict(), dict(maximize=True), dict(alpha=0.0, beta=0.5), dict(lr=3.0)],
    "adamw": [dict(), dict(weight_decay=0.1, maximize=True), dict(beta1=0.3, alpha=0.0, beta=0.0),
              dict(weight_decay=0.05, eps=1e-3, lr=1.0)],
    "sgd": [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=0.01),
            dict(momentum=0.8, dampening=0.3, maximize=True), dict(weight_decay=0.1, lr=2.0)],
}
CASES = [(b, o) for b, opts in OPTIONS.items() for o in opts]


def _state(base, params, momentum):
    f32 = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    if base == "adamw":
        return dict(exp_avgs=f32, exp_avg_sqs=[torch.zeros_like(s) for s in f32])
    if base == "sgd" and momentum:
        return dict(momentum_bufs=f32, firsts=[True] * len(params))
    return {}


def _hparams(base, opts, step):
    h = HamHparams(base=base, **{**dict(lr=0.05, alpha=20.0, beta=0.01), **opts})
    if base == "adamw":
        d, s, b = adamw_scalars(h.lr, h.beta1, h.beta2, h.weight_decay, step)
        h = h._replace(decay=d, step_size=s, bias_correction2_sqrt=b)
    return h


def _run(backend, base, opts, dtype, device, steps=3, grad_scale=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in SIZES]
    params[-1].view(-1)[::5] = 0                      # exact zeros must stay zero
    state = _state(base, params, opts.get("momentum", 0))
    for k in range(1, steps + 1):
        grads = [torch.randn(s, generator=gen).to(device, dtype) for s in SIZES]
        if grad_scale is not None:
            grads = [g * grad_scale for g in grads]
        t = HamTensors(params, grads, **state)
        e = HamExtras(grad_scale=None if grad_scale is None else torch.tensor(grad_scale, device=device))
        run_step(t, _hparams(base, opts, k), e, backend=backend)
        if "firsts" in state:
            state["firsts"] = [False] * len(params)
    return params, state


def _assert_equal(a, b):
    pa, sa = a
    pb, sb = b
    for x, y in zip(pa, pb):
        assert torch.equal(x.cpu(), y.cpu()), f"params differ: max |Δ| = {(x.float() - y.float()).abs().max()}"
    for k in sa:
        if k == "firsts":
            continue
        for x, y in zip(sa[k], sb[k]):
            assert torch.equal(x.cpu(), y.cpu()), f"{k} differs"


BACKENDS = ["cpu", "triton"]


# fp16 with the AdamW cases only: keeps the interpreter run short.
DTYPE_CASES = [(d, b, o) for d in (torch.float32, torch.bfloat16, torch.float16) for b, o in CASES
               if d != torch.float16 or b == "adamw"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,base,opts", DTYPE_CASES,
                         ids=[f"{str(d)[6:]}-{b}-{OPTIONS[b].index(o)}" for d, b, o in DTYPE_CASES])
def test_backend_matches_reference(backend, dtype, base, opts):
    device = KERNEL_DEVICES[0] if backend == "triton" else "cpu"
    ref = _run("reference", base, opts, dtype, device)
    got = _run(backend, base, opts, dtype, device)
    _assert_equal(got, ref)
    assert not torch.equal(ref[0][1].cpu(), _run("reference", base, opts, dtype, device, steps=0)[0][1].cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_and_found_inf(backend):
    device = KERNEL_DEVICES[0] if backend == "triton" else "cpu"
    _assert_equal(_run(backend, "adamw", {}, torch.float32, device, grad_scale=1024.0),
                  _run("reference", "adamw", {}, torch.float32, device, grad_scale=1024.0))
    p = [torch.randn(5, 3, device=device)]
    g = [torch.randn(5, 3, device=device)]
    st = _state("adamw", p, 0)
    before = [p[0].clone(), st["exp_avgs"][0].clone()]
    run_step(HamTensors(p, g, **st), _hparams("adamw", {}, 1),
             HamExtras(found_inf=torch.ones((), device=device)), backend=backend)
    assert torch.equal(p[0], before[0]) and torch.equal(st["exp_avgs"][0], before[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_tensor_lr_matches_float_lr(backend, base):
    """Capturable: lr (and AdamW's step scalars) as device tensors give the same bits."""
    device = KERNEL_DEVICES[0] if backend == "triton" else "cpu"
    opts = dict(momentum=0.9) if base == "sgd" else dict(weight_decay=0.1)
    opts["lr"] = 0.046875                 # exact in fp32, so both paths start from one lr
    ref = _run(backend, base, opts, torch.float32, device)
    lr = torch.tensor(opts["lr"], device=device)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device) for s in SIZES]
    params[-1].view(-1)[::5] = 0
    state = _state(base, params, opts.get("momentum", 0))
    for k in range(1, 4):
        grads = [torch.randn(s, generator=gen).to(device) for s in SIZES]
        h = _hparams(base, dict(opts, lr=lr), 1)
        if base == "adamw":
            d, s, b = adamw_scalars(lr, 0.9, 0.999, 0.1, torch.tensor(float(k), device=device))
            assert d.dtype == s.dtype == b.dtype == torch.float32
            h = h._replace(decay=d, step_size=s, bias_correction2_sqrt=b)
        run_step(HamTensors(params, grads, **state), h, backend=backend)
        if "firsts" in state:
            state["firsts"] = [False] * len(params)
    if base == "sgd" or device == "cpu":
        _assert_equal((params, state), ref)
    else:  # the device's fp64 pow may round the step scalars differently from the host's
        for x, y in zip(params, ref[0]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unwalkable_tensors_go_to_the_reference(backend):
    device = KERNEL_DEVICES[0] if backend == "triton" else "cpu"

    def run(b):
        gen = torch.Generator().manual_seed(1)
        p = [torch.randn(7, 5, generator=gen).to(device).t(), torch.randn(6, 4, generator=gen).to(device)]
        st = _state("adamw", p, 0)
        assert st["exp_avgs"][0].stride() != p[0].stride()          # not walkable together
        for k in range(1, 3):
            g = [torch.randn(5, 7, generator=gen).to(device), torch.randn(6, 4, generator=gen).to(device)]
            run_step(HamTensors(p, g, **st), _hparams("adamw", {}, k), backend=b)
        return p, st

    _assert_equal(run(backend), run("reference"))


def test_kernel_groups_cut_a_call_by_gradient_dtype_and_walkability():
    """What both fused backends hand their kernel: one group per gradient dtype, in order,
    and everything they cannot walk (another layout, non-fp32 state, fp64, another
    device type) for the reference."""
    p = [torch.zeros(3, 4, dtype=torch.bfloat16) for _ in range(4)] + [torch.zeros(4, 3).t(),
                                                                        torch.zeros(5, dtype=torch.float64)]
    g = [torch.zeros(3, 4, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16)]
    g += [torch.zeros(3, 4), torch.zeros(5, dtype=torch.float64)]
    bufs = [torch.zeros(3, 4) for _ in range(3)] + [torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 4),
                                                   torch.zeros(5, dtype=torch.float64)]
    t = HamTensors(p, g, momentum_bufs=bufs, firsts=[True] * 6)
    h = HamHparams(base="sgd", momentum=0.9)
    groups, rest = kernel_groups(t, h)
    assert [[id(x) for x in sub.params] for sub in groups] == [[id(p[0]), id(p[2])], [id(p[1])]]
    assert [g_.dtype for sub in groups for g_ in sub.grads] == [torch.float32, torch.float32, torch.bfloat16]
    assert all(sub.exp_avgs is None and len(sub.firsts) == len(sub.params) for sub in groups)
    assert [id(x) for x in rest.params] == [id(p[3]), id(p[4]), id(p[5])]
    assert [id(b) for b in rest.momentum_bufs] == [id(bufs[3]), id(bufs[4]), id(bufs[5])]
    # Without momentum the buffers are not state: p[3] is then walkable.
    groups, rest = kernel_groups(t, h._replace(momentum=0.0))
    assert sum(len(sub.params) for sub in groups) == 4 and len(rest.params) == 2
    groups, rest = kernel_groups(t, h, device_type="cuda")
    assert groups == [] and len(rest.params) == 6
    assert kernel_groups(HamTensors(p[:1], g[:1], momentum_bufs=bufs[:1]), h)[1] is None


@pytest.mark.parametrize("torch_opt,opts", [
    (dict(momentum=0.9, nesterov=True, weight_decay=0.01), dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    (dict(momentum=0.8, dampening=0.3, maximize=True), dict(momentum=0.8, dampening=0.3, maximize=True)),
    (dict(weight_decay=0.1), dict(weight_decay=0.1)),
])
def test_reference_sgd_is_torch_sgd_when_alpha_beta_zero(torch_opt, opts):
    ref = _run("reference", "sgd", dict(opts, alpha=0.0, beta=0.0), torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SIZES]
    with torch.no_grad():
        params[-1].view(-1)[::5] = 0
    opt = torch.optim.SGD(params, lr=0.05, foreach=False, **torch_opt)
    for _ in range(3):
        for p, s in zip(params, SIZES):
            p.grad = torch.randn(s, generator=gen)
        opt.step()
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), ref[0][i])
        if opts.get("momentum"):
            assert torch.equal(opt.state[p]["momentum_buffer"], ref[1]["momentum_bufs"][i])


@pytest.mark.parametrize("betas,wd", [((0.9, 0.999), 0.1), ((0.3, 0.99), 0.0)])
def test_reference_adamw_is_torch_adamw_when_alpha_beta_zero(betas, wd):
    """Bit for bit, step after step from torch's state: the moments everywhere, θ wherever
    torch's sqrt is correctly rounded (on MKL builds it is not everywhere: ham_reference.sqrt_rn)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4099, generator=gen).requires_grad_()
    opt = torch.optim.AdamW([p], lr=0.05, betas=betas, weight_decay=wd, foreach=False)
    for k in range(1, 4):
        theta, st = p.detach().clone(), opt.state[p]
        ea = st["exp_avg"].clone() if st else torch.zeros_like(theta)
        es = st["exp_avg_sq"].clone() if st else torch.zeros_like(theta)
        p.grad = torch.randn(4099, generator=gen)
        opt.step()
        h = _hparams("adamw", dict(weight_decay=wd, beta1=betas[0], beta2=betas[1], alpha=0.0, beta=0.0), k)
        ham_reference.step(HamTensors([theta], [p.grad], [ea], [es]), h)
        assert torch.equal(ea, st["exp_avg"]) and torch.equal(es, st["exp_avg_sq"])
        exact_sqrt = es.sqrt() == ham_reference.sqrt_rn(es)
        assert exact_sqrt.float().mean() > 0.5
        assert torch.equal(theta[exact_sqrt], p.detach()[exact_sqrt])
        torch.testing.assert_close(theta, p.detach(), rtol=2e-7, atol=1e-8)  # an ulp of lr·update


def test_mirror_step_formula():
    """The mirror step against the paper's formula in float64 (to fp32 rounding)."""
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(1000, generator=gen)
    theta[::7] = 0
    g = torch.randn(1000, generator=gen) * 10
    lr, alpha, beta = 0.01, 200.0, 1e-3
    got = ham_reference.mirror(theta, g, lr, alpha, beta)
    t64 = theta.double()
    want = t64 * torch.exp((-lr * (alpha * torch.sign(t64) * g.double() + beta)).clamp(-5, 5))
    torch.testing.assert_close(got.double(), want, rtol=1.5e-6, atol=0)  # z rounds to fp32: ulp(5) ≈ 5e-7
    assert torch.equal(got[::7], theta[::7]) and (got[::7] == 0).all()
    # clamped: a huge gradient shrinks θ by e^-5 at most, grows it by e^5 at most
    big = ham_reference.mirror(torch.tensor([2.0, -2.0]), torch.tensor([1e9, 1e9]), 1.0, 1.0, 0.0)
    torch.testing.assert_close(big, torch.tensor([2.0 * torch.exp(torch.tensor(-5.0)).item(),
                                                  -2.0 * torch.exp(torch.tensor(5.0)).item()]))
