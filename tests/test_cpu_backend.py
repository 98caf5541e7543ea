"""The fused CPU backend (``csrc/cpu/``) against the reference, and its background build.

The kernel repeats the reference's fp32 operations (and ``init.split``'s, for elements
written since the last step) in the same order without multiply-add contraction, so
parameters, factors and both momentum buffers must be bitwise equal over several steps;
only Σ|m·w| is summed in another order (tight rtol).  The module is built once per
machine (first test; cached in TORCH_EXTENSIONS_DIR) and loaded once per process.
"""
from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch

from pilot_kernels import kernels
from pilot_kernels.init import split
from pilot_kernels.kernels import cpu_build, fused_cpu, ham_backends, ham_cpu, reference
from pilot_kernels.kernels.api import StepExtras, StepHparams, StepTensors
from helpers import OPTION_GRID, option_id

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
L1_TOL = dict(rtol=1e-5, atol=1e-5)
BASE = dict(momentum=0.9, nesterov=False, dampening=0.0, weight_decay=1e-3, maximize=False, alpha=1e-2)
STATE = ("xs", "ms", "ws", "momentum_ms", "momentum_ws")


def _hp(opts, *, lr=0.05, beta=1.0, adopt_writes=True):
    return StepHparams(lr=lr, beta=beta, adopt_writes=adopt_writes, **opts)


def _make(shapes, dtype, *, momentum=True, seed=0, memory_format=torch.contiguous_format):
    """x = m·w in ``dtype`` with fp32 factors and (zero) momentum buffers."""
    g = torch.Generator().manual_seed(seed)
    st = {k: [] for k in STATE}
    for s in shapes:
        m = torch.randn(s, generator=g).contiguous(memory_format=memory_format)
        w = torch.randn(s, generator=g).contiguous(memory_format=memory_format)
        st["xs"].append((m * w).to(dtype))
        st["ms"].append(m)
        st["ws"].append(w)
        st["momentum_ms"].append(torch.zeros_like(m))
        st["momentum_ws"].append(torch.zeros_like(w))
    if not momentum:
        st["momentum_ms"] = st["momentum_ws"] = None
    return st


def _clone(st):
    return {k: None if v is None else [t.clone() for t in v] for k, v in st.items()}


def _tensors(st, grads, first):
    return StepTensors(st["xs"], grads, st["ms"], st["ws"], st["momentum_ms"], st["momentum_ws"],
                       [first] * len(grads))


def _assert_equal(a, b, what=""):
    for k in STATE:
        if a[k] is None:
            assert b[k] is None
            continue
        for i, (u, v) in enumerate(zip(a[k], b[k])):
            assert torch.equal(u, v), (
                f"{what}{k}[{i}] differs at {(u != v).sum()} element(s), "
                f"max |Δ| = {(u.float() - v.float()).abs().max()}")


def _compare(shapes, dtype, opts, *, steps=4, grad_dtype=None, memory_format=torch.contiguous_format,
             extras=None, hp=None, write=None, lr=0.05):
    """Step the reference and the cpu backend side by side; every tensor bitwise equal.

    ``extras(step)`` gives the StepExtras of a step, ``write(step, xs)`` writes into the
    parameters before a step (the same writes on both sides)."""
    hp = hp or _hp(opts, lr=lr)
    st_ref = _make(shapes, dtype, momentum=hp.momentum != 0, memory_format=memory_format)
    st_cpu = _clone(st_ref)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        grads = [torch.randn(x.shape, generator=gen).contiguous(memory_format=memory_format)
                 .to(grad_dtype or dtype) for x in st_ref["xs"]]
        if write is not None:
            write(step, st_ref["xs"])
            write(step, st_cpu["xs"])
        e = extras(step) if extras else StepExtras()
        l1_ref, l1_cpu = torch.zeros(()), torch.zeros(())
        reference.pilot_step(_tensors(st_ref, grads, step == 0), hp, e._replace(l1_accum=l1_ref))
        fused_cpu.pilot_step(_tensors(st_cpu, grads, step == 0), hp, e._replace(l1_accum=l1_cpu), {})
        _assert_equal(st_ref, st_cpu, f"step {step}: ")
        torch.testing.assert_close(l1_cpu, l1_ref, **L1_TOL)
    return st_cpu


# ---------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_every_option_fp32(opts):
    _compare([(3, 5), (4097,), (7,)], torch.float32, opts)


@pytest.mark.parametrize("adopt_writes", [True, False], ids=["adopt", "no_adopt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, 15, 16, 17, 31, 32, 33, 32767, 32768, 32769])
def test_dtypes_and_sizes(dtype, numel, adopt_writes):
    """Scalar tails, vector bodies (one step is 16 or 32 lanes) and kGrain ± 1 (one task
    or two), with every fifth element written before the second step."""
    def write(step, xs):
        if step == 1:
            xs[0][::5] = 0.3
    _compare([(numel,)], dtype, BASE, steps=3, write=write, hp=_hp(BASE, adopt_writes=adopt_writes))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("opts", [dict(BASE, nesterov=True, weight_decay=0.0),
                                  dict(BASE, momentum=0.0, maximize=True),
                                  dict(BASE, dampening=0.3, alpha=0.0)], ids=option_id)
def test_half_precision_options(dtype, opts):
    _compare([(33, 31), (5,)], dtype, opts, steps=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_gradient_of_half_parameter(dtype):
    """The gradient is read in its own dtype; the reference converts it with .float()."""
    _compare([(257,), (3, 3)], dtype, BASE, grad_dtype=torch.float32)


@pytest.mark.parametrize("adopt_writes", [True, False])
def test_amp_grad_scale_and_found_inf(adopt_writes):
    """grad_scale divides g; found_inf (here on the first step and again later) leaves every
    tensor unchanged, x included (even a freshly written x), and still adds Σ|m·w| of the
    unchanged factors."""
    def extras(step):
        return StepExtras(grad_scale=torch.tensor(1024.0),
                          found_inf=torch.tensor(1.0 if step in (0, 2) else 0.0))

    st = _make([(100,), (3, 7)], torch.float32)
    st["xs"][0][:10] = 3.0  # written, then skipped: stays written
    before = _clone(st)
    grads = [torch.full(x.shape, float("inf")) for x in st["xs"]]
    l1 = torch.zeros(())
    hp = _hp(BASE, adopt_writes=adopt_writes)
    fused_cpu.pilot_step(_tensors(st, grads, True), hp, extras(0)._replace(l1_accum=l1), {})
    _assert_equal(before, st)
    torch.testing.assert_close(l1, sum((m * w).abs().sum() for m, w in zip(st["ms"], st["ws"])), **L1_TOL)

    def write(step, xs):
        if step == 2:
            xs[0][::3] = 0.25
    _compare([(100,), (3, 7), (4099,)], torch.float32, BASE, steps=5, extras=extras, write=write,
             hp=_hp(BASE, adopt_writes=adopt_writes))
    _compare([(100,)], torch.float16, dict(BASE, dampening=0.3), steps=4, extras=extras, write=write,
             hp=_hp(dict(BASE, dampening=0.3), adopt_writes=adopt_writes))


def test_lr_and_alpha_as_tensors():
    """lr and alpha as 0-dim tensors (capturable) are read inside the kernel, with their
    current value at each call."""
    lr, alpha = torch.tensor(0.05), torch.tensor(1e-2)
    hp = _hp(dict(BASE, alpha=alpha), lr=lr)
    st_ref = _make([(513,)], torch.float32)
    st_cpu = _clone(st_ref)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = [torch.randn(x.shape, generator=gen) for x in st_ref["xs"]]
        reference.pilot_step(_tensors(st_ref, grads, step == 0), hp)
        fused_cpu.pilot_step(_tensors(st_cpu, grads, step == 0), hp, StepExtras(), {})
        _assert_equal(st_ref, st_cpu, f"step {step}: ")
        lr.mul_(0.5)
        alpha.add_(3e-3)


def test_l1_slots():
    """l1_clear is zeroed and Σ|m·w| of the new values is added to l1_accum."""
    st = _make([(1000,)], torch.float32)
    accum, clear = torch.tensor(5.0), torch.tensor(7.0)
    fused_cpu.pilot_step(_tensors(st, [torch.randn(1000)], True), _hp(BASE, lr=0.1),
                         StepExtras(l1_accum=accum, l1_clear=clear), {})
    assert clear.item() == 0.0
    torch.testing.assert_close(accum, 5.0 + (st["ms"][0] * st["ws"][0]).abs().sum(), **L1_TOL)


# ---------------------------------------------------------------- adopting writes
def _mask(x, share=0.2, seed=3):
    return torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) < share


WRITES = {
    "copy_": lambda x: x.data.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(4))),
    "mul_": lambda x: x.data.mul_(0.5),
    "clamp_": lambda x: x.data.clamp_(-0.3, 0.3),
    "masked_zeros": lambda x: x.data.__setitem__(_mask(x), 0),
    "new_values": lambda x: x.data.__setitem__(_mask(x, 0.05), 1.7),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [1.0, 0.0])
@pytest.mark.parametrize("how", list(WRITES))
def test_writes_are_adopted_like_the_reference(how, beta, dtype):
    """A write between steps (here before steps 0 and 2) is re-split with β and restarts
    those elements' momentum, bit for bit as the reference does it."""
    def write(step, xs):
        if step in (0, 2):
            for x in xs:
                WRITES[how](x)
    for opts in (BASE, dict(BASE, nesterov=True, dampening=0.0), dict(BASE, momentum=0.0)):
        _compare([(6, 7), (4097,), (33,)], dtype, opts, steps=4, write=write,
                 hp=_hp(opts, beta=beta))


@pytest.mark.parametrize("beta", [1.0, 0.0, 2.5])
def test_resplit_of_special_values(beta):
    """init.split's branches, element by element: ±0, subnormals, |x| > 2^60 (the hypot
    branch), the largest floats, values with no exact split, next to plain ones."""
    special = torch.tensor([0.0, -0.0, 1e-45, -3e-39, 1e-20, 2.0**60, -2.0**61, 1e30, -3.0e38,
                            3.4028235e38, 1.0, -1.0, 0.1, 7.0, 1e-7, 123456.7])
    vals = torch.cat([special, torch.randn(300, generator=torch.Generator().manual_seed(5)) * 10])

    def write(step, xs):
        if step in (0, 2):
            xs[0].copy_(vals[torch.randperm(vals.numel(), generator=torch.Generator().manual_seed(step))])
    opts = dict(BASE, alpha=0.0, weight_decay=0.0)  # lr = 0: no overflow from the huge ones
    _compare([(vals.numel(),)], torch.float32, opts, steps=3, write=write, hp=_hp(opts, lr=0.0, beta=beta))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_written_elements_are_kept_and_only_their_momentum_restarts(dtype):
    """With lr = 0, α = 0 and zero gradients the step changes no factor it keeps: written
    elements come back exactly as written (wherever an exact split exists) and their
    momentum restarts at d = 0, while the others' momentum decays as μ·b."""
    st = _make([(7, 9), (1000,)], dtype)
    opts = dict(BASE, alpha=0.0, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(x.shape, generator=gen).to(dtype) for x in st["xs"]]
    fused_cpu.pilot_step(_tensors(st, grads, True), _hp(opts), StepExtras(), {})  # momentum ≠ 0
    masks = [_mask(x, 0.1) for x in st["xs"]]
    for x, mask in zip(st["xs"], masks):
        x.data[mask] = torch.linspace(-2, 2, int(mask.sum())).to(dtype)
    written = [x.clone() for x in st["xs"]]
    b_before = [b.clone() for b in st["momentum_ms"]]
    zeros = [torch.zeros_like(x) for x in st["xs"]]
    fused_cpu.pilot_step(_tensors(st, zeros, False), _hp(opts, lr=0.0), StepExtras(), {})
    for x, x_w, m, w, b, b0, mask in zip(st["xs"], written, st["ms"], st["ws"],
                                         st["momentum_ms"], b_before, masks):
        sm, sw = split(x_w)
        exact = ((sm * sw).to(dtype) == x_w) | ~mask
        assert exact.float().mean() > 0.9
        assert torch.equal(x[exact], x_w[exact])
        assert torch.equal(m[mask], sm[mask]) and torch.equal(w[mask], sw[mask])
        assert torch.equal(b[mask], torch.zeros(int(mask.sum())))
        assert torch.equal(b[~mask], 0.9 * b0[~mask])
        assert (b0[~mask] != 0).all()


def test_adopt_writes_false_overwrites_writes():
    """adopt_writes=False: x is not read; a write is replaced by the step's m·w."""
    st = _make([(50,)], torch.float32)
    st["xs"][0].fill_(5.0)
    m, w = st["ms"][0].clone(), st["ws"][0].clone()
    fused_cpu.pilot_step(_tensors(st, [torch.zeros(50)], True), _hp(dict(BASE, alpha=0.0, weight_decay=0.0),
                                                                    lr=0.0, adopt_writes=False),
                         StepExtras(), {})
    assert torch.equal(st["ms"][0], m) and torch.equal(st["xs"][0], m * w)


# ---------------------------------------------------------------- layouts and many tensors
def test_channels_last():
    _compare([(4, 3, 5, 5), (2, 8, 3, 3)], torch.bfloat16, BASE, memory_format=torch.channels_last,
             write=lambda step, xs: xs[1].data.mul_(2) if step == 1 else None)


def test_hundreds_of_tiny_tensors_in_one_call():
    shapes = [(1 + (37 * i) % 61,) if i % 3 else (2, 1 + i % 5) for i in range(800)]

    def write(step, xs):
        if step == 1:
            for x in xs[::7]:
                x.data[0] = -1.5
    _compare(shapes, torch.float32, dict(BASE, nesterov=True, weight_decay=0.0), steps=3, write=write)


@pytest.mark.parametrize("case, match", [
    ("state_layout", "has strides"),
    ("non_dense", "is not dense"),
    ("grad_dtype", "gradients of one call must share a dtype"),
    ("numel", "elements but the parameter has"),
    ("beta", "beta must be >= 0"),
    ("state_dtype", "the state must be float32"),
])
def test_bad_input_raises_and_changes_nothing(case, match):
    st = _make([(8, 3), (6, 5)], torch.float32)
    grads = [torch.randn(8, 3), torch.randn(6, 5)]
    hp = _hp(BASE)
    if case == "state_layout":
        st["ms"][1] = st["ms"][1].t().contiguous().t()
    elif case == "non_dense":
        st["xs"][1] = torch.randn(6, 10)[:, ::2]
    elif case == "grad_dtype":
        grads[1] = grads[1].double()
    elif case == "numel":
        st["ws"][1] = torch.randn(31)
    elif case == "beta":
        hp = _hp(BASE, beta=-1.0)
    elif case == "state_dtype":
        st["momentum_ws"][1] = st["momentum_ws"][1].double()
    before = _clone(st)
    with pytest.raises(RuntimeError, match=match):
        fused_cpu.pilot_step(_tensors(st, grads, False), hp, StepExtras(), {})
    _assert_equal(before, st)


def test_no_version_bumps():
    """The caller (the dispatcher) bumps version counters once; the kernel does not."""
    st = _make([(9, 5)], torch.float32)
    tensors = [st[k][0] for k in STATE]
    before = [t._version for t in tensors]
    fused_cpu.pilot_step(_tensors(st, [torch.randn(9, 5)], True), _hp(BASE), StepExtras(), {})
    assert [t._version for t in tensors] == before


# ---------------------------------------------------------------- the build
# Both C++ CPU modules are loaded by one cpu_build.JitExtension each; auto asks ready().
LOADERS = {"pilot": (fused_cpu, kernels.resolve_backend), "ham": (ham_cpu, ham_backends.resolve_backend)}


@pytest.fixture(params=sorted(LOADERS))
def fresh_build(request, monkeypatch):
    """A process that has not loaded the module yet, on a machine without a cached build;
    the fake build (``set_build``) runs whatever function the test gives, and ``ext`` is
    the real module for it to return.  Yields (set_build, ext, the kernel's module, its
    dispatcher's resolve_backend)."""
    module, resolve = LOADERS[request.param]
    jit = module.EXTENSION
    ext = module.load_extension()
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    for name, value in (("_module", None), ("error", None), ("_builder", None), ("_warned", False)):
        monkeypatch.setattr(jit, name, value)
    monkeypatch.setattr(jit, "is_built", lambda cap=None: False)
    yield lambda fn: monkeypatch.setattr(jit, "build", fn), ext, module, resolve
    if jit._builder is not None:
        jit._builder.join(timeout=30)


def _notices(text):
    return [line for line in text.splitlines() if line.startswith("pilot_kernels:")]


def test_first_auto_step_never_waits_for_the_build(fresh_build, capfd):
    """While the module compiles (here: a build that waits for the test's signal), auto
    resolves to the reference at once and says so in one line; once built, auto takes the
    kernel."""
    set_build, ext, module, resolve = fresh_build
    go = threading.Event()
    set_build(lambda: go.wait(30) and ext)
    cpu = torch.device("cpu")
    start = time.perf_counter()
    picked = [resolve("auto", cpu) for _ in range(3)]
    assert time.perf_counter() - start < 1.0
    assert picked == ["reference"] * 3
    lines = _notices(capfd.readouterr().err)
    assert lines == [module.EXTENSION.notice] and "in the background" in lines[0]
    go.set()
    module.EXTENSION._builder.join(timeout=30)
    assert resolve("auto", cpu) == "cpu"
    assert module.ready() and module.load_extension() is ext
    assert _notices(capfd.readouterr().err) == []


def test_pilot_notice_and_step_fn():
    assert fused_cpu.BUILDING_NOTICE == fused_cpu.EXTENSION.notice
    assert "fused cpu" in fused_cpu.BUILDING_NOTICE and "HAM cpu" in ham_cpu.EXTENSION.notice
    assert kernels.get_step_fn("cpu") is fused_cpu.pilot_step


def test_explicit_cpu_waits_for_the_background_build(fresh_build):
    set_build, ext, module, _ = fresh_build
    set_build(lambda: time.sleep(0.3) or ext)
    assert not module.ready()
    start = time.perf_counter()
    assert module.load_extension() is ext
    assert time.perf_counter() - start > 0.1
    assert module.ready() and module.available()


def test_a_cached_build_is_loaded_at_once(fresh_build, monkeypatch, capfd):
    set_build, ext, module, resolve = fresh_build
    set_build(lambda: ext)
    monkeypatch.setattr(module.EXTENSION, "is_built", lambda cap=None: True)
    assert resolve("auto", torch.device("cpu")) == "cpu"
    assert module.ready() and module.EXTENSION._builder is None
    assert _notices(capfd.readouterr().err) == []


def test_failed_build_falls_back_with_one_notice(fresh_build, capfd):
    """No compiler (simulated): auto uses the reference and warns once; explicit 'cpu'
    raises the build's error, which names the fix, and the build is never retried."""
    set_build, _, module, resolve = fresh_build
    calls = []

    def no_compiler():
        calls.append(1)
        raise RuntimeError("no C++ compiler 'c++' is on PATH: install one, or use backend='reference'")

    set_build(no_compiler)
    cpu = torch.device("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve("auto", cpu) == "reference"
        module.EXTENSION._builder.join(timeout=30)
        assert [resolve("auto", cpu) for _ in range(3)] == ["reference"] * 3
    failures = [w for w in caught if "cpu backend is unavailable" in str(w.message)]
    assert len(failures) == 1 and "\n" not in str(failures[0].message)
    assert "no C++ compiler" in str(failures[0].message)
    assert module.EXTENSION.label in str(failures[0].message)
    assert len(_notices(capfd.readouterr().err)) == 1  # the building line
    assert not module.available() and module.build_error() is not None
    with pytest.raises(RuntimeError, match="backend='reference'"):
        module.load_extension()
    assert calls == [1]


def test_failed_build_leaves_the_pilot_step_untouched(monkeypatch):
    monkeypatch.setattr(fused_cpu.EXTENSION, "_module", None)
    monkeypatch.setattr(fused_cpu.EXTENSION, "error", RuntimeError("no compiler, or use backend='reference'"))
    st = _make([(4, 4)], torch.float32)
    before = {k: [t.clone() for t in v] for k, v in st.items()}
    with pytest.raises(RuntimeError, match="backend='reference'"):
        fused_cpu.pilot_step(_tensors(st, [torch.randn(4, 4)], True), _hp(BASE), StepExtras(), {})
    assert all(torch.equal(a, b) for k in st for a, b in zip(st[k], before[k]))


def test_build_flags_are_portable_and_exact():
    for cap in ("AVX512", "AVX2", "DEFAULT"):
        flags = cpu_build.cxx_flags(cap)
        assert "-ffp-contract=off" in flags and "-O3" in flags
        assert not any(f.startswith("-march") or "fast-math" in f for f in flags)
        assert f"-DCPU_CAPABILITY={cap}" in flags
        for jit in (fused_cpu.EXTENSION, ham_cpu.EXTENSION):
            assert cap.lower() in jit.name(cap) and jit.name(cap).startswith(jit.prefix + "_")
    for jit in (fused_cpu.EXTENSION, ham_cpu.EXTENSION):
        assert jit.name("AVX2") != jit.name("AVX512")
    assert fused_cpu.EXTENSION.name() != ham_cpu.EXTENSION.name()
    ext = fused_cpu.load_extension()
    assert ext is fused_cpu.load_extension()  # loaded once per process
    assert ext.capability() == cpu_build.capability()
    assert ham_cpu.load_extension() is ham_cpu.load_extension()
    assert fused_cpu.EXTENSION.is_built() and ham_cpu.EXTENSION.is_built()
