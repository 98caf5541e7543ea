"""Scale and robustness: torch.compile, capturable mode, many and huge tensors, CUDA graphs."""
import pytest
import torch
from torch import nn

from pilot_kernels import PILoT
from pilot_kernels.schedules import GeometricAlpha
from conftest import KERNEL_DEVICES
from pilot_kernels.kernels import StepExtras
from helpers import STREAMS, assert_same_state, fresh_state, hparams, random_grads, step


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _batches(n, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 6, generator=g).to(device) for _ in range(n)]


# ------------------------------------------------------------------ torch.compile
def test_compiled_step_matches_eager_without_graph_breaks():
    """fullgraph=True fails on any graph break; the compiled step must match eager."""
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model = _mlp()
        opt = PILoT(model.parameters(), lr=0.05, alpha=1e-2, weight_decay=1e-3, backend="reference")
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for x in _batches(4):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            step()
        runs.append((opt, list(model.parameters())))
    (eager, pe), (comp, pc) = runs
    # Inductor may contract multiply-adds, so a few ulps are allowed.
    assert_same_state(eager, pe, comp, pc, exact=False, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp.l1_norm(), eager.l1_norm())


def test_custom_op_is_registered_with_a_fake_kernel():
    from pilot_kernels import ops  # noqa: F401  (registers the op)

    op = torch.ops.pilot_kernels.pilot_step.default
    assert "pilot_kernels::pilot_step" in str(op._schema)
    torch.library.opcheck(
        ops.pilot_step_op,
        ([torch.randn(3, 2)], [torch.randn(3, 2)], [torch.rand(3, 2) + 1], [torch.randn(3, 2)],
         [torch.zeros(3, 2)], [torch.zeros(3, 2)], [True], 0.1, None, 0.9, 0.0, False, 0.01, None,
         0.0, False, 1.0, True, None, None, torch.zeros(()), torch.zeros(()), "reference"),
        test_utils=("test_schema", "test_faketensor"),
    )


# ------------------------------------------------------------------ capturable
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_capturable_reads_lr_and_alpha_on_device_without_sync(backend, monkeypatch):
    """Capturable groups hold lr and alpha as device tensors, changed in place (as a
    replayed CUDA graph would see them), and step() never reads a tensor on the host."""
    device = KERNEL_DEVICES[0] if backend == "triton" else "cpu"
    runs = []
    for capturable in (False, True):
        model = _mlp().to(device)
        opt = PILoT(model.parameters(), lr=0.05, alpha=1e-2, backend=backend, capturable=capturable)
        sched = GeometricAlpha(opt, p=0.5)
        lr_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        if capturable:
            lr_t, alpha_t = opt.param_groups[0]["lr"], opt.param_groups[0]["alpha"]
            assert isinstance(lr_t, torch.Tensor) and isinstance(alpha_t, torch.Tensor)
        for x in _batches(4, device=device):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if capturable:
                def no_sync(*a, **k):
                    raise AssertionError("step() read a tensor on the host")
                with monkeypatch.context() as mp:
                    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu"):
                        mp.setattr(torch.Tensor, name, no_sync)
                    opt.step()
            else:
                opt.step()
            sched.step()
            lr_sched.step()
        if capturable:  # the very tensors were updated in place, not replaced
            assert opt.param_groups[0]["lr"] is lr_t and opt.param_groups[0]["alpha"] is alpha_t
            torch.testing.assert_close(lr_t.item(), 0.05 * 0.5 ** 4)
        runs.append((opt, list(model.parameters())))
    (plain, pp), (capt, pc) = runs
    assert_same_state(plain, pp, capt, pc, exact=False, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(capt.l1_norm(), plain.l1_norm())


# ------------------------------------------------------------------ many tiny tensors
def _many_vs_one(n_tensors, backend, device, steps=2):
    """Step n tiny tensors, and the same numbers as one concatenated tensor (a write into
    a few of them before the last step): the update is elementwise, so both must agree
    bit for bit (the L1 up to summation order)."""
    shapes = [(1 + i % 3, 1 + i % 5) for i in range(n_tensors)]
    many = fresh_state(shapes, device=device)
    one = {k: None if v is None else [torch.cat([u.flatten() for u in v])] for k, v in many.items() if k != "firsts"}
    one["firsts"] = [True]
    l1_many, l1_one = torch.zeros((), device=device), torch.zeros((), device=device)
    g = torch.Generator().manual_seed(1)
    for k in range(steps):
        if k == steps - 1:
            for x in many["xs"][::7]:
                x.data.mul_(-2.0)
            one["xs"][0].copy_(torch.cat([x.flatten() for x in many["xs"]]))
        grads = random_grads(many, g)
        step(backend, many, grads, hparams(lr=0.1), StepExtras(l1_accum=l1_many, l1_clear=l1_many), {})
        step("reference", one, [torch.cat([u.flatten() for u in grads])], hparams(lr=0.1),
             StepExtras(l1_accum=l1_one, l1_clear=l1_one))
    for key in STREAMS:
        assert torch.equal(torch.cat([u.flatten() for u in many[key]]), one[key][0]), key
    torch.testing.assert_close(l1_many, l1_one, rtol=1e-5, atol=1e-3)


def test_ten_thousand_tiny_tensors_in_one_step():
    _many_vs_one(10_000, "reference", "cpu")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_thousand_tiny_tensors_one_triton_launch(device):
    """The kernel's tensor lookup over 1,000 rows (10 search steps; 10,000 takes 14).
    The CPU interpreter costs ~6 ms per program, so 10,000 runs on the GPU only."""
    _many_vs_one(1_000, "triton", device, steps=1)


@pytest.mark.gpu
def test_ten_thousand_tiny_tensors_triton_gpu():
    _many_vs_one(10_000, "triton", "cuda")


# ------------------------------------------------------------------ GPU only
@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_follow_lr_and_alpha():
    """A whole training step captured once and replayed; lr/alpha changes take effect."""
    device = "cuda"
    model = _mlp().to(device)
    eager_model = _mlp().to(device)
    opt = PILoT(model.parameters(), lr=0.05, alpha=1e-2, capturable=True)
    eager_opt = PILoT(eager_model.parameters(), lr=0.05, alpha=1e-2)
    static_x = torch.randn(8, 6, device=device)

    def train_step(m, o):
        o.zero_grad(set_to_none=False)
        m(static_x).pow(2).mean().backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: allocate grads, build the kernel table
        for _ in range(3):
            train_step(model, opt)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        train_step(eager_model, eager_opt)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt)
    for i, x in enumerate(_batches(5, device=device)):
        lr, alpha = 0.05 * 0.8 ** i, 1e-2 * 0.5 ** i
        opt.param_groups[0]["lr"].fill_(lr)
        opt.param_groups[0]["alpha"].fill_(alpha)
        eager_opt.param_groups[0]["lr"], eager_opt.param_groups[0]["alpha"] = lr, alpha
        static_x.copy_(x)
        graph.replay()
        train_step(eager_model, eager_opt)
    torch.cuda.synchronize()
    assert_same_state(opt, list(model.parameters()), eager_opt, list(eager_model.parameters()),
                      exact=False, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_tensor_over_2_pow_31_elements(backend):
    """64-bit offsets: the last elements of a 2^31 + 3 element tensor are updated right."""
    n = 2**31 + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * n:  # x, g (bf16) + m, w, and the reference's temporaries
        pytest.skip(f"needs about {30 * n / 2**30:.0f} GiB of free GPU memory")
    torch.manual_seed(0)
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16).requires_grad_()
    opt = PILoT([x], lr=0.1, alpha=1e-2, momentum=0.0, reparam=True, backend=backend)
    tail = slice(n - 4099, n)
    m0, w0 = opt.state[x]["m"][tail].clone(), opt.state[x]["w"][tail].clone()
    x.grad = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    g_tail = x.grad[tail].float()
    opt.step()
    d_m = g_tail * w0 + 2e-2 * m0
    d_w = g_tail * m0 + 2e-2 * w0
    torch.testing.assert_close(opt.state[x]["m"][tail], m0 - 0.1 * d_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[x]["w"][tail], w0 - 0.1 * d_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.detach()[tail].float(), (opt.state[x]["m"][tail] * opt.state[x]["w"][tail]).bfloat16().float())
