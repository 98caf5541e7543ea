"""What torch's own optimizer tests (test_optim.py's TestOptimRenewed, driven by an
OptimizerInfo modelled on SGD's) expect of any optimizer, item by item, plus the writes
real code makes into parameters through ``.data``."""
import pytest
import torch
from torch import nn

from pilot_kernels import PILoT
from pilot_kernels.init import exact_split_share, split

BACKENDS = ["reference", "cpu", "triton"]


def _backend(name, monkeypatch):
    if name == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return name


# ------------------------------------------------------------------ construction
def test_a_bare_tensor_as_params_raises_type_error_as_torch():
    p = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        torch.optim.SGD(p, lr=0.1)
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        PILoT(p, lr=0.1)


def test_lr_defaults_to_sgds():
    p = nn.Parameter(torch.randn(3, 2))
    assert PILoT([p]).defaults["lr"] == torch.optim.SGD([p]).defaults["lr"] == 1e-3
    # torch's schedulers and param-group tests build optimizers without an lr.
    opt = PILoT([p])
    opt.add_param_group({"params": [nn.Parameter(torch.randn(4))]})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-4]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_plain_tensors_have_sgds_state_dict(momentum):
    """No empty state entries: a plain tensor's state is SGD's, before and after steps."""
    torch.manual_seed(0)
    ours, theirs = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    opt = PILoT([ours], lr=0.1, momentum=momentum)
    sgd = torch.optim.SGD([theirs], lr=0.1, momentum=momentum)
    for _ in range(2):
        ours.grad, theirs.grad = torch.ones(5), torch.ones(5)
        opt.step()
        sgd.step()
    a, b = opt.state_dict()["state"], sgd.state_dict()["state"]
    assert a.keys() == b.keys()
    for k in b:
        assert set(b[k]) <= set(a[k]) and all(torch.equal(a[k][n], b[k][n]) for n in b[k])


# ------------------------------------------------------------------ exact split
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1.0), (torch.float32, 0.05), (torch.bfloat16, 1.0),
                                         (torch.float16, 1.0)], ids=["fp32", "fp32-small", "bf16", "fp16"])
def test_a_step_with_nothing_to_do_is_a_no_op(backend, dtype, scale, monkeypatch):
    """Zero gradients and α = weight_decay = 0: every step writes x back bit for bit
    wherever a pair (m, w) with fl(m·w) = x exists (for N(0, 1) entries at β = 1 the
    closed form alone misses ~9% of them; the split's ulp nudges find all but ~0.3%)."""
    backend = _backend(backend, monkeypatch)
    torch.manual_seed(0)
    x = nn.Parameter((torch.randn(33, 7) * scale).to(dtype))
    before = x.detach().clone()
    m, w = split(before, 1.0)
    exact = (m * w).to(dtype) == before
    assert exact.float().mean() > 0.99
    opt = PILoT([x], lr=0.1, momentum=0.9, backend=backend)
    for _ in range(2):
        x.grad = torch.zeros_like(x)
        opt.step()
        assert torch.equal(x.detach()[exact], before[exact])


def test_the_exact_split_share_is_reported_and_nudges_stay_tiny():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    assert exact_split_share(x * 0.02, 1.0) == 1.0
    share = exact_split_share(x, 1.0)
    assert 0.99 < share < 1.0  # values near β: a few have no exact pair
    m, w = split(x, 1.0)
    # m moved by at most two ulps: m² − w² stays β to fp32 accuracy.
    assert torch.allclose(m.double() ** 2 - w.double() ** 2, torch.ones(1, dtype=torch.float64), atol=1e-5)


# ------------------------------------------------------------------ writes through .data
WRITES = {
    "data.copy_": lambda p: p.data.copy_(torch.linspace(-0.3, 0.3, p.numel()).reshape(p.shape)),
    "data.mul_": lambda p: p.data.mul_(0.5),
    "data.clamp_": lambda p: p.data.clamp_(-0.01, 0.01),
    "data[mask]=0": lambda p: p.data.__setitem__(p.data.abs() < 0.03, 0.0),
    "data=": lambda p: setattr(p, "data", p.data * 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("write", WRITES, ids=str)
def test_writes_through_data_are_kept(backend, write, monkeypatch):
    """A write that bumps no version counter of ``p`` survives the next step: with
    lr = 0 the step changes nothing, as torch.optim.SGD's would."""
    backend = _backend(backend, monkeypatch)
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 5) * 0.05)
    opt = PILoT([p], lr=0.1, momentum=0.9, backend=backend)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    WRITES[write](p)
    written = p.detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(p.detach(), written)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_written_elements_restart(backend, monkeypatch):
    """A pruning mask zeroes some entries: those are split again (m = √β, w = 0) and
    their momentum restarts; the others keep factors and momentum, bit for bit."""
    backend = _backend(backend, monkeypatch)
    torch.manual_seed(0)
    p, q = nn.Parameter(torch.randn(8, 9) * 0.05), nn.Parameter(torch.randn(8, 9) * 0.05)
    q.data.copy_(p.data)
    opt_p = PILoT([p], lr=0.1, momentum=0.9, backend=backend)
    opt_q = PILoT([q], lr=0.1, momentum=0.9, backend=backend)
    for _ in range(2):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
        opt_p.step()
        opt_q.step()
    mask = p.detach().abs() < 0.03
    p.data[mask] = 0.0
    g = torch.randn_like(p)
    p.grad, q.grad = g.clone(), g.clone()
    opt_p.step()
    opt_q.step()
    sp, sq = opt_p.state[p], opt_q.state[q]
    keep = ~mask
    for k in ("m", "w", "momentum_m", "momentum_w"):
        assert torch.equal(sp[k][keep], sq[k][keep]), k
    m0, w0 = split(torch.zeros(int(mask.sum())), 1.0)
    d_m = g[mask] * w0            # the first step of a fresh element: b = d
    assert torch.equal(sp["momentum_m"][mask], d_m)
    assert torch.equal(sp["m"][mask], m0 - 0.1 * d_m)
