"""The fused CPU backend (``csrc/cpu/``) against the reference.

The kernel repeats the reference's fp32 operations in the same order without
multiply-add contraction, so parameters, factors and both momentum buffers must be
bitwise equal over several steps; only Σ|m·w| is summed in another order (tight rtol).
The module is built once per machine (first test; cached in TORCH_EXTENSIONS_DIR) and
loaded once per process.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from pilot_kernels import PILoT
from pilot_kernels import kernels
from pilot_kernels.kernels import cpu_build, fused_cpu, reference
from helpers import OPTION_GRID, assert_same_state, option_id

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
L1_TOL = dict(rtol=1e-5, atol=1e-5)
BASE = dict(momentum=0.9, nesterov=False, dampening=0.0, weight_decay=1e-3, maximize=False, alpha=1e-2)


def _make(shapes, dtype, *, momentum=True, seed=0, memory_format=torch.contiguous_format):
    """x = m·w in ``dtype`` with fp32 factors and (zero) momentum buffers."""
    g = torch.Generator().manual_seed(seed)
    ts = []
    for s in shapes:
        m = torch.randn(s, generator=g).contiguous(memory_format=memory_format)
        w = torch.randn(s, generator=g).contiguous(memory_format=memory_format)
        ts.append(dict(
            x=(m * w).to(dtype), m=m, w=w,
            bm=torch.zeros_like(m) if momentum else None,
            bw=torch.zeros_like(w) if momentum else None,
        ))
    return ts


def _clone(ts):
    return [{k: None if v is None else v.clone() for k, v in t.items()} for t in ts]


def _step(step_fn, ts, grads, first, opts, **amp):
    momentum = opts["momentum"] != 0
    l1 = torch.zeros(())
    step_fn(
        [t["x"] for t in ts], grads, [t["m"] for t in ts], [t["w"] for t in ts],
        [t["bm"] for t in ts] if momentum else None, [t["bw"] for t in ts] if momentum else None,
        [first] * len(ts), lr=amp.pop("lr", 0.05), l1_accum=l1, **opts, **amp,
    )
    return l1


def _compare(shapes, dtype, opts, *, steps=4, grad_dtype=None, memory_format=torch.contiguous_format,
             amp_steps=None, lr=0.05):
    """Run the reference and the cpu backend side by side; every tensor bitwise equal."""
    ts_ref = _make(shapes, dtype, momentum=opts["momentum"] != 0, memory_format=memory_format)
    ts_cpu = _clone(ts_ref)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        grads = [torch.randn(t["x"].shape, generator=gen).contiguous(memory_format=memory_format)
                 .to(grad_dtype or dtype) for t in ts_ref]
        amp = amp_steps(step) if amp_steps else {}
        l1_ref = _step(reference.pilot_step, ts_ref, grads, step == 0, opts, lr=lr, **amp)
        l1_cpu = _step(fused_cpu.pilot_step, ts_cpu, grads, step == 0, opts, lr=lr, **amp)
        for a, b in zip(ts_ref, ts_cpu):
            for k in a:
                if a[k] is not None:
                    assert torch.equal(a[k], b[k]), (
                        f"step {step}: {k} differs, max |Δ| = {(a[k].float() - b[k].float()).abs().max()}")
        torch.testing.assert_close(l1_cpu, l1_ref, **L1_TOL)
    return ts_cpu


# ---------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_every_option_fp32(opts):
    _compare([(3, 5), (4097,), (7,)], torch.float32, opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, 4095, 4097, 100_003])
def test_dtypes_and_sizes(dtype, numel):
    """Vector bodies, scalar tails and (100,003 > one thread's grain) both threads."""
    _compare([(numel,)], dtype, BASE, steps=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("opts", [dict(BASE, nesterov=True, weight_decay=0.0),
                                  dict(BASE, momentum=0.0, maximize=True)], ids=option_id)
def test_half_precision_options(dtype, opts):
    _compare([(33, 31), (5,)], dtype, opts, steps=3)


def test_fp32_gradient_of_bf16_parameter():
    """The gradient is read in its own dtype; the reference converts it with .float()."""
    _compare([(257,), (3, 3)], torch.bfloat16, BASE, grad_dtype=torch.float32)


def test_amp_grad_scale_and_found_inf():
    """grad_scale divides g; found_inf (here on the first step and again later) leaves every
    tensor unchanged and still adds Σ|m·w| of the unchanged factors."""
    def amp(step):
        return dict(grad_scale=torch.tensor(1024.0),
                    found_inf=torch.tensor(1.0 if step in (0, 2) else 0.0))

    ts = _make([(100,), (3, 7)], torch.float32)
    before = _clone(ts)
    grads = [torch.full(t["x"].shape, float("inf")) for t in ts]
    l1 = _step(fused_cpu.pilot_step, ts, grads, True, BASE, **amp(0))
    for a, b in zip(before, ts):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(l1, sum((t["m"] * t["w"]).abs().sum() for t in ts), **L1_TOL)
    _compare([(100,), (3, 7), (4099,)], torch.float32, BASE, steps=5, amp_steps=amp)
    _compare([(100,)], torch.float16, dict(BASE, dampening=0.3), steps=4, amp_steps=amp)


def test_capturable_tensor_hparams():
    """lr and alpha as 0-dim tensors are read inside the kernel, with their current value."""
    lr, alpha = torch.tensor(0.05), torch.tensor(1e-2)
    opts = dict(BASE, alpha=alpha)
    ts_ref = _make([(513,)], torch.float32)
    ts_cpu = _clone(ts_ref)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = [torch.randn(t["x"].shape, generator=gen) for t in ts_ref]
        _step(reference.pilot_step, ts_ref, grads, step == 0, opts, lr=lr)
        _step(fused_cpu.pilot_step, ts_cpu, grads, step == 0, opts, lr=lr)
        lr.mul_(0.5)
        alpha.add_(3e-3)
    for a, b in zip(ts_ref, ts_cpu):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_l1_slots():
    """l1_clear is zeroed and Σ|m·w| of the new values is added to l1_accum."""
    ts = _make([(1000,)], torch.float32)
    accum, clear = torch.tensor(5.0), torch.tensor(7.0)
    fused_cpu.pilot_step([ts[0]["x"]], [torch.randn(1000)], [ts[0]["m"]], [ts[0]["w"]], [ts[0]["bm"]],
                         [ts[0]["bw"]], [True], lr=0.1, l1_accum=accum, l1_clear=clear, **BASE)
    assert clear.item() == 0.0
    torch.testing.assert_close(accum, 5.0 + (ts[0]["m"] * ts[0]["w"]).abs().sum(), **L1_TOL)


# ---------------------------------------------------------------- layouts and many tensors
def test_channels_last_goes_through_the_kernel(monkeypatch):
    slow = []
    real = fused_cpu._launch
    monkeypatch.setattr(fused_cpu, "_launch", lambda *a, **k: slow.append(real(*a, **k)) or slow[-1])
    _compare([(4, 3, 5, 5), (2, 8, 3, 3)], torch.bfloat16, BASE, memory_format=torch.channels_last)
    assert slow == [[]] * 4


def test_other_layouts_fall_back_to_the_reference(monkeypatch):
    """A state tensor laid out unlike its parameter, and a non-dense parameter, take the
    reference path; the rest of the call still goes through the kernel."""
    slow = []
    real = fused_cpu._launch
    monkeypatch.setattr(fused_cpu, "_launch", lambda *a, **k: slow.append(real(*a, **k)) or slow[-1])
    ts_ref = _make([(6, 5), (9, 4), (33,)], torch.float32)
    for t in ts_ref[:1]:  # same values, transposed strides
        t["m"], t["bm"] = t["m"].t().contiguous().t(), t["bm"].t().contiguous().t()
    base = torch.randn(9, 8)
    ts_ref[1]["x"] = base[:, ::2]
    ts_ref[1]["x"].copy_(ts_ref[1]["m"] * ts_ref[1]["w"])  # a non-dense view
    ts_cpu = _clone(ts_ref)
    assert ts_cpu[0]["m"].stride() == ts_ref[0]["m"].stride() == (1, 6)  # clone keeps strides
    base_cpu = base.clone()
    ts_cpu[1]["x"] = base_cpu[:, ::2]
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = [torch.randn(t["x"].shape, generator=gen) for t in ts_ref]
        l1_ref = _step(reference.pilot_step, ts_ref, grads, step == 0, BASE)
        l1_cpu = _step(fused_cpu.pilot_step, ts_cpu, grads, step == 0, BASE)
        torch.testing.assert_close(l1_cpu, l1_ref, **L1_TOL)
    assert slow == [[0, 1]] * 3
    for a, b in zip(ts_ref, ts_cpu):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert torch.equal(base, base_cpu)  # the view's untouched columns stay untouched


def test_two_thousand_tiny_tensors_in_one_call(monkeypatch):
    calls = []
    real = fused_cpu._launch
    monkeypatch.setattr(fused_cpu, "_launch", lambda ext, xs, *a, **k: calls.append(len(xs)) or real(ext, xs, *a, **k))
    shapes = [(1 + (37 * i) % 61,) if i % 3 else (2, 1 + i % 5) for i in range(2000)]
    _compare(shapes, torch.float32, dict(BASE, nesterov=True, weight_decay=0.0), steps=3)
    assert calls == [2000] * 3


# ---------------------------------------------------------------- through the optimizer
def _train(backend, shapes, dtype=torch.float32, steps=5, **opts):
    torch.manual_seed(0)
    params = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
    opt = PILoT(params, lr=0.05, backend=backend, **opts)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return opt, params


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pilot_optimizer_matches_reference(dtype):
    """Reparameterized (ndim ≥ 2) and plain SGD tensors, parameters and all state."""
    shapes = [(16, 3, 3, 3), (10, 16), (10,), (4097, 2), (7,)]
    opts = dict(momentum=0.9, alpha=2e-2, weight_decay=1e-4)
    ref, pr = _train("reference", shapes, dtype, **opts)
    cpu, pc = _train("cpu", shapes, dtype, **opts)
    assert_same_state(ref, pr, cpu, pc, exact=True)
    torch.testing.assert_close(cpu.l1_norm(), ref.l1_norm(), **L1_TOL)


def test_pilot_capturable_matches_reference():
    opts = dict(momentum=0.9, nesterov=True, alpha=1e-2, capturable=True)
    ref, pr = _train("reference", [(31, 9), (5, 5)], **opts)
    cpu, pc = _train("cpu", [(31, 9), (5, 5)], **opts)
    assert_same_state(ref, pr, cpu, pc, exact=True)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_step_bumps_version_counters_like_an_inplace_op(backend):
    """The kernel's writes are visible to autograd as an in-place op's are: every tensor it
    writes gets a new version, and a graph that saved ``x`` before the step refuses to
    backward through the stale value (as with ``torch.optim.SGD``)."""
    x = torch.nn.Parameter(torch.randn(9, 5))
    b = torch.nn.Parameter(torch.randn(5))
    opt = PILoT([x, b], lr=0.1, momentum=0.9, alpha=1e-2, backend=backend)
    (x.sum() + b.sum()).backward()
    opt.step()  # momentum starts
    state = opt.state[x]
    tensors = [x] + [state[k] for k in ("m", "w", "momentum_m", "momentum_w")]
    before = [t._version for t in tensors]
    saved = (x.sin() * b).sum()  # saves x for backward
    opt.step()
    assert all(t._version > v for t, v in zip(tensors, before)), [t._version - v for t, v in zip(tensors, before)]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_auto_takes_cpu_backend(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert "cpu" in kernels.BACKENDS
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert kernels.get_step_fn("cpu") is fused_cpu.pilot_step
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="CPU tensors"):
        kernels.resolve_backend("cpu", torch.device("meta"))


def test_failed_build_falls_back_with_one_notice(monkeypatch):
    """No compiler (simulated): auto uses the reference, says so once; explicit 'cpu' raises."""
    def no_compiler():
        raise RuntimeError("no C++ compiler 'c++' is on PATH: install one, or use backend='reference'")

    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_build, "jit_load", no_compiler)
    monkeypatch.setattr(fused_cpu, "_EXT", None)
    monkeypatch.setattr(fused_cpu, "_ERROR", None)
    monkeypatch.setattr(kernels, "_CPU_OK", None)
    shapes = [(6, 7), (3,)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto, pa = _train("auto", shapes, steps=3)
        assert kernels.resolve_backend("auto", torch.device("cpu")) == "reference"
    notices = [w for w in caught if "cpu backend is unavailable" in str(w.message)]
    assert len(notices) == 1 and "\n" not in str(notices[0].message)
    assert "no C++ compiler" in str(notices[0].message)
    ref, pr = _train("reference", shapes, steps=3)
    assert_same_state(ref, pr, auto, pa, exact=True)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        _train("cpu", shapes, steps=1)


def test_bad_state_raises_and_changes_nothing():
    ts = _make([(8,), (9,)], torch.float32)
    ts[1]["w"] = torch.randn(10)
    before = _clone(ts)
    with pytest.raises(RuntimeError, match="elements but the parameter has"):
        _step(fused_cpu.pilot_step, ts, [torch.randn(8), torch.randn(9)], True, BASE)
    for a, b in zip(before, ts):
        for k in a:
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- build description
def test_build_flags_are_portable_and_exact():
    for cap in ("AVX512", "AVX2", "DEFAULT"):
        flags = cpu_build.cxx_flags(cap)
        assert "-ffp-contract=off" in flags and "-O3" in flags
        assert not any(f.startswith("-march") or "fast-math" in f for f in flags)
        assert f"-DCPU_CAPABILITY={cap}" in flags
        assert cap.lower() in cpu_build.jit_name(cap)
    assert cpu_build.jit_name("AVX2") != cpu_build.jit_name("AVX512")
    ext = fused_cpu.load_extension()
    assert ext is fused_cpu.load_extension()  # loaded once per process
    assert ext.capability() == cpu_build.capability()
