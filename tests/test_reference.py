"""The reference backend against torch.optim.SGD and against the update written out by hand."""
import pytest
import torch

from pilot_kernels import PILoT, split
from helpers import OPTION_GRID, assert_same_state, option_id

STEPS = 7


def _grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_plain_tensors_match_sgd(opts):
    """Tensors that are not reparameterized follow torch.optim.SGD bit for bit."""
    shapes = [(5,), (3, 4), (1,)]
    torch.manual_seed(0)
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    sgd_opts = {k: v for k, v in opts.items() if k != "alpha"}
    opt_a = PILoT(ours, lr=0.05, reparam=False, backend="reference", **opts)
    opt_b = torch.optim.SGD(theirs, lr=0.05, **sgd_opts)
    for grads in _grads(shapes, STEPS):
        for pa, pb, g in zip(ours, theirs, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert_same_state(opt_a, ours, opt_b, theirs, exact=True)


def _by_hand(x, m, w, b_m, b_w, g, *, lr, momentum, dampening, nesterov, alpha, weight_decay,
                 maximize, first):
    """The update of the PILoT docstring, one line per equation, in float64."""
    if maximize:
        g = -g
    g = g + weight_decay * m * w
    d_m = g * w + 2 * alpha * m
    d_w = g * m + 2 * alpha * w
    if momentum != 0:
        b_m = d_m if first else momentum * b_m + (1 - dampening) * d_m
        b_w = d_w if first else momentum * b_w + (1 - dampening) * d_w
        d_m = d_m + momentum * b_m if nesterov else b_m
        d_w = d_w + momentum * b_w if nesterov else b_w
    m = m - lr * d_m
    w = w - lr * d_w
    return m * w, m, w, b_m, b_w


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_reparam_matches_the_update_by_hand(opts, beta):
    shapes = [(4, 3), (2, 3, 5)]
    torch.manual_seed(1)
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    init = [p.detach().clone() for p in params]
    opt = PILoT(params, lr=0.05, beta=beta, backend="reference", **opts)

    # The hand-written model of the same run, in float64.
    hand = []
    for x0 in init:
        m, w = (t.double() for t in split(x0, beta))
        hand.append(dict(m=m, w=w, b_m=torch.zeros_like(m), b_w=torch.zeros_like(m)))
    l1 = None
    for step, grads in enumerate(_grads(shapes, STEPS, seed=2)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        l1 = 0.0
        for s, g in zip(hand, grads):
            x, s["m"], s["w"], s["b_m"], s["b_w"] = _by_hand(
                None, s["m"], s["w"], s["b_m"], s["b_w"], g.double(), lr=0.05, first=step == 0, **opts)
            l1 += x.abs().sum().item()
    for p, s in zip(params, hand):
        st = opt.state[p]
        for key, ref in (("m", s["m"]), ("w", s["w"])):
            assert st[key].dtype == torch.float32
            torch.testing.assert_close(st[key].double(), ref, rtol=1e-5, atol=1e-6)
        if opts["momentum"]:
            torch.testing.assert_close(st["momentum_m"].double(), s["b_m"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(st["momentum_w"].double(), s["b_w"], rtol=1e-5, atol=1e-6)
        else:
            assert "momentum_m" not in st
        torch.testing.assert_close(p.detach().double(), s["m"] * s["w"], rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), st["m"] * st["w"])   # x == m·w exactly after a step
    torch.testing.assert_close(opt.l1_norm().item(), l1, rtol=1e-5, atol=1e-5)


def test_bf16_params_keep_fp32_math():
    """bf16 parameters: state fp32, x is the bf16 rounding of the fp32 product."""
    torch.manual_seed(0)
    p = torch.randn(6, 7).bfloat16().requires_grad_()
    opt = PILoT([p], lr=0.1, alpha=1e-2, backend="reference")
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    st = opt.state[p]
    assert st["m"].dtype == st["w"].dtype == st["momentum_m"].dtype == torch.float32
    assert torch.equal(p.detach(), (st["m"] * st["w"]).bfloat16())
