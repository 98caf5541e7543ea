"""The fused Triton kernel against the reference backend, bit for bit, through the
dispatcher (:func:`pilot_kernels.kernels.run_step`).

Without a GPU the kernel runs in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1); on a GPU it is launched with FP contraction off and IEEE division,
so there too m, w, both momentum buffers and x must equal the reference's exactly (only
the L1 sum, a reduction in another order, is compared with a tolerance).  Every test
runs several steps and compares all state; writes into x (``.data``) between steps are
adopted by both backends the same way.
"""
import copy

import pytest
import torch

from pilot_kernels.init import split
from pilot_kernels.kernels import StepExtras, StepTensors, fused_triton, layout
from conftest import KERNEL_DEVICES
from helpers import (OPTION_GRID, assert_states_equal, clone_state, fresh_state, hparams,
                     option_id, random_grads, step, write_every_kind)

BLOCK = fused_triton.BLOCK_SIZE
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _train_pair(shapes, dtype, device, h, *, steps=3, write_at=(1,), grad_dtype=None, seed=0,
                state=None, extras=None):
    """Step the same state with the reference and triton, writing into x (every kind of
    write) before the steps in ``write_at``; return both final states and L1 sums."""
    s0 = state or fresh_state(shapes, dtype, beta=h.beta, momentum=h.momentum != 0, device=device, seed=seed)
    out = []
    for backend in ("reference", "triton"):
        s = clone_state(s0)
        gen, wgen = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)
        workspace = {}
        l1 = torch.zeros((), device=device)
        for k in range(steps):
            if k in write_at:
                write_every_kind(s["xs"], wgen)
            e = (extras or StepExtras())._replace(l1_accum=l1, l1_clear=l1)
            step(backend, s, random_grads(s, gen, grad_dtype), h, e, workspace)
        out.append((s, l1))
    return out


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_options_fp32(device, opts):
    (ref, l1_ref), (tri, l1_tri) = _train_pair([(3, 5), (BLOCK + 1,), (7,), (2, 2), (1,)],
                                               torch.float32, device, hparams(**opts))
    assert_states_equal(ref, tri)
    torch.testing.assert_close(l1_tri, l1_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("beta", [1.0, 0.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
def test_sizes_dtypes_and_both_splits(device, dtype, numel, beta):
    """Five tensors of the size, so that each kind of write lands in one of them."""
    h = hparams(beta=beta, nesterov=True)
    (ref, l1_ref), (tri, l1_tri) = _train_pair([(numel,)] * 5, dtype, device, h)
    assert_states_equal(ref, tri)
    torch.testing.assert_close(l1_tri, l1_ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("beta", [1.0, 0.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_written_elements_are_kept_and_the_rest_unchanged(device, dtype, beta):
    """lr = α = 0 and zero gradients: a step changes nothing, so every written element
    keeps its written value where its split multiplies back exactly (all but the rare
    value without such a pair for β = 1; the balanced split w = sign(x)·m, with m·w = ±m²,
    has none for about half of them), every other element keeps its bits,
    and m, w of written elements are the split of the written value."""
    shapes = [(BLOCK + 3,), (5, 7), (1,), (BLOCK - 1,), (33,)]
    s = fresh_state(shapes, dtype, beta=beta, device=device)
    before = clone_state(s)
    written = write_every_kind(s["xs"], torch.Generator().manual_seed(5))
    assert all(w.any() for w in written)
    target = [x.clone() for x in s["xs"]]
    h = hparams(beta=beta, lr=0.0, alpha=0.0)
    zeros = [torch.zeros_like(x) for x in s["xs"]]
    ref = clone_state(s)
    step("triton", s, zeros, h, workspace={})
    step("reference", ref, zeros, h)
    assert_states_equal(s, ref)
    n_exact = n_all = 0
    for i, x in enumerate(s["xs"]):
        m, w = split(target[i], beta)
        exact = (m * w).to(dtype) == target[i]
        n_exact, n_all = n_exact + int(exact.sum()), n_all + exact.numel()
        assert torch.equal(x[exact], target[i][exact])
        new = written[i]
        assert torch.equal(s["ms"][i][new], m[new]) and torch.equal(s["ws"][i][new], w[new])
        assert torch.equal(s["ms"][i][~new], before["ms"][i][~new])
        assert torch.equal(s["ws"][i][~new], before["ws"][i][~new])
    assert n_exact / n_all > (0.99 if beta else 0.4)  # over all entries: one tiny tensor may miss one


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_restarts_only_for_written_elements(device, nesterov):
    """With history in the buffers, a written element's buffer becomes this step's d
    (as on a first step) and every other element's continues μ·b + (1 − τ)·d."""
    shapes = [(BLOCK + 3,), (6, 6)]
    h = hparams(nesterov=nesterov, lr=0.0)
    s = fresh_state(shapes, device=device)
    gen = torch.Generator().manual_seed(3)
    step("triton", s, random_grads(s, gen), h, workspace={})          # history in b
    written = write_every_kind(s["xs"], torch.Generator().manual_seed(4))
    grads = random_grads(s, gen)
    as_first, untouched = clone_state(s), clone_state(s)
    as_first["firsts"] = [True] * len(shapes)
    step("triton", s, grads, h, workspace={})
    step("reference", as_first, grads, h)                            # every element restarts
    for i, x in enumerate(untouched["xs"]):                          # no element was written
        x.copy_((untouched["ms"][i] * untouched["ws"][i]).to(x.dtype))
    step("reference", untouched, grads, h)
    for key in ("momentum_ms", "momentum_ws"):
        for i, new in enumerate(written):
            assert torch.equal(s[key][i][new], as_first[key][i][new]), key
            assert torch.equal(s[key][i][~new], untouched[key][i][~new]), key


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_amp_found_inf_changes_nothing_and_a_written_x_stays_written(device, dtype):
    shapes = [(33, 3), (BLOCK + 1,), (5,)]
    h = hparams()
    s = fresh_state(shapes, dtype, device=device)
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor(1024.0, device=device)
    step("triton", s, random_grads(s, gen, scale=1024.0), h,
         StepExtras(grad_scale=scale, found_inf=torch.tensor(0.0, device=device)), {})
    write_every_kind(s["xs"], torch.Generator().manual_seed(2))
    ref = clone_state(s)
    frozen = clone_state(s)
    l1 = torch.tensor(-1.0, device=device)
    for flag in (float("inf"), float("nan")):   # NaN != 0 skips too
        skip = StepExtras(grad_scale=scale, found_inf=torch.tensor(flag, device=device), l1_accum=l1, l1_clear=l1)
        step("triton", s, random_grads(s, gen, scale=1024.0), h, skip, {})
        assert_states_equal(s, frozen)
    # Σ|m·w| of the unchanged factors (the ones the last step wrote, not the adopted x).
    expected = sum((m * w).abs().sum() for m, w in zip(frozen["ms"], frozen["ws"]))
    torch.testing.assert_close(l1, expected, rtol=1e-5, atol=1e-4)
    # The next finite step adopts the written values, as the reference does.
    s["firsts"] = ref["firsts"] = [False] * len(shapes)
    ok = StepExtras(grad_scale=scale, found_inf=torch.tensor(0.0, device=device))
    grads = random_grads(s, gen, scale=1024.0)
    step("triton", s, grads, h, ok, {})
    step("reference", ref, grads, h, ok)
    assert_states_equal(s, ref)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adopt_writes_off_does_not_read_x(device, dtype):
    """adopt_writes=False: x is only written (the 40 B/element kernel): a write is
    overwritten with m·w, and m, w evolve as if nothing had been written."""
    h = hparams(adopt_writes=False)
    (ref, _), (tri, _) = _train_pair([(BLOCK + 1,), (3, 5), (7,), (1,), (9, 2)], dtype, device, h)
    assert_states_equal(ref, tri)
    (clean, _), _ = _train_pair([(BLOCK + 1,), (3, 5), (7,), (1,), (9, 2)], dtype, device, h, write_at=())
    for key in ("ms", "ws", "momentum_ms", "momentum_ws"):
        assert all(torch.equal(u, v) for u, v in zip(tri[key], clean[key])), key
    assert all(torch.equal(x, (m * w).to(dtype)) for x, m, w in zip(tri["xs"], tri["ms"], tri["ws"]))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_special_values_are_re_split_like_init_split(device):
    """Written values at the edges of fp32: zeros of both signs, subnormals, huge values
    (the hypot branch) and the largest finite ones."""
    specials = torch.tensor([0.0, -0.0, 1e-45, -3e-39, 2.0**61, -(2.0**100), 3.4e38, -3.4e38,
                             2.0**60, 1.0, -1.0, 1e-20, 7.5], device=device)
    for beta in (1.0, 0.0):
        h = hparams(beta=beta, lr=0.0, alpha=0.0)
        s = fresh_state([(specials.numel(),)], device=device)
        s["xs"][0].data.copy_(specials)
        ref = clone_state(s)
        zeros = [torch.zeros_like(specials)]
        step("triton", s, zeros, h, workspace={})
        step("reference", ref, zeros, h)
        assert_states_equal(s, ref)
        m, w = split(specials, beta)
        assert torch.equal(s["ms"][0], m) and torch.equal(s["ws"][0].view(torch.int32), w.view(torch.int32))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_every_nudge_of_init_split(device):
    """Written values whose split takes each of init.split's candidates (the closed form,
    m nudged by +1, −1, +2, −2 ulps) are re-split by the kernel to the same bits."""
    from pilot_kernels.init import _closed_form_m

    pool = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 3
    m, _ = split(pool, 1.0)
    took = m.view(torch.int32) - _closed_form_m(pool, 1.0).view(torch.int32)
    values = torch.cat([pool[took == k][:32] for k in (0, 1, -1, 2, -2)])
    assert values.numel() == 160
    s = fresh_state([(160,)], device=device)
    s["xs"][0].data.copy_(values)
    ref = clone_state(s)
    zeros = [torch.zeros(160, device=device)]
    h = hparams(lr=0.0, alpha=0.0)
    step("triton", s, zeros, h, workspace={})
    step("reference", ref, zeros, h)
    assert_states_equal(s, ref)
    assert torch.equal(s["xs"][0], values)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_and_own_dtype_gradients_one_launch_each(device, dtype, monkeypatch):
    """16-bit parameters whose gradients are partly fp32 (torch's grad_dtype): one
    kernel call per gradient dtype, bitwise the reference's."""
    calls = []
    real = fused_triton.pilot_step
    monkeypatch.setattr(fused_triton, "pilot_step",
                        lambda t, *a: (calls.append(t.grads[0].dtype), real(t, *a))[1])
    shapes = [(BLOCK + 1,), (3, 5), (7,), (4, 4)]
    s0 = fresh_state(shapes, dtype, device=device)
    runs = []
    for backend in ("reference", "triton"):
        s, gen, workspace = clone_state(s0), torch.Generator().manual_seed(1), {}
        for k in range(3):
            if k == 1:
                write_every_kind(s["xs"], torch.Generator().manual_seed(9))
            grads = [g.float() if i % 2 else g for i, g in enumerate(random_grads(s, gen))]
            step(backend, s, grads, hparams(), workspace=workspace)
        runs.append(s)
    assert calls == [dtype, torch.float32] * 3
    assert_states_equal(*runs)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_unwalkable_entries_go_to_the_reference(device, monkeypatch):
    """A state tensor with other strides than its parameter, or a strided x, is stepped
    by the reference in the same run_step call; the rest by the kernel."""
    seen = []
    real = fused_triton.pilot_step
    monkeypatch.setattr(fused_triton, "pilot_step", lambda t, *a: (seen.append(len(t.xs)), real(t, *a))[1])
    s0 = fresh_state([(6, 5), (BLOCK + 1,), (4, 3, 5, 5)], device=device)
    runs = []
    for backend in ("reference", "triton"):
        s, gen = clone_state(s0), torch.Generator().manual_seed(1)
        s["ms"][0] = s["ms"][0].t().contiguous().t()                  # same values, other strides
        strided = torch.zeros(2 * (BLOCK + 1), device=device)[::2]    # x not dense
        s["xs"][1] = strided.copy_(s["xs"][1])
        for k in range(3):
            if k == 1:
                write_every_kind(s["xs"], torch.Generator().manual_seed(9))
            step(backend, s, random_grads(s, gen), hparams(), workspace={})
        runs.append(s)
    assert seen == [1] * 3
    assert_states_equal(*runs)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_plan_follows_every_stream_and_is_reused_otherwise(device, monkeypatch):
    """The launch plan is rebuilt when any tensor of any stream moves (``p.data = t``
    swaps x's storage; a state tensor replaced), changes size at the same address, or a
    first-step flag changes; it is reused, without re-uploading, when nothing did."""
    built = []
    real = fused_triton._make_plan
    monkeypatch.setattr(fused_triton, "_make_plan", lambda t: built.append(1) or real(t))
    s = fresh_state([(BLOCK + 5,), (7, 3)], device=device)
    ref = clone_state(s)
    gen = torch.Generator().manual_seed(0)
    grads = random_grads(s, gen)
    workspace = {}

    def both(n_built):
        step("triton", s, grads, hparams(), workspace=workspace)
        step("reference", ref, grads, hparams())
        assert_states_equal(s, ref)
        assert len(built) == n_built

    both(1)                     # first step
    both(2)                     # firsts changed
    both(2)                     # nothing moved
    old = s["xs"][0].data
    kept = old.clone()
    s["xs"][0].data = (old * 2).clone()      # x's storage swapped (and its values written)
    ref["xs"][0].data = (ref["xs"][0].data * 2).clone()
    both(3)
    assert torch.equal(old, kept)           # the old storage was not written
    s["momentum_ws"][1] = s["momentum_ws"][1].clone()
    ref["momentum_ws"][1] = ref["momentum_ws"][1].clone()
    both(4)
    s["xs"][0].data = s["xs"][0].data[:300]  # same address, smaller
    for st in (s, ref):
        for k in ("ms", "ws", "momentum_ms", "momentum_ws"):
            st[k][0] = st[k][0][:300]
    ref["xs"][0].data = ref["xs"][0].data[:300]
    grads[0] = grads[0][:300]
    both(5)


def test_a_copied_workspace_holds_no_plan():
    s = fresh_state([(9,)])
    workspace = {}
    step("triton", s, random_grads(s, torch.Generator().manual_seed(0)), hparams(), workspace=workspace)
    assert workspace[("triton", torch.float32)]["plan"] is not None
    assert copy.deepcopy(workspace)[("triton", torch.float32)]["plan"] is None


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_written_tensor_is_bumped_once(device, backend):
    """Autograd sees the step's in-place writes of x, m, w and both buffers, as from an
    in-place torch op; the kernel path bumps each once per call."""
    s = fresh_state([(BLOCK + 1,), (3, 4)], device=device)
    tensors = [u for k in ("xs", "ms", "ws", "momentum_ms", "momentum_ws") for u in s[k]]
    before = [u._version for u in tensors]
    step(backend, s, random_grads(s, torch.Generator().manual_seed(0)), hparams(), workspace={})
    after = [u._version for u in tensors]
    assert all(a > b for a, b in zip(after, before))
    if backend == "triton":
        assert all(a == b + 1 for a, b in zip(after, before))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_lr_and_alpha_as_tensors(device):
    """Capturable mode: lr and α as tensors (here float64, converted once to fp32 by the
    dispatcher) give the float's results."""
    s0 = fresh_state([(BLOCK + 1,), (5, 3)], device=device)
    runs = []
    for lr, alpha in ((0.05, 1e-2), (torch.tensor(0.05, dtype=torch.float64), torch.tensor(1e-2, device=device))):
        s, gen = clone_state(s0), torch.Generator().manual_seed(1)
        for _ in range(2):
            step("triton", s, random_grads(s, gen), hparams(lr=lr, alpha=alpha), workspace={})
        runs.append(s)
    assert_states_equal(*runs)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("same_slot", [True, False])
def test_one_l1_clear_rule(device, same_slot):
    """l1_clear is zeroed by the first call the dispatcher makes (kernel or reference),
    and Σ|m·w| of every part (two gradient dtypes, one unwalkable entry) is added."""
    s = fresh_state([(BLOCK + 1,), (3, 4), (6, 5)], torch.bfloat16, device=device)
    s["ms"][2] = s["ms"][2].t().contiguous().t()
    grads = random_grads(s, torch.Generator().manual_seed(0))
    grads[1] = grads[1].float()
    buf = torch.tensor([5.0, 7.0], device=device)
    accum, clear = (buf[0], buf[0]) if same_slot else (buf[0], buf[1])
    step("triton", s, grads, hparams(), StepExtras(l1_accum=accum, l1_clear=clear), {})
    expected = sum((m * w).abs().sum() for m, w in zip(s["ms"], s["ws"]))
    torch.testing.assert_close(accum, expected + (0.0 if same_slot else 5.0), rtol=1e-5, atol=1e-3)
    assert clear.item() == (accum.item() if same_slot else 0.0)


def test_bad_input_is_refused_before_any_write():
    s = fresh_state([(BLOCK + 1,), (3, 4)])
    before = clone_state(s)
    grads = random_grads(s, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="beta"):
        step("triton", s, grads, hparams(beta=2.0**50), workspace={})
    grads[1] = grads[1].double()   # the dispatcher would give this entry to the reference
    t = StepTensors(s["xs"], grads, s["ms"], s["ws"], s["momentum_ms"], s["momentum_ws"], s["firsts"])
    with pytest.raises(TypeError, match="run_step"):
        fused_triton.pilot_step(t, hparams(), StepExtras(), {})
    assert_states_equal(s, before)


@pytest.mark.parametrize("native", [True, False], ids=["TensorGuards", "python"])
def test_layout_guard_sees_shape_stride_dtype_and_requires_grad(native):
    if native and layout._TensorGuards is None:
        pytest.skip("torch's TensorGuards is not used on this torch release")
    a, b = torch.zeros(4, 6), torch.zeros(6, 4)
    guard = layout.LayoutGuard([a, b], native=native)
    assert guard.check([a, b]) and guard.check([a.clone(), b.clone()])
    assert not guard.check([a, b.t().contiguous().t()])      # strides
    assert not guard.check([a, b.view(4, 6)])                # shape
    assert not guard.check([a, b.view(torch.int32)])         # dtype
    assert not guard.check([a, b.clone().requires_grad_()])  # requires_grad
    assert not guard.check([a])                              # length


def test_layout_guard_python_fallback_agrees_with_tensor_guards():
    if layout._TensorGuards is None:
        pytest.skip("torch's TensorGuards is not used on this torch release")
    base = [torch.zeros(4, 6), torch.zeros(6, 4, dtype=torch.bfloat16), torch.zeros(3, 1, 5)]
    variants = [
        base, [u.clone() for u in base], [base[0].t(), *base[1:]], [base[0], base[1].float(), base[2]],
        [base[0], base[1], base[2].view(3, 5, 1)], [base[0], base[1], torch.zeros(9, 1, 10)[::3, :, ::2]],
        [base[0].requires_grad_(False), base[1], base[2].clone().requires_grad_()], base[:2],
    ]
    native, python = layout.LayoutGuard(base, native=True), layout.LayoutGuard(base, native=False)
    answers = [(native.check(v), python.check(v)) for v in variants]
    assert all(a == b for a, b in answers), answers
    assert [a for a, _ in answers] == [True, True, False, False, False, False, False, False]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_resnet50_shapes(dtype):
    shapes = [(64, 3, 7, 7), (256, 64, 1, 1), (512, 128, 3, 3), (1000, 2048), (2048, 512, 1, 1)]
    (ref, l1_ref), (tri, l1_tri) = _train_pair(shapes, dtype, "cuda", hparams(weight_decay=1e-4))
    assert_states_equal(ref, tri)
    torch.testing.assert_close(l1_tri, l1_ref, rtol=1e-4, atol=1e-2)
