"""HAM, HAMAdamW and HAMSGD as torch optimizers: against torch and each other over steps,
and the optimizer contract (param groups, state_dict, hooks, AMP, capturable, bad input)."""
from __future__ import annotations

import copy

import pytest
import torch

from pilot_kernels import HAM, HAMSGD, HAMAdamW

BACKENDS = ["reference", "cpu", "triton"]


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)


def _train(model, opt, steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(5, 6, generator=gen).to(next(model.parameters()).dtype)
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _equal(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b)), [(x - y).abs().max().item() for x, y in zip(a, b)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hamsgd_is_torch_sgd_when_alpha_beta_zero(backend):
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    m1, m2 = _model(), _model()
    want = _train(m1, torch.optim.SGD(m1.parameters(), foreach=False, **kw))
    _equal(_train(m2, HAMSGD(m2.parameters(), alpha=0.0, beta=0.0, backend=backend, **kw)), want)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("make", [
    lambda ps, b: HAMAdamW(ps, lr=0.01, weight_decay=0.1, backend=b),
    lambda ps, b: HAMSGD(ps, lr=0.05, momentum=0.9, dampening=0.1, backend=b),
    lambda ps, b: HAM(torch.optim.AdamW(ps, lr=0.01), alpha=50.0, beta=0.01, backend=b),
], ids=["adamw", "sgd", "wrapper"])
def test_fused_optimizers_match_the_reference(backend, dtype, make):
    m1, m2 = _model(dtype=dtype), _model(dtype=dtype)
    o1, o2 = make(m1.parameters(), "reference"), make(m2.parameters(), backend)
    _equal(_train(m2, o2), _train(m1, o1))
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        for k, v in o1.state[p1].items():
            assert torch.equal(v, o2.state[p2][k]), k


@pytest.mark.parametrize("base,fused", [
    (lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False),
     lambda ps: HAMAdamW(ps, lr=0.01, weight_decay=0.1, backend="reference")),
    (lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=True),
     lambda ps: HAMAdamW(ps, lr=0.01, weight_decay=0.1, backend="reference")),
    # the foreach nesterov path writes into .grad: HAM keeps a copy for it
    (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, foreach=True),
     lambda ps: HAMSGD(ps, lr=0.05, momentum=0.9, nesterov=True, backend="reference")),
    (lambda ps: torch.optim.SGD(ps, lr=0.05, maximize=True, weight_decay=0.01),
     lambda ps: HAMSGD(ps, lr=0.05, maximize=True, weight_decay=0.01, backend="reference")),
], ids=["adamw", "adamw-foreach", "sgd-nesterov-foreach", "sgd-maximize"])
def test_wrapper_equals_the_fused_step(base, fused):
    m1, m2 = _model(), _model()
    got = _train(m1, HAM(base(m1.parameters()), backend="reference"))
    want = _train(m2, fused(m2.parameters()))
    if isinstance(HAM(base([torch.nn.Parameter(torch.ones(1))])).base, torch.optim.SGD):
        _equal(got, want)
    else:  # torch's CPU sqrt (MKL) is off by an ulp where the fused step's is correctly rounded
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_only_matrices_take_the_mirror_step_by_default():
    m1, m2 = _model(), _model()
    got = _train(m1, HAMSGD(m1.parameters(), lr=0.1, alpha=100.0, beta=0.1, backend="reference"), steps=1)
    want = _train(m2, torch.optim.SGD(m2.parameters(), lr=0.1, foreach=False), steps=1)
    for p, x, y in zip(m1.parameters(), got, want):
        assert torch.equal(x, y) == (p.ndim < 2)
    m3, m4 = _model(), _model()
    want = _train(m4, torch.optim.SGD(m4.parameters(), lr=0.1, foreach=False))
    got = _train(m3, HAMSGD([{"params": [p for p in m3.parameters() if p.ndim >= 2], "ham": False},
                             {"params": [p for p in m3.parameters() if p.ndim < 2]}],
                            lr=0.1, alpha=100.0, beta=0.1, backend="reference"))
    _equal(got, want)   # ham=False on the matrices: plain SGD everywhere


def test_mirror_step_drives_weights_towards_zero_and_keeps_zeros():
    m = _model()
    with torch.no_grad():
        m[0].weight[:, 0] = 0
    opt = HAM(torch.optim.SGD(m.parameters(), lr=0.0), alpha=0.0, beta=1.0, backend="reference")
    opt.param_groups[0]["lr"] = 0.5       # base SGD with lr 0.5 but zero gradients: β decay only
    before = m[0].weight.detach().clone()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(m[0].weight.detach(), before * torch.exp(torch.tensor(-0.5)))
    assert (m[0].weight[:, 0] == 0).all()


@pytest.mark.parametrize("make", [
    lambda ps: HAMAdamW(ps, lr=0.01, backend="reference"),
    lambda ps: HAMSGD(ps, lr=0.05, momentum=0.9, backend="reference"),
    lambda ps: HAM(torch.optim.Adam(ps, lr=0.01), backend="reference"),
], ids=["adamw", "sgd", "wrapper"])
def test_state_dict_round_trip(make):
    m1 = _model()
    o1 = make(m1.parameters())
    _train(m1, o1, steps=2)
    m2 = copy.deepcopy(m1)
    o2 = make(m2.parameters())
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    _equal(_train(m2, o2, steps=2, seed=5), _train(m1, o1, steps=2, seed=5))
    assert o2.state_dict()["param_groups"][0].keys() == o1.state_dict()["param_groups"][0].keys()


def test_state_stays_fp32_for_bf16_parameters_after_load():
    m = _model(dtype=torch.bfloat16)
    o = HAMAdamW(m.parameters(), backend="reference")
    _train(m, o, steps=1)
    o2 = HAMAdamW(m.parameters(), backend="reference")
    o2.load_state_dict(o.state_dict())
    st = o2.state[next(m.parameters())]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(st["exp_avg"], o.state[next(m.parameters())]["exp_avg"])


def test_hooks_and_lr_scheduler():
    m = _model()
    opt = HAM(torch.optim.SGD(m.parameters(), lr=0.1), backend="reference")
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(m, opt, steps=1)
    sched.step()
    assert calls == ["pre", "post"] and opt.base.param_groups[0]["lr"] == 0.05
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))]})
    assert opt.base.param_groups[-1]["ham_alpha"] == 200.0 and len(opt.param_groups) == 2


@pytest.mark.parametrize("bad,match", [
    (dict(lr=-1.0), "lr"), (dict(alpha=-1.0), "alpha"), (dict(beta=float("nan")), "beta"),
    (dict(betas=(1.0, 0.999)), "betas"), (dict(ham="yes"), "ham"), (dict(backend="gpu"), "backend"),
])
def test_bad_hyperparameters_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        HAMAdamW(_model().parameters(), **bad)


def test_bad_input_at_step_changes_nothing():
    m = _model()
    opt = HAMAdamW(m.parameters(), lr=0.01, backend="reference")
    _train(m, opt, steps=1)
    params = [p.detach().clone() for p in m.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["alpha"] = -3.0
    with pytest.raises(ValueError, match="alpha"):
        opt.step()
    opt.param_groups[0]["alpha"] = 200.0
    last = list(m.parameters())[-1]
    last.grad = torch.zeros(last.shape).to_sparse()  # a sparse gradient, on the last tensor
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    _equal([p.detach() for p in m.parameters()], params)
    assert opt.state_dict()["state"][0]["step"] == state["state"][0]["step"]


def test_wrapper_raises_when_the_base_writes_into_grad():
    class Writes(torch.optim.SGD):
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad.mul_(2)
            return super().step(closure)

    m = _model()
    opt = HAM(Writes(m.parameters(), lr=0.1), backend="reference")
    with pytest.raises(RuntimeError, match="grad_copy=True"):
        _train(m, opt, steps=1)
    m1 = _model()
    got = _train(m1, HAM(Writes(m1.parameters(), lr=0.1), grad_copy=True, backend="reference"))
    assert all(torch.isfinite(x).all() for x in got)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_amp_found_inf_skips_and_grad_scale_unscales(backend):
    m1, m2 = _model(), _model()
    o1 = HAMSGD(m1.parameters(), lr=0.05, momentum=0.9, backend=backend)
    o2 = HAMSGD(m2.parameters(), lr=0.05, momentum=0.9, backend=backend)
    want = _train(m2, o2, steps=1)
    o1.grad_scale = torch.tensor(8.0)
    o1.found_inf = torch.tensor(0.0)
    gen = torch.Generator().manual_seed(1)
    o1.zero_grad()
    (8.0 * m1(torch.randn(5, 6, generator=gen)).square().mean()).backward()
    o1.step()
    for x, y in zip([p.detach() for p in m1.parameters()], want):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)   # g·8/8 == g (powers of two)
    o1.found_inf = torch.tensor(1.0)
    before = [p.detach().clone() for p in m1.parameters()]
    o1.step()
    _equal([p.detach() for p in m1.parameters()], before)


def test_capturable_adamw_equals_host_counters_on_cpu():
    m1, m2 = _model(), _model()
    got = _train(m1, HAMAdamW(m1.parameters(), lr=torch.tensor(0.015625), capturable=True, backend="cpu"))
    want = _train(m2, HAMAdamW(m2.parameters(), lr=0.015625, backend="cpu"))
    _equal(got, want)


def test_step_with_closure_equals_backward_then_step():
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    results = []
    for use_closure in (True, False):
        m = _model()
        opt = HAM(torch.optim.SGD(m.parameters(), lr=0.1), backend="reference")

        def closure():
            opt.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            return loss

        if use_closure:
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        results.append((loss.item(), [p.detach().clone() for p in m.parameters()]))
    assert results[0][0] == results[1][0]
    _equal(results[0][1], results[1][1])
