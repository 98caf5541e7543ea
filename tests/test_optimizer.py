"""The PILoT optimizer as a torch.optim.Optimizer: init, state, AMP, errors, drop-in use."""
import copy
import io

import pytest
import torch
from torch import nn

from pilot_kernels import PILoT, split, split_
from pilot_kernels.kernels import ENV_VAR, resolve_backend
from helpers import assert_same_state


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g).to(next(model.parameters()).dtype)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
             for p in model.parameters()})


def _assert_unchanged(model, opt, snap):
    params, state = snap
    for p, p0 in zip(model.parameters(), params):
        assert torch.equal(p.detach(), p0)
        assert set(opt.state[p].keys()) == set(state[id(p)].keys())
        for k, v in state[id(p)].items():
            now = opt.state[p][k]
            assert torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v, k


# ------------------------------------------------------------------ init (paper §3)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 4.0])
def test_split_identities(beta):
    x = torch.cat([torch.randn(1000), torch.zeros(3), torch.tensor([1e-20, -1e3])])
    m, w = split(x, beta)
    assert m.dtype == w.dtype == torch.float32
    assert (m >= 0).all()
    torch.testing.assert_close(m * w, x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m * m - w * w, torch.full_like(x, beta), rtol=1e-4, atol=1e-4 * (1 + x.abs()).max())
    if beta == 0.0:  # spred: exactly balanced, |m| == |w|, signs live in w
        torch.testing.assert_close(m, x.abs().sqrt())
        assert torch.equal(w.abs(), m) and torch.equal(w.sign(), x.sign())
    else:
        assert (m > 0).all()


def test_split_in_place_makes_identity_exact():
    x = torch.randn(50).bfloat16()
    m, w = split_(x, 1.0)
    assert torch.equal(x, (m * w).bfloat16())


def test_construction_splits_only_matrices_and_leaves_the_model():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = PILoT(model.parameters(), lr=0.1, beta=1.0)
    for p, p0 in zip(model.parameters(), before):
        st = opt.state[p]
        assert torch.equal(p.detach(), p0)
        if p.ndim >= 2:
            assert set(st) == {"m", "w", "momentum_m", "momentum_w", "momentum_started"}
            assert all(st[k].dtype == torch.float32 and st[k].shape == p.shape
                       for k in ("m", "w", "momentum_m", "momentum_w"))
            assert not st["momentum_m"].any() and st["momentum_started"] is False
            m, w = split(p0, 1.0)
            assert torch.equal(st["m"], m) and torch.equal(st["w"], w)
            torch.testing.assert_close(st["m"] * st["w"], p0, rtol=2.0**-23, atol=0.0)
        else:
            # SGD's buffer, allocated up front so a checkpoint template is complete.
            assert set(st) == {"momentum_buffer", "momentum_started"} and not st["momentum_buffer"].any()
            assert torch.equal(p.detach(), p0)
    expected = sum((opt.state[p]["m"] * opt.state[p]["w"]).abs().sum() for p in model.parameters() if p.ndim >= 2)
    torch.testing.assert_close(opt.l1_norm(), expected)


def test_reparam_group_options():
    model = _model()
    w1, b1, w2, b2 = model.parameters()
    opt = PILoT([{"params": [w1, b1], "reparam": True}, {"params": [w2, b2], "reparam": False}], lr=0.1)
    assert "m" in opt.state[b1] and "m" in opt.state[w1]
    assert "m" not in opt.state[w2] and "m" not in opt.state[b2]


# ------------------------------------------------------------------ step behaviour
def test_l1_norm_is_sum_abs_mw_after_each_step():
    model = _model()
    opt = PILoT(model.parameters(), lr=0.1, alpha=1e-2)
    for _ in range(3):
        _train(model, opt, 1)
        expected = sum((opt.state[p]["m"] * opt.state[p]["w"]).abs().sum() for p in model.parameters() if p.ndim >= 2)
        l1 = opt.l1_norm()
        assert l1.dim() == 0 and l1.device == expected.device
        torch.testing.assert_close(l1, expected)


def test_alpha_change_between_steps_takes_effect():
    """Changing group['alpha'] matters: decay shrinks the factors."""
    results = []
    for alpha in (0.0, 0.5):
        model = _model()
        opt = PILoT(model.parameters(), lr=0.1, momentum=0.0)
        _train(model, opt, 1)
        opt.param_groups[0]["alpha"] = alpha
        _train(model, opt, 3)
        results.append(opt.l1_norm().item())
    assert results[1] < results[0] * 0.9


def test_closure_hooks_zero_grad_and_add_param_group():
    model = _model()
    params = list(model.parameters())
    opt = PILoT(params[:2], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = model(torch.randn(4, 6)).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    opt.add_param_group({"params": params[2:], "alpha": 1e-3})
    assert "m" in opt.state[params[2]] and opt.param_groups[1]["alpha"] == 1e-3
    opt.step(closure)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)


def test_params_without_grad_are_skipped():
    model = _model()
    opt = PILoT(model.parameters(), lr=0.1)
    frozen = model[2].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    _train(model, opt, 2)
    assert torch.equal(frozen, before) and opt.state[frozen]["momentum_started"] is False


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        resolve_backend("cuda", torch.device("cpu"))


# ------------------------------------------------------------------ state_dict and resume
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_state_dict_resume_equals_uninterrupted(dtype):
    ref_model = _model(dtype=dtype)
    ref_opt = PILoT(ref_model.parameters(), lr=0.05, alpha=1e-2, weight_decay=1e-3)
    _train(ref_model, ref_opt, 3)
    _train(ref_model, ref_opt, 3, seed=2)

    model = _model(dtype=dtype)
    opt = PILoT(model.parameters(), lr=0.05, alpha=1e-2, weight_decay=1e-3)
    _train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    fresh = _model(seed=123, dtype=dtype)            # different init: the load must win
    fresh_opt = PILoT(fresh.parameters(), lr=0.05, alpha=1e-2, weight_decay=1e-3)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    for p in fresh.parameters():
        for k, v in fresh_opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == (p.dtype if k == "momentum_buffer" else torch.float32), k
    torch.testing.assert_close(fresh_opt.l1_norm(), opt.l1_norm())
    _train(fresh, fresh_opt, 3, seed=2)
    # The resumed run equals the run that was never interrupted: parameters and state.
    assert_same_state(ref_opt, list(ref_model.parameters()), fresh_opt, list(fresh.parameters()), exact=True)
    assert torch.equal(ref_opt.l1_norm(), fresh_opt.l1_norm())
    assert not all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), _model(dtype=dtype).parameters()))


def test_load_state_dict_mismatches_raise_and_change_nothing():
    model = _model()
    opt = PILoT(model.parameters(), lr=0.1)
    _train(model, opt, 2)
    good = copy.deepcopy(opt.state_dict())
    snap = _snapshot(model, opt)

    bad_shape = copy.deepcopy(good)
    bad_shape["state"][0]["m"] = torch.zeros(2, 2)
    other_reparam = copy.deepcopy(good)
    del other_reparam["state"][0]["m"], other_reparam["state"][0]["w"]
    fewer_groups = copy.deepcopy(good)
    fewer_groups["param_groups"] = []
    fewer_params = copy.deepcopy(good)
    fewer_params["param_groups"][0]["params"] = fewer_params["param_groups"][0]["params"][:2]
    for bad, pattern in [(bad_shape, "shape"), (other_reparam, "reparameterized"),
                         (fewer_groups, "param groups"), (fewer_params, "tensors")]:
        with pytest.raises(ValueError, match=pattern):
            opt.load_state_dict(bad)
        _assert_unchanged(model, opt, snap)


# ------------------------------------------------------------------ AMP
def test_grad_scaler_skips_inf_steps_and_unscales():
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    model, ref = _model(), _model()
    opt = PILoT(model.parameters(), lr=0.05, alpha=1e-2)
    ref_opt = PILoT(ref.parameters(), lr=0.05, alpha=1e-2)
    x = torch.randn(8, 6)

    # A scaled step equals an unscaled step.
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    ref(x).pow(2).mean().backward()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    # A step with an inf gradient changes nothing and lowers the scale.
    opt.zero_grad()
    snap = _snapshot(model, opt)
    scale = scaler.get_scale()
    scaler.scale(model(x).pow(2).mean()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    _assert_unchanged(model, opt, snap)
    assert scaler.get_scale() < scale


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(lr=-0.1), ValueError, "lr must be >= 0"),
    (dict(momentum=-0.9), ValueError, "momentum must be >= 0"),
    (dict(alpha=-1.0), ValueError, "alpha must be >= 0"),
    (dict(beta=-1.0), ValueError, "beta must be >= 0"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay must be >= 0"),
    (dict(nesterov=True, momentum=0.0), ValueError, "Nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "Nesterov"),
    (dict(reparam="yes"), ValueError, "reparam"),
    (dict(backend="fast"), ValueError, "backend"),
])
def test_bad_hyperparameters_raise_before_any_change(kwargs, exc, pattern):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(exc, match=pattern):
        PILoT(model.parameters(), **{"lr": 0.1, **kwargs})
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)


@pytest.mark.parametrize("dtype, pattern", [
    (torch.complex64, "complex"), (torch.int64, "floating-point"), (torch.float64, "float32, bfloat16"),
])
def test_bad_parameter_dtypes(dtype, pattern):
    good = nn.Parameter(torch.randn(3, 3))
    bad = torch.zeros(3, 3, dtype=dtype)
    before = good.detach().clone()
    with pytest.raises(TypeError, match=pattern):
        PILoT([good, bad], lr=0.1)
    assert torch.equal(good, before)  # the good tensor was not split either


def test_bad_input_at_step_changes_nothing():
    model = _model()
    opt = PILoT(model.parameters(), lr=0.1)
    _train(model, opt, 1)
    snap = _snapshot(model, opt)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        _train(model, opt, 1)
    _assert_unchanged(model, opt, snap)
    opt.param_groups[0]["lr"] = 0.1
    emb = nn.Embedding(10, 4, sparse=True)
    opt2 = PILoT(list(model.parameters()) + list(emb.parameters()), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    model(torch.randn(2, 6)).sum().backward()
    snap2 = _snapshot(model, opt2)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt2.step()
    _assert_unchanged(model, opt2, snap2)


def test_bad_param_group_added_later_changes_nothing():
    model = _model()
    opt = PILoT(list(model.parameters())[:2], lr=0.1)
    n_groups = len(opt.param_groups)
    extra = nn.Parameter(torch.randn(4, 4))
    before = extra.detach().clone()
    with pytest.raises(ValueError, match="alpha"):
        opt.add_param_group({"params": [extra], "alpha": -1})
    assert len(opt.param_groups) == n_groups and torch.equal(extra, before) and extra not in opt.state


# ------------------------------------------------------------------ plain tensors' SGD
def _plain_pair(dtypes, opts, steps, swap_at=None):
    """PILoT (reparam=False) and torch.optim.SGD on the same plain tensors and gradients;
    at step ``swap_at`` the first tensor's data is swapped for a bfloat16 copy in both."""
    torch.manual_seed(0)
    ours = [torch.randn(n, dtype=dt, requires_grad=True) for n, dt in zip((5, 3, 7), dtypes)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = PILoT(ours, lr=0.05, reparam=False, backend="reference", **opts)
    # foreach=True: on the CPU, torch's default per-tensor loop rounds bfloat16
    # differently from its own foreach ops (torch 2.14); PILoT takes the foreach ops.
    sgd = torch.optim.SGD(theirs, lr=0.05, foreach=True, **opts)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == swap_at:
            for p in (ours[0], theirs[0]):
                p.data = p.data.to(torch.bfloat16)
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, generator=g).to(a.dtype)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        sgd.step()
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a, b)
        if opts["momentum"]:
            assert torch.equal(opt.state[a]["momentum_buffer"], sgd.state[b]["momentum_buffer"])


SGD_OPTS = [dict(momentum=0.9, nesterov=True), dict(momentum=0.9, dampening=0.3, weight_decay=1e-2, maximize=True),
            dict(momentum=0.0, weight_decay=1e-2)]


@pytest.mark.parametrize("opts", SGD_OPTS, ids=str)
@pytest.mark.parametrize("dtypes,swap_at", [([torch.float32] * 3, None),
                                            ([torch.float32, torch.bfloat16, torch.float32], None),
                                            ([torch.float32] * 3, 3)], ids=["fp32", "mixed", "swap"])
def test_plain_tensors_follow_torchs_sgd_bit_for_bit(opts, dtypes, swap_at):
    """One dtype, two, or a ``.data`` swap to bfloat16 mid-run: torch.optim.SGD's results."""
    _plain_pair(dtypes, opts, steps=5, swap_at=swap_at)


@pytest.mark.parametrize("opts", SGD_OPTS + [dict(momentum=0.9, nesterov=True, weight_decay=1e-2)], ids=str)
@pytest.mark.parametrize("reparam", [False, "auto"])
def test_step_never_writes_grad(opts, reparam):
    """torch's foreach SGD adds μ·b into the gradients under Nesterov; PILoT's step
    leaves every ``.grad`` as backward wrote it, on every step."""
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = PILoT(params, lr=0.05, reparam=reparam, **opts)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)


# ------------------------------------------------------------------ drop-in
def test_drop_in_torchvision_resnet18_trains():
    """An unmodified torchvision ResNet-18 on small inputs: loss falls under PILoT."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 4, (8,))
    losses = []
    for _ in range(12):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for p in model.parameters():
        if p.ndim >= 2:
            assert torch.equal(p.detach(), opt.state[p]["m"] * opt.state[p]["w"])
