"""PILoT under torch.amp.GradScaler: unscaling in the step or by the scaler, clipping,
and inf/NaN steps (the very first one included) on split and plain tensors."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from pilot_kernels import PILoT
from helpers import assert_same_state


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 6, generator=g) for _ in range(n)]


# ------------------------------------------------------------------ fused_unscale
def test_fused_unscale_is_per_instance_and_survives_copies():
    model = _model()
    fused = PILoT(model.parameters(), lr=0.1)
    plain = PILoT(model.parameters(), lr=0.1, fused_unscale=False)
    assert fused._step_supports_amp_scaling is True
    assert plain._step_supports_amp_scaling is False
    assert "_step_supports_amp_scaling" in vars(plain)  # an instance attribute, not the class's
    buf = io.BytesIO()
    torch.save(plain, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(plain), pickle.loads(pickle.dumps(plain)), torch.load(buf, weights_only=False)):
        assert clone._step_supports_amp_scaling is False
    assert copy.deepcopy(fused)._step_supports_amp_scaling is True
    with pytest.raises(TypeError, match="fused_unscale"):
        PILoT(model.parameters(), lr=0.1, fused_unscale="no")


def _scaled_run(fused_unscale, clip=None, inf_at=(), steps=4, momentum=0.9, dampening=0.0):
    """Train with GradScaler; optionally unscale_ + clip before the step, and put an inf
    into the gradients at the steps in ``inf_at``."""
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=momentum, dampening=dampening, alpha=1e-2,
                fused_unscale=fused_unscale)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1)
    for i, x in enumerate(_batches(steps)):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if i in inf_at:
            model[0].bias.grad[0] = float("inf")
        if clip is not None:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
    return model, opt


def _manual_run(clip=None, skip=(), steps=4, momentum=0.9, dampening=0.0):
    """The same run without a scaler: unscaled gradients, steps in ``skip`` not taken."""
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=momentum, dampening=dampening, alpha=1e-2)
    for i, x in enumerate(_batches(steps)):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if i in skip:
            continue
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model, opt


@pytest.mark.parametrize("fused_unscale", [True, False])
def test_scaled_steps_equal_unscaled_steps(fused_unscale):
    """Power-of-two scales divide exactly, so both AMP paths equal a run without AMP,
    inf steps (skipped) included: bit for bit when the scaler unscales; with
    fused_unscale the plain tensors take torch's fused SGD kernel (as
    torch.optim.SGD(fused=True) does under AMP), which rounds its multiply-adds
    differently from the foreach path by an ulp or so."""
    model, opt = _scaled_run(fused_unscale, inf_at=(2,))
    ref, ref_opt = _manual_run(skip=(2,))
    assert_same_state(opt, list(model.parameters()), ref_opt, list(ref.parameters()),
                      exact=not fused_unscale, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused_unscale", [True, False])
def test_clip_after_unscale_equals_manual_clip(fused_unscale):
    """scaler.unscale_(opt); clip; scaler.step(opt): the step must not unscale again."""
    model, opt = _scaled_run(fused_unscale, clip=0.05, inf_at=(1,))
    ref, ref_opt = _manual_run(clip=0.05, skip=(1,))
    assert_same_state(opt, list(model.parameters()), ref_opt, list(ref.parameters()),
                      exact=not fused_unscale, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ inf steps and first steps
@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_inf_on_the_very_first_step_leaves_clean_momentum(dampening):
    """A skipped first step must leave every momentum buffer zero and the next steps
    equal a run that never saw it.  Plain tensors (biases) included: they once got
    torch's empty_like buffers, garbage after the skip.  With dampening τ ≠ 0 the first
    real step cannot tell, without a host sync, that the earlier one was skipped, and
    takes b = (1−τ)·d (the buffers are zero) instead of SGD's b = d."""
    model, opt = _scaled_run(True, inf_at=(0,), steps=3, dampening=dampening)
    for p in model.parameters():
        assert torch.isfinite(p).all()
    ref, ref_opt = _manual_run(skip=(0,), steps=3, dampening=dampening)
    if dampening == 0:
        assert_same_state(opt, list(model.parameters()), ref_opt, list(ref.parameters()),
                          exact=False, rtol=1e-6, atol=1e-7)
    # A first step that is skipped changes nothing, buffers included.
    model = _model()
    opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, dampening=dampening)
    before = {p: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
              for p in model.parameters()}
    model(_batches(1)[0]).sum().backward()
    opt.grad_scale, opt.found_inf = torch.tensor([256.0]), torch.tensor([1.0])
    opt.step()
    for p, (x0, st0) in before.items():
        assert torch.equal(p.detach(), x0)
        for k, v in st0.items():
            assert torch.equal(opt.state[p][k], v), k


def test_late_first_gradient_under_amp():
    """A plain tensor whose first gradient comes after others have started momentum
    (unfreezing mid-run) steps under AMP like it does without."""
    runs = []
    for amp in (True, False):
        model = _model()
        opt = PILoT(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0, enabled=amp)
        model[2].bias.requires_grad_(False)
        for i, x in enumerate(_batches(4)):
            if i == 2:
                model[2].bias.requires_grad_(True)
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
        runs.append((opt, list(model.parameters())))
    (a, pa), (b, pb) = runs
    assert_same_state(a, pa, b, pb, exact=False, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("nesterov", [False, True])
def test_plain_tensors_under_amp_equal_fused_sgd(nesterov):
    """Without inf steps, the plain tensors under GradScaler equal
    torch.optim.SGD(fused=True) under the same scaler, bit for bit."""
    runs = []
    for make in (lambda ps: PILoT(ps, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-2, reparam=False),
                 lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-2,
                                            fused=True)):
        model = _model()
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        for x in _batches(3):
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
        runs.append(list(model.parameters()))
        for p in model.parameters():
            opt.state[p].pop("momentum_started", None)
        runs.append(opt)
    pa, a, pb, b = runs
    assert_same_state(a, pa, b, pb, exact=True)
