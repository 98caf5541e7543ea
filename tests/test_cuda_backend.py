"""The CUDA C++ backend against the plain-torch reference, on a GPU.

Both backends step identical copies of the same tensors with the same gradients for
several steps; m, w, the momentum buffers and x must agree bit for bit (the kernel does
the reference's fp32 operations in the reference's order, each rounded once), and
``x == m * w`` cast to x's dtype.  Only the L1 sum may differ, by its summation order.
Skipped, and reported as skipped, without a CUDA device.
"""
from __future__ import annotations

import pytest
import torch

from pilot_kernels import PILoT
from pilot_kernels.init import split
from pilot_kernels.kernels import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEPS = 7
# Edge sizes around the 4-element vectors and the 4096-element chunks, a large tensor,
# a 2-D one, and many small tensors (one launch covers all of them).
SIZES = [1, 7, 1023, 1025, 4096, 4097, 100003, (33, 31)] + [3, 5, 64, 130] * 40

CONFIGS = {
    "sgd": dict(momentum=0.0, dampening=0.0, nesterov=False, alpha=0.0, weight_decay=0.0, maximize=False),
    "momentum": dict(momentum=0.9, dampening=0.0, nesterov=False, alpha=1e-3, weight_decay=0.0, maximize=False),
    "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True, alpha=1e-3, weight_decay=0.0, maximize=False),
    "dampening": dict(momentum=0.875, dampening=0.1, nesterov=False, alpha=5e-4, weight_decay=0.0, maximize=False),
    "wd_maximize": dict(momentum=0.9, dampening=0.0, nesterov=False, alpha=2e-3, weight_decay=1e-2, maximize=True),
    "alpha_no_momentum": dict(momentum=0.0, dampening=0.0, nesterov=False, alpha=3e-2, weight_decay=3e-5, maximize=False),
}


@pytest.fixture(scope="module")
def fused_cuda():
    from pilot_kernels.kernels import fused_cuda as module

    try:
        module.load_extension()
    except RuntimeError as e:
        if "no CUDA toolkit" in str(e) or "needs ninja" in str(e) or "CPU-only build" in str(e):
            pytest.skip(f"the cuda backend cannot be built here: {e}")
        raise
    return module


# ---------------------------------------------------------------- helpers
class Group:
    """One (device, dtype) group: params x, fp32 factors and buffers, a 2-slot L1."""

    def __init__(self, sizes, dtype, momentum, seed, beta=1.0, make=None):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.xs, self.ms, self.ws, self.bms, self.bws = [], [], [], [], []
        for size in sizes:
            shape = size if isinstance(size, tuple) else (size,)
            x0 = torch.randn(shape, device="cuda", generator=gen) * 0.5
            if make is not None:
                x0 = make(x0)
            m, w = split(x0, beta)
            self.xs.append((m * w).to(dtype))
            self.ms.append(m)
            self.ws.append(w)
            self.bms.append(torch.zeros_like(m))
            self.bws.append(torch.zeros_like(w))
        self.momentum = momentum
        self.l1 = torch.zeros(2, device="cuda")
        self.latest = 0
        self.stepped = False

    def clone(self):
        other = object.__new__(Group)
        for k in ("xs", "ms", "ws", "bms", "bws"):
            setattr(other, k, [t.clone() for t in getattr(self, k)])
        other.momentum, other.l1, other.latest, other.stepped = self.momentum, self.l1.clone(), self.latest, self.stepped
        return other

    def step(self, step_fn, grads, cfg, lr, **amp):
        mom = self.momentum != 0
        step_fn(
            self.xs, grads, self.ms, self.ws,
            self.bms if mom else None, self.bws if mom else None,
            [not self.stepped] * len(self.xs),
            lr=lr, l1_accum=self.l1[1 - self.latest], l1_clear=self.l1[self.latest],
            **cfg, **amp,
        )
        self.latest = 1 - self.latest
        self.stepped = True


def make_grads(group, dtype, seed, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(x.shape, device="cuda", generator=gen) * scale).to(dtype) for x in group.xs]


def assert_same(cuda, ref, what=""):
    names = ("xs", "ms", "ws") + (("bms", "bws") if cuda.momentum != 0 else ())
    for name in names:
        for i, (a, b) in enumerate(zip(getattr(cuda, name), getattr(ref, name))):
            if not torch.equal(a, b):
                diff = (a.float() - b.float()).abs().max().item()
                raise AssertionError(f"{what}: {name}[{i}] (shape {tuple(a.shape)}) differs, max |diff| {diff:.3e}")
    torch.testing.assert_close(cuda.l1, ref.l1, rtol=1e-5, atol=1e-3, msg=lambda m: f"{what}: L1 {m}")
    for i, (x, m, w) in enumerate(zip(cuda.xs, cuda.ms, cuda.ws)):
        assert torch.equal(x, (m * w).to(x.dtype)), f"{what}: x[{i}] != m*w"


# ---------------------------------------------------------------- against the reference
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference(fused_cuda, dtype, config):
    cfg = CONFIGS[config]
    ref = Group(SIZES, dtype, cfg["momentum"], seed=1)
    cuda = ref.clone()
    for step in range(STEPS):
        grads = make_grads(ref, dtype, seed=100 + step)
        lr = 0.1 / (1 + step)  # a schedule: lr changes between steps
        ref.step(reference.pilot_step, grads, cfg, lr)
        cuda.step(fused_cuda.pilot_step, [g.clone() for g in grads], cfg, lr)
        torch.cuda.synchronize()
        assert_same(cuda, ref, f"{config}/{dtype} step {step}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_grad_scale_and_found_inf(fused_cuda, dtype):
    cfg = CONFIGS["momentum"]
    ref = Group(SIZES, dtype, cfg["momentum"], seed=2)
    cuda = ref.clone()
    scale = torch.full((1,), 1024.0, device="cuda")
    for step in range(STEPS):
        skip = step in (0, 3)  # a skipped first step too: the buffers stay zero
        grads = make_grads(ref, dtype, seed=200 + step, scale=1024.0)
        if skip:
            grads[len(grads) // 2].view(-1)[0] = float("inf")
        found_inf = torch.full((1,), 1.0 if skip else 0.0, device="cuda")
        before = cuda.clone()
        amp = dict(grad_scale=scale, found_inf=found_inf)
        ref.step(reference.pilot_step, grads, cfg, 0.05, **amp)
        cuda.step(fused_cuda.pilot_step, [g.clone() for g in grads], cfg, 0.05, **amp)
        torch.cuda.synchronize()
        assert_same(cuda, ref, f"amp/{dtype} step {step}")
        if skip:
            for name in ("xs", "ms", "ws", "bms", "bws"):
                for a, b in zip(getattr(cuda, name), getattr(before, name)):
                    assert torch.equal(a, b), f"found_inf set but {name} changed"
            expected = sum((m * w).abs().sum() for m, w in zip(cuda.ms, cuda.ws))
            torch.testing.assert_close(cuda.l1[cuda.latest], expected, rtol=1e-5, atol=1e-3)


def test_unaligned_views_take_the_scalar_path(fused_cuda):
    # Views at an odd element offset: not 16-byte aligned, still dense.
    cfg = CONFIGS["nesterov"]
    base = Group([100003 + 1, 1025 + 1], torch.bfloat16, cfg["momentum"], seed=3)
    for name in ("xs", "ms", "ws", "bms", "bws"):
        setattr(base, name, [t[1:] for t in getattr(base, name)])
    ref = base.clone()
    cuda = base
    for step in range(3):
        grads = [torch.randn(n + 1, device="cuda").to(torch.bfloat16)[1:] for n in (100003, 1025)]
        ref.step(reference.pilot_step, grads, cfg, 0.1)
        cuda.step(fused_cuda.pilot_step, grads, cfg, 0.1)
        torch.cuda.synchronize()
        assert_same(cuda, ref, f"unaligned step {step}")


def test_channels_last(fused_cuda):
    cfg = CONFIGS["momentum"]
    make = lambda x: x.reshape(8, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    ref = Group([8 * 16 * 3 * 3] * 3, torch.float16, cfg["momentum"], seed=5, make=make)
    for name in ("xs", "ms", "ws", "bms", "bws"):
        setattr(ref, name, [t.contiguous(memory_format=torch.channels_last) for t in getattr(ref, name)])
    assert not ref.ms[0].is_contiguous() and ref.ms[0].is_contiguous(memory_format=torch.channels_last)
    cuda = ref.clone()
    for step in range(3):
        grads = [torch.randn_like(x) for x in ref.xs]
        ref.step(reference.pilot_step, grads, cfg, 0.1)
        cuda.step(fused_cuda.pilot_step, grads, cfg, 0.1)
        torch.cuda.synchronize()
        assert_same(cuda, ref, f"channels_last step {step}")


def test_empty_lists_and_tensors(fused_cuda):
    l1 = torch.full((2,), 5.0, device="cuda")
    fused_cuda.pilot_step([], [], [], [], None, None, [], lr=0.1, **{**CONFIGS["sgd"]},
                          l1_accum=l1[0], l1_clear=l1[1])
    assert l1.tolist() == [5.0, 0.0]
    cfg = CONFIGS["momentum"]
    ref = Group([0, 5, 0], torch.float32, cfg["momentum"], seed=6)
    cuda = ref.clone()
    grads = make_grads(ref, torch.float32, seed=7)
    ref.step(reference.pilot_step, grads, cfg, 0.1)
    cuda.step(fused_cuda.pilot_step, grads, cfg, 0.1)
    assert_same(cuda, ref, "empty tensors")


def test_same_l1_slot_clears_then_adds(fused_cuda):
    cfg = CONFIGS["sgd"]
    g = Group([1000], torch.float32, 0.0, seed=8)
    l1 = torch.full((), 123.0, device="cuda")
    fused_cuda.pilot_step(g.xs, make_grads(g, torch.float32, 9), g.ms, g.ws, None, None, [True],
                          lr=0.1, **cfg, l1_accum=l1, l1_clear=l1)
    torch.testing.assert_close(l1, (g.ms[0] * g.ws[0]).abs().sum(), rtol=1e-5, atol=1e-4)


def test_optimizer_cuda_backend_matches_reference(fused_cuda):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5)).cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(37, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5)).cuda()
    twin.load_state_dict(model.state_dict())
    kw = dict(lr=0.05, momentum=0.9, alpha=1e-3, weight_decay=1e-4)
    opt_c = PILoT(model.parameters(), backend="cuda", **kw)
    opt_r = PILoT(twin.parameters(), backend="reference", **kw)
    data = torch.randn(64, 37, device="cuda")
    target = torch.randint(0, 5, (64,), device="cuda")
    for _ in range(STEPS):
        opt_c.zero_grad()
        torch.nn.functional.cross_entropy(model(data), target).backward()
        for a, b in zip(model.parameters(), twin.parameters()):
            b.grad = a.grad.clone()  # the same gradients: only the optimizers differ
        opt_c.step()
        opt_r.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)
        torch.testing.assert_close(opt_c.l1_norm(), opt_r.l1_norm(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_what_the_kernel_cannot_walk_takes_the_reference(fused_cuda, dtype):
    """The same layout contract as the Triton backend: a strided view, a state tensor
    laid out unlike its parameter, or an fp32 gradient on a 16-bit parameter are stepped
    by the reference in the same call (never refused, never misread); the rest by the
    kernel."""
    cfg = CONFIGS["momentum"]
    ref = Group([(33, 31), (16, 8), 1025, (7, 5)], dtype, cfg["momentum"], seed=21)
    ref.xs[0] = torch.zeros(33, 62, device="cuda", dtype=dtype)[:, ::2].copy_(ref.xs[0])  # strided x
    for name in ("ms", "bws"):                                                        # transposed state
        getattr(ref, name)[1] = getattr(ref, name)[1].t().contiguous().t()
    cuda = ref.clone()
    cuda.xs[0] = torch.zeros(33, 62, device="cuda", dtype=dtype)[:, ::2].copy_(ref.xs[0])
    for name in ("ms", "bws"):
        getattr(cuda, name)[1] = getattr(ref, name)[1].clone().t().contiguous().t()
    for step in range(3):
        grads = make_grads(ref, dtype, seed=2100 + step)
        if dtype != torch.float32:
            grads[3] = torch.randn(7, 5, device="cuda")                           # fp32 gradient
        ref.step(reference.pilot_step, grads, cfg, 0.1)
        cuda.step(fused_cuda.pilot_step, [g.clone() for g in grads], cfg, 0.1)
        torch.cuda.synchronize()
        assert_same(cuda, ref, f"fallback/{dtype} step {step}")


# ---------------------------------------------------------------- capturable mode
def test_lr_and_alpha_as_device_tensors(fused_cuda):
    cfg = {k: v for k, v in CONFIGS["wd_maximize"].items() if k != "alpha"}
    lr = torch.tensor(0.1, device="cuda")
    alpha = torch.tensor(2e-3, device="cuda")
    ref = Group(SIZES, torch.float16, cfg["momentum"], seed=13)
    cuda = ref.clone()
    for step in range(STEPS):
        lr.fill_(0.1 / (1 + step))
        alpha.fill_(2e-3 * (1 + step))
        grads = make_grads(ref, torch.float16, seed=1300 + step)
        ref.step(reference.pilot_step, grads, {**cfg, "alpha": alpha}, lr)
        cuda.step(fused_cuda.pilot_step, grads, {**cfg, "alpha": alpha}, lr)
        torch.cuda.synchronize()
        assert_same(cuda, ref, f"device lr/alpha step {step}")


def test_workspace_caches_the_table(fused_cuda):
    cfg = CONFIGS["momentum"]
    g = Group([1025, 7, 64], torch.float32, cfg["momentum"], seed=14)
    grads = make_grads(g, torch.float32, 15)
    ws: dict = {}
    call = lambda first, gr: fused_cuda.pilot_step(
        g.xs, gr, g.ms, g.ws, g.bms, g.bws, [first] * 3, lr=0.1, **cfg, workspace=ws)
    call(True, grads)
    first_table = ws["cuda_table"]
    call(False, grads)                      # the first-step flags changed: a new table
    second_table = ws["cuda_table"]
    assert second_table is not first_table
    call(False, grads)                      # nothing changed: no upload
    assert ws["cuda_table"] is second_table
    call(False, [t.clone() for t in grads])  # gradients moved: a new table
    assert ws["cuda_table"] is not second_table


def test_cuda_graph_capture_and_replay(fused_cuda):
    cfg = {k: v for k, v in CONFIGS["nesterov"].items() if k != "alpha"}
    lr = torch.tensor(0.1, device="cuda")
    alpha = torch.tensor(1e-3, device="cuda")
    ref = Group(SIZES[:8], torch.bfloat16, cfg["momentum"], seed=16)
    cuda = ref.clone()
    ref.l1 = torch.zeros((), device="cuda")
    cuda.l1 = torch.zeros((), device="cuda")
    grads = make_grads(ref, torch.bfloat16, seed=17)  # static inputs of the graph
    n = len(ref.xs)
    workspace: dict = {}

    def run(group, step_fn, first, **extra):
        group.l1.zero_()
        step_fn(group.xs, grads, group.ms, group.ws, group.bms, group.bws, [first] * n,
                lr=lr, alpha=alpha, **cfg, l1_accum=group.l1, l1_clear=None, **extra)

    # Without a warmed-up workspace the table would be uploaded during capture: refused.
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError) as info:
        with torch.cuda.graph(graph):
            run(cuda, fused_cuda.pilot_step, False, workspace={})
    assert any("warm-up" in str(e) for e in (info.value, info.value.__context__)), info.value
    for a, b in zip(cuda.ms, ref.ms):
        assert torch.equal(a, b), "a refused capture must not change anything"

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the first step, then one with the final flags
        for first in (True, False):
            run(cuda, fused_cuda.pilot_step, first, workspace=workspace)
    torch.cuda.current_stream().wait_stream(side)
    for first in (True, False):
        run(ref, reference.pilot_step, first)
    torch.cuda.synchronize()
    assert_same(cuda, ref, "warm-up")

    table = workspace["cuda_table"]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(cuda, fused_cuda.pilot_step, False, workspace=workspace)
    assert workspace["cuda_table"] is table, "the capture must reuse the cached table"
    for k in range(4):
        lr.fill_(0.1 / (k + 2))       # read on the device at every replay
        alpha.fill_(1e-3 * (k + 2))
        graph.replay()
        run(ref, reference.pilot_step, False)
        torch.cuda.synchronize()
        assert_same(cuda, ref, f"replay {k}")


# ---------------------------------------------------------------- preconditions
def _args(n=3, dtype=torch.float32, momentum=True):
    g = Group([16] * n, dtype, 0.9 if momentum else 0.0, seed=10)
    grads = make_grads(g, dtype, 11)
    return g, grads


def _call(fused_cuda, xs, grads, ms, ws, bms, bws, firsts, momentum=0.9, **kw):
    cfg = {**CONFIGS["momentum"], "momentum": momentum, **kw}
    fused_cuda.pilot_step(xs, grads, ms, ws, bms, bws, firsts, lr=0.1, **cfg)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a["grads"].__setitem__(1, a["grads"][1].double()), "float32, bfloat16 or float16"),
        (lambda a: a["ms"].__setitem__(0, a["ms"][0].double()), "float32"),
        (lambda a: a["ws"].__setitem__(2, a["ws"][2][:8]), "shape"),
        (lambda a: a["grads"].__setitem__(0, a["grads"][0].cpu()), "CUDA tensors"),
        (lambda a: a["firsts"].pop(), "same length"),
        (lambda a: a["bms"].pop(), "one buffer per parameter"),
        (lambda a: a.__setitem__("bms", None), "None"),
        (lambda a: a.__setitem__("grad_scale", torch.ones(2, device="cuda")), "exactly one"),
        (lambda a: a.__setitem__("found_inf", torch.zeros(1, device="cuda", dtype=torch.float16)), "float32"),
        (lambda a: a.__setitem__("found_inf", torch.zeros(1)), "found_inf is on cpu"),
        (lambda a: a["xs"].__setitem__(1, a["xs"][1].double()), "call once per dtype"),
    ],
)
def test_preconditions_raise_before_any_write(fused_cuda, mutate, match):
    g, grads = _args()
    a = dict(xs=list(g.xs), grads=list(grads), ms=list(g.ms), ws=list(g.ws), bms=list(g.bms),
             bws=list(g.bws), firsts=[True] * 3)
    mutate(a)
    snapshot = [t.clone() for t in g.xs + g.ms + g.ws]
    with pytest.raises(RuntimeError, match=match):
        _call(fused_cuda, a["xs"], a["grads"], a["ms"], a["ws"], a["bms"], a["bws"], a["firsts"],
              grad_scale=a.get("grad_scale"), found_inf=a.get("found_inf"))
    for t, s in zip(g.xs + g.ms + g.ws, snapshot):
        assert torch.equal(t, s)


def test_momentum_lists_only_with_momentum(fused_cuda):
    g, grads = _args(momentum=False)
    with pytest.raises(RuntimeError, match="momentum is 0"):
        _call(fused_cuda, g.xs, grads, g.ms, g.ws, g.bms, g.bws, [True] * 3, momentum=0.0)


def test_unsupported_param_dtype(fused_cuda):
    x = torch.zeros(4, device="cuda", dtype=torch.float64)
    m = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match="float32, bfloat16 and float16"):
        _call(fused_cuda, [x], [x.clone()], [m], [m.clone()], None, None, [True], momentum=0.0)


# ---------------------------------------------------------------- > 2^31 elements
@pytest.mark.slow
def test_tensor_over_2_pow_31_elements(fused_cuda):
    n = 2**31 + 4099  # crosses int32 and ends in a partial vector
    need = n * (2 + 2 + 4 + 4) + (4 << 30)
    free, _total = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    cfg = CONFIGS["alpha_no_momentum"]
    gen = torch.Generator(device="cuda").manual_seed(12)
    m = torch.empty(n, device="cuda").normal_(1.0, 0.1, generator=gen)
    w = torch.empty(n, device="cuda").normal_(0.0, 0.1, generator=gen)
    g = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_(generator=gen)
    x = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    piece = 1 << 28
    for s in range(0, n, piece):
        x[s:s + piece] = (m[s:s + piece] * w[s:s + piece]).to(torch.bfloat16)
    windows = [(0, 4096), (2**31 - 4096, 2**31 + 4096), (n - 5000, n)]
    saved = [tuple(t[a:b].clone() for t in (x, g, m, w)) for a, b in windows]
    l1 = torch.zeros(2, device="cuda")
    fused_cuda.pilot_step([x], [g], [m], [w], None, None, [True], lr=0.1, **cfg,
                          l1_accum=l1[1], l1_clear=l1[0])
    torch.cuda.synchronize()
    for (a, b), (xs, gs, ms, ws) in zip(windows, saved):
        reference.pilot_step([xs], [gs], [ms], [ws], None, None, [True], lr=0.1, **cfg)
        assert torch.equal(m[a:b], ms) and torch.equal(w[a:b], ws) and torch.equal(x[a:b], xs), (a, b)
    expected = sum((m[s:s + piece] * w[s:s + piece]).abs().double().sum() for s in range(0, n, piece))
    torch.testing.assert_close(l1[1].double(), expected, rtol=1e-3, atol=0.0)
    assert l1[0].item() == 0.0
