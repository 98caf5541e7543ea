"""The fused Triton kernel against the reference backend.

Without a GPU the kernel runs in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1), where it must agree bit for bit; on a GPU the compiler may fuse
multiply-adds, so there the comparison allows a few ulps.
"""
import pytest
import torch

from pilot_kernels import PILoT
from pilot_kernels.kernels import fused_triton
from conftest import KERNEL_DEVICES
from helpers import OPTION_GRID, assert_same_state, option_id

BLOCK = fused_triton.BLOCK_SIZE
STEPS = 7
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tolerances(device, dtype):
    if device == "cpu":
        return dict(exact=True)
    return dict(exact=False, rtol={torch.float32: 1e-5}.get(dtype, 1e-2), atol=1e-5)


def _run_pair(shapes, dtype, device, opts, *, steps=STEPS, grad_scale=None, lr=0.05, beta=1.0):
    """Train the same tensors with the reference and the triton backend; return both."""
    torch.manual_seed(0)
    init = [torch.randn(s, device=device).to(dtype) for s in shapes]
    runs = []
    for backend in ("reference", "triton"):
        params = [x.clone().requires_grad_() for x in init]
        opt = PILoT(params, lr=lr, beta=beta, reparam=True, backend=backend, **opts)
        g = torch.Generator(device=device).manual_seed(1)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, device=device).to(dtype)
            opt.step()
        runs.append((opt, params))
    return runs


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_options_fp32(device, opts):
    shapes = [(3, 5), (BLOCK + 1,), (7,)]
    (ref, pr), (tri, pt) = _run_pair(shapes, torch.float32, device, opts)
    assert_same_state(ref, pr, tri, pt, **_tolerances(device, torch.float32))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 100_003])
def test_awkward_sizes(device, dtype, numel):
    opts = dict(momentum=0.9, nesterov=False, dampening=0.0, weight_decay=1e-3, maximize=False, alpha=1e-2)
    (ref, pr), (tri, pt) = _run_pair([(numel,)], dtype, device, opts, steps=3)
    assert_same_state(ref, pr, tri, pt, **_tolerances(device, dtype))
    torch.testing.assert_close(tri.l1_norm(), ref.l1_norm(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_small_tensors_one_launch(device, dtype, monkeypatch):
    """Sixty tensors of odd sizes share one launch, and still match the reference."""
    launches = []
    real = fused_triton._launch
    monkeypatch.setattr(fused_triton, "_launch", lambda plan, *a, **k: (launches.append(len(plan.fused)), real(plan, *a, **k)))
    shapes = [(1 + 37 * i % 301, 1 + i % 3) for i in range(60)]
    opts = dict(momentum=0.9, nesterov=True, dampening=0.0, weight_decay=0.0, maximize=False, alpha=3e-2)
    (ref, pr), (tri, pt) = _run_pair(shapes, dtype, device, opts, steps=STEPS)
    assert launches == [60] * STEPS
    assert_same_state(ref, pr, tri, pt, **_tolerances(device, dtype))
    torch.testing.assert_close(tri.l1_norm(), ref.l1_norm(), rtol=1e-5, atol=1e-4)
    expected = sum((tri.state[p]["m"] * tri.state[p]["w"]).abs().sum() for p in pt)
    torch.testing.assert_close(tri.l1_norm(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_amp_grad_scale_and_found_inf(device, dtype):
    """grad_scale divides inside the kernel; found_inf leaves everything unchanged."""
    shapes = [(33, 3), (BLOCK + 1,)]
    opts = dict(momentum=0.9, nesterov=False, dampening=0.0, weight_decay=1e-3, maximize=False, alpha=1e-2)
    runs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        params = [torch.randn(s, device=device).to(dtype).requires_grad_() for s in shapes]
        opt = PILoT(params, lr=0.05, reparam=True, backend=backend, **opts)
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
    assert_same_state(ref, pr, tri, pt, **_tolerances(device, dtype))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_channels_last_and_non_contiguous_layouts(device):
    """channels_last weights go through the kernel; a state tensor with a different
    layout from its parameter falls back to the reference and stays correct."""
    opts = dict(momentum=0.9, alpha=1e-2)
    runs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 5, device=device).to(memory_format=torch.channels_last).requires_grad_()
        y = torch.randn(6, 5, device=device).requires_grad_()
        opt = PILoT([x, y], lr=0.05, backend=backend, **opts)
        opt.state[y]["m"] = opt.state[y]["m"].t().contiguous().t()  # same values, other strides
        opt.state[y]["w"] = opt.state[y]["w"].t().contiguous().t()
        g = torch.Generator(device=device).manual_seed(3)
        for _ in range(3):
            x.grad = torch.randn(x.shape, generator=g, device=device).to(memory_format=torch.channels_last)
            y.grad = torch.randn(y.shape, generator=g, device=device)
            opt.step()
        runs.append((opt, [x, y]))
    (ref, pr), (tri, pt) = runs
    assert_same_state(ref, pr, tri, pt, **_tolerances(device, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_resnet50_shapes(dtype):
    """ResNet-50's 161 tensors on the GPU, fused against the reference."""
    import torchvision

    model = torchvision.models.resnet50()
    shapes = [tuple(p.shape) for p in model.parameters()]
    opts = dict(momentum=0.875, nesterov=False, dampening=0.0, weight_decay=1.5e-5, maximize=False, alpha=7e-6)
    (ref, pr), (tri, pt) = _run_pair(shapes, dtype, "cuda", opts, steps=3)
    assert_same_state(ref, pr, tri, pt, **_tolerances("cuda", dtype))


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
        opt = PILoT(params, lr=0.05, alpha=1e-2, reparam=True, backend=backend)
        g = torch.Generator(device=device).manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad.copy_(torch.randn(p.shape, generator=g, device=device))
            opt.step()
        runs.append((opt, params))
    assert len(built) == 2  # first step (firsts=True), then one plan for every later step
    (ref, pr), (tri, pt) = runs
    assert_same_state(ref, pr, tri, pt, **_tolerances(device, torch.float32))
