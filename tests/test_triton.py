"""The fused Triton kernel against the reference backend, bit for bit.

Without a GPU the kernel runs in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1); on a GPU it is launched with FP contraction off and IEEE division,
so there too every value must equal the reference's exactly (only the L1 sum, a
reduction in another order, is compared with a tolerance).
"""
import pytest
import torch

from pilot_kernels import PILoT
from pilot_kernels.init import split
from pilot_kernels.kernels import fused_triton, layout, reference
from conftest import KERNEL_DEVICES
from helpers import OPTION_GRID, assert_same_state, option_id

BLOCK = fused_triton.BLOCK_SIZE
STEPS = 7
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MOMENTUM = dict(momentum=0.9, nesterov=False, dampening=0.0, weight_decay=1e-3, maximize=False, alpha=1e-2)


def _run_pair(shapes, dtype, device, opts, *, steps=STEPS, lr=0.05, beta=1.0, grad_dtype=None):
    """Train the same tensors with the reference and the triton backend; return both."""
    torch.manual_seed(0)
    init = [torch.randn(s, device=device).to(dtype) for s in shapes]
    runs = []
    for backend in ("reference", "triton"):
        params = [x.clone().requires_grad_() for x in init]
        if grad_dtype is not None:
            for p in params:
                p.grad_dtype = grad_dtype
        opt = PILoT(params, lr=lr, beta=beta, reparam=True, backend=backend, **opts)
        g = torch.Generator(device=device).manual_seed(1)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, device=device).to(grad_dtype or dtype)
            opt.step()
        runs.append((opt, params))
    return runs


def _record_launches(monkeypatch):
    """Patch the launcher to record, per call, each launch's (rows, aligned)."""
    calls = []
    real = fused_triton._launch

    def launch(plan, *args, **kwargs):
        calls.append([(l.n_rows, l.aligned) for l in plan.launches])
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(fused_triton, "_launch", launch)
    return calls


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_options_fp32(device, opts):
    shapes = [(3, 5), (BLOCK + 1,), (7,)]
    (ref, pr), (tri, pt) = _run_pair(shapes, torch.float32, device, opts)
    assert_same_state(ref, pr, tri, pt, exact=True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 100_003])
def test_awkward_sizes(device, dtype, numel):
    (ref, pr), (tri, pt) = _run_pair([(numel,)], dtype, device, MOMENTUM, steps=3)
    assert_same_state(ref, pr, tri, pt, exact=True)
    torch.testing.assert_close(tri.l1_norm(), ref.l1_norm(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_small_tensors_one_launch(device, dtype, monkeypatch):
    """Sixty tensors of odd sizes share one launch, and still match the reference."""
    calls = _record_launches(monkeypatch)
    shapes = [(1 + 37 * i % 301, 1 + i % 3) for i in range(60)]
    opts = dict(momentum=0.9, nesterov=True, dampening=0.0, weight_decay=0.0, maximize=False, alpha=3e-2)
    (ref, pr), (tri, pt) = _run_pair(shapes, dtype, device, opts, steps=STEPS)
    assert calls == [[(60, True)]] * STEPS
    assert_same_state(ref, pr, tri, pt, exact=True)
    torch.testing.assert_close(tri.l1_norm(), ref.l1_norm(), rtol=1e-5, atol=1e-4)
    expected = sum((tri.state[p]["m"] * tri.state[p]["w"]).abs().sum() for p in pt)
    torch.testing.assert_close(tri.l1_norm(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_amp_grad_scale_and_found_inf(device, dtype):
    """grad_scale divides inside the kernel; found_inf leaves everything unchanged."""
    shapes = [(33, 3), (BLOCK + 1,)]
    runs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        params = [torch.randn(s, device=device).to(dtype).requires_grad_() for s in shapes]
        opt = PILoT(params, lr=0.05, reparam=True, backend=backend, **MOMENTUM)
        for step in range(4):
            opt.grad_scale = torch.tensor(1024.0, device=device)
            opt.found_inf = torch.tensor(1.0 if step == 2 else 0.0, device=device)
            for p in params:
                p.grad = (torch.randn(p.shape, device=device) * 1024).to(dtype)
            before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()
                                            if isinstance(v, torch.Tensor)}) for p in params]
            l1_before = opt.l1_norm()
            opt.step()
            if step == 2:
                for p, (x0, s0) in zip(params, before):
                    assert torch.equal(p.detach(), x0)
                    for k, v in s0.items():
                        assert torch.equal(opt.state[p][k], v), k
                torch.testing.assert_close(opt.l1_norm(), l1_before, rtol=1e-6, atol=1e-4)
        runs.append((opt, params))
    (ref, pr), (tri, pt) = runs
    assert_same_state(ref, pr, tri, pt, exact=True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_channels_last_and_non_contiguous_layouts(device):
    """channels_last weights go through the kernel; a state tensor with a different
    layout from its parameter falls back to the reference and stays correct."""
    runs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 5, device=device).to(memory_format=torch.channels_last).requires_grad_()
        y = torch.randn(6, 5, device=device).requires_grad_()
        opt = PILoT([x, y], lr=0.05, backend=backend, momentum=0.9, alpha=1e-2)
        opt.state[y]["m"] = opt.state[y]["m"].t().contiguous().t()  # same values, other strides
        opt.state[y]["w"] = opt.state[y]["w"].t().contiguous().t()
        g = torch.Generator(device=device).manual_seed(3)
        for _ in range(3):
            x.grad = torch.randn(x.shape, generator=g, device=device).to(memory_format=torch.channels_last)
            y.grad = torch.randn(y.shape, generator=g, device=device)
            opt.step()
        runs.append((opt, [x, y]))
    (ref, pr), (tri, pt) = runs
    assert_same_state(ref, pr, tri, pt, exact=True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unaligned_views_take_the_unvectorized_launch(device, dtype, monkeypatch):
    """Parameters, gradients and state viewed at an odd storage offset (not 16-byte
    aligned) go to a second launch without alignment hints; aligned tensors of the same
    call keep the vectorized one; both match the reference exactly."""
    calls = _record_launches(monkeypatch)
    sizes = [BLOCK + 3, 5, 2 * BLOCK]

    def offset_view(t):  # same values, storage offset 1 element
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        buf[1:].copy_(t.reshape(-1))
        return buf[1:].view(t.shape)

    runs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        params = [offset_view(torch.randn(n, device=device).to(dtype)).requires_grad_() if i != 1
                  else torch.randn(n, device=device).to(dtype).requires_grad_() for i, n in enumerate(sizes)]
        opt = PILoT(params, lr=0.05, reparam=True, backend=backend, **MOMENTUM)
        g = torch.Generator(device=device).manual_seed(5)
        for step in range(3):
            for i, p in enumerate(params):
                grad = torch.randn(p.shape, generator=g, device=device).to(dtype)
                p.grad = offset_view(grad) if i == 2 else grad
            opt.step()
            if step == 0:  # an unaligned state tensor too
                opt.state[params[0]]["momentum_w"] = offset_view(opt.state[params[0]]["momentum_w"])
        runs.append((opt, params))
    assert all(p.data_ptr() % 16 for p in runs[1][1][::2])
    assert calls and all(sorted(c) == [(1, True), (2, False)] for c in calls), calls
    (ref, pr), (tri, pt) = runs
    assert_same_state(ref, pr, tri, pt, exact=True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_gradients_of_16_bit_parameters(device, dtype):
    """torch's ``grad_dtype``: an fp32 gradient on a bf16/fp16 parameter is read as fp32."""
    shapes = [(BLOCK + 1,), (7, 3)]
    (ref, pr), (tri, pt) = _run_pair(shapes, dtype, device, MOMENTUM, steps=3, grad_dtype=torch.float32)
    assert pt[0].grad.dtype == torch.float32
    assert_same_state(ref, pr, tri, pt, exact=True)


# ---------------------------------------------------------------- the launch plan
def _factors(shapes, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    xs, ms, ws = [], [], []
    for s in shapes:
        m, w = split(torch.randn(s, generator=gen, device=device), 1.0)
        xs.append((m * w).to(dtype))
        ms.append(m)
        ws.append(w)
    return xs, ms, ws


def _step(fn, xs, grads, ms, ws, bms, bws, firsts, momentum=0.0, **kw):
    fn(xs, grads, ms, ws, bms, bws, firsts, lr=0.1, momentum=momentum, dampening=0.0,
       nesterov=False, alpha=1e-2, weight_decay=0.0, maximize=False, **kw)


def _assert_equal(a, b):
    for i, (u, v) in enumerate(zip(a, b)):
        if u.dtype != v.dtype or not torch.equal(u, v):
            raise AssertionError(f"tensor {i} differs: {u.dtype} vs {v.dtype}, "
                                 f"max |Δ| = {(u.float() - v.float()).abs().max()}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_mixed_gradient_dtypes_one_launch_each(device, monkeypatch):
    """bf16 parameters, one with a bf16 gradient and one with an fp32 gradient: one
    launch per gradient dtype, both exact."""
    calls = _record_launches(monkeypatch)
    xs, ms, ws = _factors([(BLOCK + 7,), (9, 5)], torch.bfloat16, device)
    ref = [[t.clone() for t in seq] for seq in (xs, ms, ws)]
    grads = [torch.randn(BLOCK + 7, device=device).to(torch.bfloat16), torch.randn(9, 5, device=device)]
    _step(fused_triton.pilot_step, xs, grads, ms, ws, None, None, [True] * 2, workspace={})
    _step(reference.pilot_step, ref[0], grads, ref[1], ref[2], None, None, [True] * 2)
    for a, b in zip((xs, ms, ws), ref):
        _assert_equal(a, b)
    assert calls == [[(1, True), (1, True)]]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_launch_plan_is_reused_while_nothing_moves(device, monkeypatch):
    """Gradients written in place keep their addresses: after the first-step flags flip,
    the cached plan (table, grid) is reused, and the results still match the reference."""
    built = []
    real = fused_triton._make_plan
    monkeypatch.setattr(fused_triton, "_make_plan", lambda *a: built.append(1) or real(*a))
    runs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        params = [torch.randn(s, device=device).requires_grad_() for s in [(5, 3), (BLOCK + 3,)]]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = PILoT(params, lr=0.05, alpha=1e-2, momentum=0.9, reparam=True, backend=backend)
        g = torch.Generator(device=device).manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad.copy_(torch.randn(p.shape, generator=g, device=device))
            opt.step()
        runs.append((opt, params))
    assert len(built) == 2  # first step (firsts=True), then one plan for every later step
    (ref, pr), (tri, pt) = runs
    assert_same_state(ref, pr, tri, pt, exact=True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_momentum_switched_on_with_gradients_in_place(device):
    """The plan is keyed on momentum on/off: switching it on later reads real buffers
    (a stale plan would dereference the null buffer pointers of the momentum-free one)."""
    runs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        params = [torch.randn(s, device=device).requires_grad_() for s in [(BLOCK + 5,), (3, 7)]]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = PILoT(params, lr=0.05, alpha=1e-2, momentum=0.0, reparam=True, backend=backend)
        g = torch.Generator(device=device).manual_seed(2)
        for step in range(4):
            if step == 2:
                opt.param_groups[0]["momentum"] = 0.9
            for p in params:
                p.grad.copy_(torch.randn(p.shape, generator=g, device=device))
            opt.step()
        runs.append((opt, params))
    (ref, pr), (tri, pt) = runs
    assert_same_state(ref, pr, tri, pt, exact=True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_plan_follows_gradient_strides_and_dtype_at_the_same_address(device):
    """A gradient at the address of the previous step's but with other strides, or
    another dtype, gets a new plan: the kernel never walks it with stale facts."""
    xs, ms, ws = _factors([(40, 60)], torch.bfloat16, device)
    ref = [t.clone() for t in xs], [t.clone() for t in ms], [t.clone() for t in ws]
    buf = torch.empty(2400, device=device)
    half = buf.view(torch.bfloat16)[:2400]
    steps = [
        (lambda: half.copy_(torch.randn(2400, device=device)), lambda: half.view(40, 60), []),
        (lambda: half.copy_(torch.randn(2400, device=device)), lambda: half.view(60, 40).t(), [0]),
        (lambda: buf.copy_(torch.randn(2400, device=device)), lambda: buf.view(40, 60), []),
    ]
    workspace: dict = {}
    for fill, view, slow in steps:
        fill()
        g = view()
        assert g.data_ptr() == buf.data_ptr()
        _step(fused_triton.pilot_step, xs, [g], ms, ws, None, None, [True], workspace=workspace)
        _step(reference.pilot_step, ref[0], [g], ref[1], ref[2], None, None, [True])
        for a, b in zip((xs, ms, ws), ref):
            _assert_equal(a, b)
        assert workspace["plan"].slow == slow  # a transposed gradient is not walked


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_plan_follows_a_shape_change_at_the_same_address(device):
    """``x.data = x.data[:k]``-style swaps keep the address but shrink the tensor: the
    plan must not write past the new end."""
    n, k = BLOCK + 9, 300
    xs, ms, ws = _factors([(n,)], torch.float32, device)
    g = torch.randn(n, device=device)
    workspace: dict = {}
    _step(fused_triton.pilot_step, xs, [g], ms, ws, None, None, [True], workspace=workspace)
    tails = [t[k:].clone() for t in xs + ms + ws]
    small = [[t[:k] for t in seq] for seq in (xs, ms, ws)]
    ref = [[t.clone() for t in seq] for seq in small]
    _step(fused_triton.pilot_step, small[0], [g[:k]], small[1], small[2], None, None, [True], workspace=workspace)
    _step(reference.pilot_step, ref[0], [g[:k]], ref[1], ref[2], None, None, [True])
    for a, b in zip(small, ref):
        _assert_equal(a, b)
    _assert_equal([t[k:] for t in xs + ms + ws], tails)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_plan_follows_replaced_state_tensors(device):
    """The optimizer may replace m, w or a momentum buffer (a user wrote the parameter):
    the plan is keyed on their addresses, so the new tensors are the ones updated."""
    xs, ms, ws = _factors([(BLOCK + 1,), (9,)], torch.float32, device)
    bms = [torch.zeros_like(m) for m in ms]
    bws = [torch.zeros_like(m) for m in ms]
    grads = [torch.randn_like(m) for m in ms]
    workspace: dict = {}
    run = lambda fn, *state, **kw: _step(fn, state[0], grads, *state[1:], [False] * 2, momentum=0.9, **kw)
    run(fused_triton.pilot_step, xs, ms, ws, bms, bws, workspace=workspace)
    old = [t.clone() for t in ms + bws]
    ms2, bws2 = [m.clone() for m in ms], [b.clone() for b in bws]   # replaced, same values
    ref = [[t.clone() for t in seq] for seq in (xs, ms2, ws, bms, bws2)]
    run(fused_triton.pilot_step, xs, ms2, ws, bms, bws2, workspace=workspace)
    run(reference.pilot_step, *ref)
    for a, b in zip((xs, ms2, ws, bms, bws2), ref):
        _assert_equal(a, b)
    _assert_equal(ms + bws, old)  # the replaced tensors were not written


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("xs_fixed", [False, True], ids=["checked", "xs_fixed"])
def test_same_xs_tuple_with_a_transposed_x_gets_a_new_plan(device, xs_fixed):
    """The optimizer passes the same tuple of x every step (and its word that no x
    moved): the plan then skips comparing x one by one and reading their addresses,
    but a ``.data`` swap to a view at the same address (a square x transposed) still
    changes its strides, and the kernel must not walk it as before."""
    n = 37
    xs, ms, ws = _factors([(n, n)], torch.float32, device)
    grads = [torch.randn(n, n, device=device)]
    ref = [[t.clone() for t in seq] for seq in (xs, ms, ws)]
    xs = tuple(xs)
    workspace: dict = {"xs_fixed": True} if xs_fixed else {}
    _step(fused_triton.pilot_step, xs, grads, ms, ws, None, None, [True], workspace=workspace)
    plan = workspace["plan"]
    _step(fused_triton.pilot_step, xs, grads, ms, ws, None, None, [True], workspace=workspace)
    assert workspace["plan"] is plan  # reused while nothing moves
    _step(reference.pilot_step, *ref[:1], grads, *ref[1:], None, None, [True])
    _step(reference.pilot_step, *ref[:1], grads, *ref[1:], None, None, [True])
    xs[0].data = xs[0].data.t()      # same object, same address, other strides
    ref[0][0].data = ref[0][0].data.t()
    _step(fused_triton.pilot_step, xs, grads, ms, ws, None, None, [True], workspace=workspace)
    _step(reference.pilot_step, *ref[:1], grads, *ref[1:], None, None, [True])
    assert workspace["plan"] is not plan and workspace["plan"].slow == [0]
    for a, b in zip((xs, ms, ws), ref):
        _assert_equal(a, b)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_same_xs_tuple_with_a_moved_x_gets_a_new_plan(device):
    """Without the caller's word the addresses of the x are compared even when the
    same tuple comes back: an x whose data was swapped for other memory is written
    there, and its old memory is left alone."""
    xs, ms, ws = _factors([(BLOCK + 5,), (7, 3)], torch.float32, device)
    grads = [torch.randn_like(m) for m in ms]
    xs = tuple(xs)
    workspace: dict = {}
    _step(fused_triton.pilot_step, xs, grads, ms, ws, None, None, [True, True], workspace=workspace)
    old = xs[0].data
    kept = old.clone()
    xs[0].data = old.clone()         # same object, other memory
    ref = [[t.clone() for t in seq] for seq in (xs, ms, ws)]
    _step(fused_triton.pilot_step, xs, grads, ms, ws, None, None, [True, True], workspace=workspace)
    _step(reference.pilot_step, *ref[:1], grads, *ref[1:], None, None, [True, True])
    for a, b in zip((xs, ms, ws), ref):
        _assert_equal(a, b)
    _assert_equal([old], [kept])


@pytest.mark.parametrize("torch_guards", [True, False], ids=["TensorGuards", "python"])
def test_layout_guard_sees_shape_stride_and_dtype(torch_guards, monkeypatch):
    if not torch_guards:
        monkeypatch.setattr(layout, "_TensorGuards", None)
    a, b = torch.zeros(4, 6), torch.zeros(6, 4)
    guard = layout.LayoutGuard([a, b])
    assert guard.check([a, b]) and guard.check([a.clone(), b.clone()])
    assert not guard.check([a, b.t().contiguous().t()])      # strides
    assert not guard.check([a, b.view(4, 6)])                # shape
    assert not guard.check([a, b.view(torch.int32)])         # dtype
    assert not guard.check([a])                              # length


def test_a_copied_workspace_holds_no_plan():
    import copy
    import pickle

    xs, ms, ws = _factors([(5,)], torch.float32, "cpu")
    workspace: dict = {}
    _step(fused_triton.pilot_step, xs, [torch.ones(5)], ms, ws, None, None, [True], workspace=workspace)
    assert isinstance(workspace["plan"], fused_triton._Plan)
    assert copy.deepcopy(workspace) == {"plan": None}
    assert pickle.loads(pickle.dumps(workspace)) == {"plan": None}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autograd_sees_the_step_write_the_parameter(device, backend):
    """As with torch's optimizers: backward through a graph that saved a parameter
    the step has since overwritten raises, whichever backend wrote it."""
    x = torch.randn(BLOCK + 1, device=device, requires_grad=True)
    opt = PILoT([x], lr=0.1, reparam=True, backend=backend)
    x.grad = torch.randn_like(x)
    y = (x * x).sum()
    version = x._version
    opt.step()
    assert x._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lr_and_alpha_as_tensors(device, dtype):
    """lr and alpha given as 0-dim tensors (float64 too) step exactly as the reference."""
    xs, ms, ws = _factors([(BLOCK + 3,), (5,)], torch.float32, device)
    ref = [[t.clone() for t in seq] for seq in (xs, ms, ws)]
    grads = [torch.randn_like(m) for m in ms]
    kw = dict(lr=torch.tensor(0.1, dtype=dtype, device=device), momentum=0.0, dampening=0.0,
              nesterov=False, alpha=torch.tensor(3e-2, dtype=dtype, device=device),
              weight_decay=0.0, maximize=False)
    fused_triton.pilot_step(xs, grads, ms, ws, None, None, [True] * 2, **kw)
    reference.pilot_step(ref[0], grads, ref[1], ref[2], None, None, [True] * 2, **kw)
    for a, b in zip((xs, ms, ws), ref):
        _assert_equal(a, b)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_bad_gradient_dtype_is_refused_before_any_write(device):
    xs, ms, ws = _factors([(5,)], torch.float32, device)
    before = [t.clone() for t in xs + ms + ws]
    with pytest.raises(TypeError, match="float32, bfloat16 or float16 gradients"):
        _step(fused_triton.pilot_step, xs, [torch.ones(5, dtype=torch.float64, device=device)], ms, ws,
              None, None, [True], workspace={})
    _assert_equal(xs + ms + ws, before)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_one_l1_slot_for_accumulate_and_clear(device):
    """l1_accum and l1_clear the same tensor: cleared first, then the sum added."""
    xs, ms, ws = _factors([(BLOCK + 1,), (3,)], torch.float32, device)
    l1 = torch.full((), 123.0, device=device)
    _step(fused_triton.pilot_step, xs, [torch.randn_like(m) for m in ms], ms, ws, None, None, [True] * 2,
          l1_accum=l1, l1_clear=l1)
    torch.testing.assert_close(l1, sum((m * w).abs().sum() for m, w in zip(ms, ws)), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_resnet50_shapes(dtype):
    """ResNet-50's 161 tensors on the GPU, fused against the reference, bit for bit."""
    import torchvision

    model = torchvision.models.resnet50()
    shapes = [tuple(p.shape) for p in model.parameters()]
    opts = dict(momentum=0.875, nesterov=False, dampening=0.0, weight_decay=1.5e-5, maximize=False, alpha=7e-6)
    (ref, pr), (tri, pt) = _run_pair(shapes, dtype, "cuda", opts, steps=3)
    assert_same_state(ref, pr, tri, pt, exact=True)


@pytest.mark.gpu
def test_gpu_capturable_lr_alpha_and_amp_exact():
    """lr/alpha on the device and AMP's grad_scale division: IEEE on the GPU too."""
    shapes = [(BLOCK * 3 + 1,), (64, 3, 3, 3)]
    runs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        params = [torch.randn(s, device="cuda").requires_grad_() for s in shapes]
        opt = PILoT(params, lr=torch.tensor(0.05, device="cuda"), reparam=True, backend=backend,
                    capturable=True, **MOMENTUM)
        for _ in range(3):
            opt.grad_scale = torch.tensor(3.0, device="cuda")   # not a power of two: a real division
            opt.found_inf = torch.tensor(0.0, device="cuda")
            for p in params:
                p.grad = torch.randn_like(p) * 3
            opt.step()
        runs.append((opt, params))
    (ref, pr), (tri, pt) = runs
    assert_same_state(ref, pr, tri, pt, exact=True)
