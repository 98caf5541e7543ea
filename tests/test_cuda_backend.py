"""The CUDA C++ backend against the plain-torch reference, on a GPU, through the
dispatcher (:func:`pilot_kernels.kernels.run_step`).

Both backends step identical copies of the same tensors with the same gradients for
several steps, with writes into x (``.data``) to adopt; m, w, the momentum buffers and x
must agree bit for bit (the kernel does the reference's fp32 operations in the
reference's order, each rounded once).  Only the L1 sum may differ, by its summation
order.  Skipped, and reported as skipped, without a CUDA device.
"""
from __future__ import annotations

import pytest
import torch

from pilot_kernels.kernels import StepExtras, StepTensors
from helpers import (assert_states_equal, clone_state, fresh_state, hparams, random_grads, step,
                     write_every_kind)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Edge sizes around the 4-element vectors and the 4096-element chunks, a large tensor,
# a 2-D one, and many small tensors (one launch covers all of them).
SHAPES = [(n,) for n in (1, 7, 1023, 1025, 4096, 4097, 100003)] + [(33, 31)] + [(n,) for n in (3, 5, 64, 130)] * 10

CONFIGS = {
    "sgd": dict(momentum=0.0, alpha=0.0),
    "momentum": dict(momentum=0.9, alpha=1e-3),
    "nesterov": dict(momentum=0.9, nesterov=True, alpha=1e-3),
    "dampening": dict(momentum=0.875, dampening=0.1, alpha=5e-4),
    "wd_maximize": dict(momentum=0.9, alpha=2e-3, weight_decay=1e-2, maximize=True),
    "no_adoption": dict(momentum=0.9, alpha=1e-3, adopt_writes=False),
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


def _pair(shapes, dtype, h, *, steps=5, grad_dtype=None, extras=None):
    s0 = fresh_state(shapes, dtype, beta=h.beta, momentum=h.momentum != 0, device="cuda")
    out = []
    for backend in ("reference", "cuda"):
        s, gen, wgen, workspace = clone_state(s0), torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), {}
        l1 = torch.zeros((), device="cuda")
        for k in range(steps):
            if k in (1, 3):
                write_every_kind(s["xs"], wgen)
            e = (extras or StepExtras())._replace(l1_accum=l1, l1_clear=l1)
            step(backend, s, random_grads(s, gen, grad_dtype), h, e, workspace)
        out.append((s, l1))
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("beta", [1.0, 0.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference(fused_cuda, dtype, config, beta):
    (ref, l1_ref), (cuda, l1_cuda) = _pair(SHAPES, dtype, hparams(beta=beta, **CONFIGS[config]))
    assert_states_equal(ref, cuda)
    torch.testing.assert_close(l1_cuda, l1_ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_gradients_of_16_bit_parameters(fused_cuda, dtype):
    (ref, _), (cuda, _) = _pair(SHAPES[:9], dtype, hparams(), grad_dtype=torch.float32)
    assert_states_equal(ref, cuda)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_found_inf_changes_nothing_and_a_written_x_stays_written(fused_cuda, dtype):
    s = fresh_state(SHAPES[:9], dtype, device="cuda")
    write_every_kind(s["xs"], torch.Generator().manual_seed(2))
    frozen = clone_state(s)
    skip = StepExtras(grad_scale=torch.tensor(8.0, device="cuda"), found_inf=torch.tensor(1.0, device="cuda"))
    step("cuda", s, random_grads(s, torch.Generator().manual_seed(1)), hparams(), skip, {})
    assert_states_equal(s, frozen)


def test_special_values_are_re_split_like_init_split(fused_cuda):
    specials = torch.tensor([0.0, -0.0, 1e-45, -3e-39, 2.0**61, -(2.0**100), 3.4e38, -3.4e38,
                             2.0**60, 1.0, -1.0, 1e-20, 7.5], device="cuda")
    for beta in (1.0, 0.0):
        s = fresh_state([(specials.numel(),)], device="cuda")
        s["xs"][0].data.copy_(specials)
        ref = clone_state(s)
        zeros = [torch.zeros_like(specials)]
        h = hparams(beta=beta, lr=0.0, alpha=0.0)
        step("cuda", s, zeros, h, workspace={})
        step("reference", ref, zeros, h)
        assert_states_equal(s, ref)


def test_workspace_caches_the_table(fused_cuda):
    s = fresh_state([(1025,), (7,), (64,)], device="cuda")
    grads = random_grads(s, torch.Generator().manual_seed(0))
    workspace: dict = {}
    tables = []
    for gr in (grads, grads, grads, [g.clone() for g in grads]):
        step("cuda", s, gr, hparams(), workspace=workspace)
        tables.append(workspace[("cuda", torch.float32)]["cuda_table"])
    assert tables[1] is not tables[0]   # the first-step flags changed
    assert tables[2] is tables[1]       # nothing changed: no upload
    assert tables[3] is not tables[2]   # gradients moved


def test_cuda_graph_capture_and_replay(fused_cuda):
    lr, alpha = torch.tensor(0.1, device="cuda"), torch.tensor(1e-3, device="cuda")
    h = hparams(lr=lr, alpha=alpha, nesterov=True)
    ref = fresh_state(SHAPES[:8], torch.bfloat16, device="cuda")
    cuda = clone_state(ref)
    grads = random_grads(ref, torch.Generator().manual_seed(17))   # static inputs of the graph
    workspace: dict = {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the first step, then one with the final flags
        for _ in range(2):
            step("cuda", cuda, grads, h, workspace=workspace)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step("reference", ref, grads, h)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step("cuda", cuda, grads, h, workspace=workspace)
    for k in range(4):
        lr.fill_(0.1 / (k + 2))       # read on the device at every replay
        alpha.fill_(1e-3 * (k + 2))
        graph.replay()
        step("reference", ref, grads, h)
        torch.cuda.synchronize()
        assert_states_equal(cuda, ref)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: t.grads.__setitem__(1, t.grads[1].double()), "one gradient dtype"),
        (lambda t: t.ms.__setitem__(0, t.ms[0].double()), "float32"),
        (lambda t: t.ws.__setitem__(2, t.ws[2].view(-1)[:8]), "shape"),
        (lambda t: t.ms.__setitem__(1, t.ms[1].view(4, 4).t()), "strides"),
        (lambda t: t.grads.__setitem__(0, t.grads[0].cpu()), "CUDA tensors"),
        (lambda t: t.firsts.pop(), "same length"),
        (lambda t: t.momentum_ms.pop(), "one buffer per parameter"),
        (lambda t: t.xs.__setitem__(1, t.xs[1].double()), "call once per dtype"),
    ],
)
def test_preconditions_raise_before_any_write(fused_cuda, mutate, match):
    s = fresh_state([(4, 4)] * 3, device="cuda")
    grads = random_grads(s, torch.Generator().manual_seed(0))
    t = StepTensors(list(s["xs"]), grads, list(s["ms"]), list(s["ws"]), list(s["momentum_ms"]),
                    list(s["momentum_ws"]), [True] * 3)
    mutate(t)
    snapshot = clone_state(s)
    with pytest.raises(RuntimeError, match=match):
        fused_cuda.pilot_step(t, hparams(), StepExtras(), {})
    assert_states_equal(s, snapshot)


def test_bad_scalars_and_beta_raise(fused_cuda):
    s = fresh_state([(16,)], device="cuda")
    t = StepTensors(s["xs"], random_grads(s, torch.Generator().manual_seed(0)), s["ms"], s["ws"],
                    s["momentum_ms"], s["momentum_ws"], [True])
    for e, match in ((StepExtras(grad_scale=torch.ones(2, device="cuda")), "exactly one"),
                     (StepExtras(found_inf=torch.zeros(1, device="cuda", dtype=torch.float16)), "float32"),
                     (StepExtras(found_inf=torch.zeros(1)), "found_inf is on cpu")):
        with pytest.raises(RuntimeError, match=match):
            fused_cuda.pilot_step(t, hparams(), e, {})
    with pytest.raises(RuntimeError, match="beta"):
        fused_cuda.pilot_step(t, hparams(beta=2.0**50), StepExtras(), {})
