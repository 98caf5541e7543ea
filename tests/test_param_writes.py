"""The model's parameters are the truth: whatever writes a parameter outside step() is
kept, and the next step starts from the parameter's current value."""
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from pilot_kernels import PILoT, prune_
from helpers import assert_same_state


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _step(model, opt, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g).to(next(model.parameters()).dtype)
    opt.zero_grad()
    model(x).float().pow(2).mean().backward()
    opt.step()


def _train(model, opt, steps, seed=1):
    for i in range(steps):
        _step(model, opt, seed + i)


def _assert_kept(p, written):
    """``p`` holds ``written`` up to the split's rounding: the step writes m·w, which for
    a fresh split of an fp32 value is within one ulp of it (about one entry in 800 off
    for β = 1, measured on 10⁶ normal entries) and for bf16/fp16 exactly the value."""
    p, written = p.detach(), written.detach()
    assert p.dtype == written.dtype and p.shape == written.shape
    if p.dtype == torch.float32:
        torch.testing.assert_close(p, written, rtol=2.0**-23, atol=0.0)
    else:
        assert torch.equal(p, written)


# ------------------------------------------------------------------ each kind of write
def _load_pretrained(model):
    model.load_state_dict(_model(seed=7).state_dict())


def _copy(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))


def _data_swap(model):
    for p in model.parameters():
        p.data = torch.randn_like(p)


def _init(model):
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)


def _reset(model):
    torch.manual_seed(3)
    for m in model:
        if isinstance(m, nn.Linear):
            m.reset_parameters()


def _ema(model):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)


WRITES = [_load_pretrained, _copy, _data_swap, _init, _reset, _ema]


@pytest.mark.parametrize("write", WRITES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_write_then_step_with_lr_0_keeps_the_write(write, dtype, backend):
    """After steps where nothing moved (the gather's fast path, the Triton launch plan
    reused), each kind of write is seen at the next step."""
    model = _model(dtype=dtype)
    opt = PILoT(model.parameters(), lr=0.0, momentum=0.9, alpha=1e-2, weight_decay=1e-3, backend=backend)
    _train(model, opt, 3)
    write(model)
    written = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 2, seed=5)
    for p, w in zip(model.parameters(), written):  # weights (split) and biases (SGD) alike
        _assert_kept(p, w)
    for p in model.parameters():
        state = opt.state[p]
        if "m" in state:  # the factors follow the parameter again
            assert torch.equal(p.detach(), (state["m"] * state["w"]).to(dtype))


@pytest.mark.parametrize("write", WRITES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_then_train_equals_an_optimizer_built_after_the_write(write, dtype):
    """A written tensor is split again with fresh momentum: exactly what an optimizer
    built after the write would hold, step after step."""
    model = _model(dtype=dtype)
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-2)
    _train(model, opt, 3)
    write(model)
    after = _model(dtype=dtype)
    after.load_state_dict(model.state_dict())
    # The biases keep SGD's momentum (SGD's own rule for a written parameter); give the
    # fresh optimizer the same, so the comparison is about the split tensors.
    fresh = PILoT(after.parameters(), lr=0.05, momentum=0.9, alpha=1e-2)
    for p, q in zip(model.parameters(), after.parameters()):
        if p.ndim < 2:
            fresh.state[q].update({k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()})
    _train(model, opt, 3, seed=9)
    _train(after, fresh, 3, seed=9)
    assert_same_state(opt, list(model.parameters()), fresh, list(after.parameters()), exact=True)


def test_shape_change_resplits_with_new_shapes():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    opt = PILoT([w], lr=0.05, momentum=0.9)
    for shape in [(3, 4), (3, 4), (5, 2)]:
        if w.shape != shape:
            w.grad = None
            w.data = torch.randn(shape)
            opt.param_groups[0]["lr"] = 0.0
        w.grad = torch.randn(shape)
        written = w.detach().clone()
        opt.step()
    _assert_kept(w, written)
    assert all(opt.state[w][k].shape == (5, 2) for k in ("m", "w", "momentum_m", "momentum_w"))


# ------------------------------------------------------------------ pruning
def test_torch_prune_remove_keeps_zeros_and_moves_them_as_sgd():
    """torch.nn.utils.prune + prune.remove writes weight_orig.data (the very parameter
    PILoT holds).  The zeros survive, and the next gradient moves them exactly as SGD
    moves a zero: x = −η·g (β = 1 splits 0 into m = 1, w = 0)."""
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.0)
    _train(model, opt, 2)
    layer = model[0]
    torch_prune.l1_unstructured(layer, "weight", amount=0.5)
    _step(model, opt)  # the mask holds the zeros while the reparametrization is on
    assert int((layer.weight == 0).sum()) == 15
    torch_prune.remove(layer, "weight")
    pruned = layer.weight.detach() == 0
    assert int(pruned.sum()) == 15
    opt.zero_grad()
    model(torch.randn(8, 6)).pow(2).mean().backward()
    g = layer.weight.grad.detach().clone()
    opt.step()
    assert torch.equal(layer.weight.detach()[pruned], (0 - 0.05 * g)[pruned])


def test_prune_without_optimizer_keeps_zeros():
    model = _model()
    opt = PILoT(model.parameters(), lr=0.0, momentum=0.9)
    _train(model, opt, 2)
    keep = prune_(model, None, sparsity=0.5)
    _train(model, opt, 2)
    for name, p in model.named_parameters():
        if name in keep:
            assert not p.detach()[~keep[name]].any()


def test_prune_with_optimizer_is_kept_bit_exact():
    """prune_ with the optimizer zeroes x and its factors alike: x still equals m·w, so
    the factors and momentum are kept untouched (no re-split)."""
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-2)
    _train(model, opt, 2)
    prune_(model, opt, sparsity=0.5)
    state = {p: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in model.parameters()}
    started = {p: opt.state[p]["momentum_started"] for p in model.parameters()}
    opt.param_groups[0]["lr"] = 0.0
    opt.param_groups[0]["alpha"] = 0.0
    _step(model, opt)
    for p in model.parameters():
        assert opt.state[p]["momentum_started"] == started[p]
        if "m" in state[p]:
            assert torch.equal(opt.state[p]["m"], state[p]["m"]) and torch.equal(opt.state[p]["w"], state[p]["w"])


# ------------------------------------------------------------------ dtype moves
def test_model_double_raises_and_changes_nothing():
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05)
    _train(model, opt, 1)
    model.double()
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
              for p in model.parameters()]
    with pytest.raises(TypeError, match="float64.*model.float"):
        _step(model, opt)
    for p, (x, st) in zip(model.parameters(), before):
        assert torch.equal(p.detach(), x)
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v)


def test_model_half_keeps_the_fp32_factors():
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, alpha=1e-2)
    _train(model, opt, 2)
    factors = {p: (opt.state[p]["m"].clone(), opt.state[p]["w"].clone()) for p in model.parameters() if p.ndim >= 2}
    model.half()
    halves = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = 0.0
    opt.param_groups[0]["alpha"] = 0.0
    _step(model, opt)
    for p, h in zip(model.parameters(), halves):
        assert p.dtype == torch.float16 and torch.equal(p.detach(), h)
    for p, (m, w) in factors.items():
        assert torch.equal(opt.state[p]["m"], m) and torch.equal(opt.state[p]["w"], w)


# ------------------------------------------------------------------ checkpoints
def _checkpoint(model, opt):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("order", ["model_first", "optimizer_first"])
def test_resume_is_bit_exact_in_either_load_order(order):
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-2)
    _train(model, opt, 3)
    ckpt = _checkpoint(model, opt)
    fresh = _model(seed=123)
    fresh_opt = PILoT(fresh.parameters(), lr=0.05, momentum=0.9, alpha=1e-2)
    if order == "model_first":
        fresh.load_state_dict(ckpt["model"])
        fresh_opt.load_state_dict(ckpt["opt"])
    else:
        fresh_opt.load_state_dict(ckpt["opt"])
        fresh.load_state_dict(ckpt["model"])
    _train(model, opt, 3, seed=4)
    _train(fresh, fresh_opt, 3, seed=4)
    assert_same_state(opt, list(model.parameters()), fresh_opt, list(fresh.parameters()), exact=True)


def test_resume_is_bit_exact_when_the_optimizer_is_built_on_the_loaded_model():
    """Hugging Face Trainer's order: load the model, build the optimizer on it, load the
    optimizer's state.  Building it must not disturb the loaded weights."""
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-2)
    _train(model, opt, 3)
    ckpt = _checkpoint(model, opt)
    fresh = _model(seed=123)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = PILoT(fresh.parameters(), lr=0.05, momentum=0.9, alpha=1e-2)
    fresh_opt.load_state_dict(ckpt["opt"])
    _train(model, opt, 3, seed=4)
    _train(fresh, fresh_opt, 3, seed=4)
    assert_same_state(opt, list(model.parameters()), fresh_opt, list(fresh.parameters()), exact=True)


def test_optimizer_load_state_dict_never_writes_the_model():
    """An older optimizer checkpoint loaded alone does not roll the model back; the
    next step splits the model's own values again."""
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9)
    old = opt.state_dict()
    old = {"state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                     for k, s in old["state"].items()}, "param_groups": old["param_groups"]}
    _train(model, opt, 3)
    now = [p.detach().clone() for p in model.parameters()]
    opt.load_state_dict(old)
    for p, x in zip(model.parameters(), now):
        assert torch.equal(p.detach(), x)
    opt.param_groups[0]["lr"] = 0.0
    _step(model, opt)
    for p, x in zip(model.parameters(), now):
        _assert_kept(p, x)


# ------------------------------------------------------------------ cost
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_writes_are_adopted_without_reading_a_device_value_on_the_host(backend, monkeypatch):
    """The fused pass finds and adopts written elements itself: no step, with or
    without a write before it, reads a tensor's value on the host (a sync on a GPU)."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, backend=backend)
    _train(model, opt, 1)

    def sync(*_):
        raise AssertionError("step() read a device value on the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, sync)
        _step(model, opt)
        with torch.no_grad():
            model[2].weight.data.mul_(2)
        _step(model, opt)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_write_to_a_tensor_left_out_of_a_step_is_seen(backend, monkeypatch):
    """A tensor without a gradient in one step, written meanwhile, keeps the write at
    its next step."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, backend=backend)
    _train(model, opt, 3)
    weight = model[0].weight
    _step(model, opt)
    weight.grad = None
    opt.step()                      # weight left out
    with torch.no_grad():
        weight.data.mul_(2)         # ... and written, through .data
    written = weight.detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    _train(model, opt, 2, seed=6)
    _assert_kept(weight, written)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_reset_momentum_between_steps_is_read(backend):
    """State values are read at every step, also when nothing moved: zeroed buffers
    marked unstarted give b = d at the next step (SGD's first step), for split and
    plain tensors alike."""
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, dampening=0.5, alpha=1e-2, backend=backend)
    _train(model, opt, 3)
    for state in opt.state.values():
        for key in PILoT.MOMENTUM_KEYS:
            if key in state:
                state[key].zero_()
        state[PILoT.STARTED_KEY] = False
    before = {p: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in model.parameters()}
    _step(model, opt, seed=8)
    for p in model.parameters():
        s, old = opt.state[p], before[p]
        if "m" in s:  # b = d = g·w + 2α·m (old m, w), not (1 − τ)·d
            d_m = p.grad * old["w"] + 2 * 1e-2 * old["m"]
            torch.testing.assert_close(s["momentum_m"], d_m, rtol=1e-6, atol=1e-7)
        else:         # SGD's first step: b = g
            assert torch.equal(s["momentum_buffer"], p.grad)
        assert s[PILoT.STARTED_KEY] is True
