"""The reference backend (the oracle) against torch.optim.SGD and against the update
written out by hand, including the adoption of elements written into x."""
import pytest
import torch

from pilot_kernels import PILoT, split
from pilot_kernels.kernels import StepExtras
from pilot_kernels.kernels.reference import written
from helpers import (OPTION_GRID, assert_same_state, fresh_state, hparams, option_id, random_grads, step,
                     write_every_kind)

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
        b_m = torch.where(first, d_m, momentum * b_m + (1 - dampening) * d_m)   # first: a mask
        b_w = torch.where(first, d_w, momentum * b_w + (1 - dampening) * d_w)
        d_m = d_m + momentum * b_m if nesterov else b_m
        d_w = d_w + momentum * b_w if nesterov else b_w
    m = m - lr * d_m
    w = w - lr * d_w
    return m * w, m, w, b_m, b_w


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_reparam_matches_the_update_by_hand(opts, beta):
    """The reference step against the update written out in float64, with a write into x
    (adopted: re-split from the written value, momentum restarted there) midway."""
    shapes = [(4, 3), (2, 3, 5)]
    s = fresh_state(shapes, beta=beta, momentum=opts["momentum"] != 0, seed=1)
    h = hparams(beta=beta, lr=0.05, **opts)
    hand = [dict(m=m.double(), w=w.double(), b_m=torch.zeros_like(m, dtype=torch.float64),
                 b_w=torch.zeros_like(m, dtype=torch.float64)) for m, w in zip(s["ms"], s["ws"])]
    first = [torch.ones(sh, dtype=torch.bool) for sh in shapes]
    l1 = torch.zeros(())
    for k, grads in enumerate(_grads(shapes, STEPS, seed=2)):
        if k == 3:
            written = write_every_kind(s["xs"], torch.Generator().manual_seed(3))
            for x, st, new, f in zip(s["xs"], hand, written, first):
                m, w = split(x, beta)
                st["m"] = torch.where(new, m.double(), st["m"])
                st["w"] = torch.where(new, w.double(), st["w"])
                f |= new
        step("reference", s, grads, h, StepExtras(l1_accum=l1, l1_clear=l1))
        total = 0.0
        for i, (st, g) in enumerate(zip(hand, grads)):
            x, st["m"], st["w"], st["b_m"], st["b_w"] = _by_hand(
                None, st["m"], st["w"], st["b_m"], st["b_w"], g.double(), lr=0.05, first=first[i], **opts)
            first[i] = torch.zeros_like(first[i])
            total += x.abs().sum().item()
    for i, st in enumerate(hand):
        for key, ref in (("ms", st["m"]), ("ws", st["w"])):
            assert s[key][i].dtype == torch.float32
            torch.testing.assert_close(s[key][i].double(), ref, rtol=1e-5, atol=1e-6)
        if opts["momentum"]:
            torch.testing.assert_close(s["momentum_ms"][i].double(), st["b_m"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s["momentum_ws"][i].double(), st["b_w"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["xs"][i].double(), st["m"] * st["w"], rtol=1e-5, atol=1e-6)
        assert torch.equal(s["xs"][i], s["ms"][i] * s["ws"][i])   # x == m·w exactly after a step
    torch.testing.assert_close(l1.item(), total, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_written_marks_exactly_the_elements_written(dtype):
    s = fresh_state([(40,), (7, 9), (3,), (5, 5), (11,)], dtype)
    assert not any(written(x, m, w).any() for x, m, w in zip(s["xs"], s["ms"], s["ws"]))
    marks = write_every_kind(s["xs"], torch.Generator().manual_seed(0))
    for x, m, w, mark in zip(s["xs"], s["ms"], s["ws"], marks):
        assert torch.equal(written(x, m, w), mark)


def test_adopt_writes_off_overwrites_a_write():
    s = fresh_state([(6, 4)])
    m0, w0 = s["ms"][0].clone(), s["ws"][0].clone()
    s["xs"][0].data.fill_(3.0)
    zeros = [torch.zeros(6, 4)]
    step("reference", s, zeros, hparams(adopt_writes=False, lr=0.0, alpha=0.0))
    assert torch.equal(s["ms"][0], m0) and torch.equal(s["ws"][0], w0)
    assert torch.equal(s["xs"][0], m0 * w0)
    s["xs"][0].data.fill_(3.0)
    step("reference", s, zeros, hparams(lr=0.0, alpha=0.0))
    assert torch.equal(s["xs"][0], torch.full((6, 4), 3.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_params_keep_fp32_math(dtype):
    """16-bit parameters: state fp32, x is the rounding of the fp32 product."""
    s = fresh_state([(6, 7)], dtype)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        step("reference", s, random_grads(s, gen), hparams())
    assert all(s[k][0].dtype == torch.float32 for k in ("ms", "ws", "momentum_ms", "momentum_ws"))
    assert torch.equal(s["xs"][0], (s["ms"][0] * s["ws"][0]).to(dtype))
