"""Microbenchmark of one optimizer step: PILoT's backends against the naive
reparameterization and against dense fused SGD (the bytes yardstick).

Providers
  naive        the model reparameterized with ``torch.nn.utils.parametrize`` (x = m·w)
               and ``torch.optim.SGD(foreach=True)`` on m and w: one "step" is the
               product in forward, its backward and the SGD step — what the
               reparameterization really costs.
  reference    ``PILoT(..., backend="reference")`` (plain torch, per tensor).
  triton       ``PILoT(..., backend="triton")`` (one fused launch; on the CPU only when
               ``TRITON_INTERPRET=1`` was set before the run started).
  cuda         ``PILoT(..., backend="cuda")`` (the CUDA C++ twin; marked unavailable,
               with the reason, when it cannot be imported or run).
  torch_fused  ``torch.optim.SGD(fused=True)`` on dense x.

Shape sets
  single       one 2-D tensor of 2^k elements ((2^k/1024) × 1024), k = --min-log2 ..
               --max-log2 (skipped where memory does not allow).
  resnet50     the 161 parameter tensors of ``torchvision.models.resnet50()`` (meta device).
  gpt2         GPT-2 small: embeddings 50257×768 and 1024×768, 12 × (qkv 768×2304, proj
               768×768, mlp 768×3072 and 3072×768, LN and bias vectors), final LN.

Per (shape set, size, provider, dtype) one row: median time (``triton.testing.do_bench``
on CUDA, which flushes L2 between calls; a median of ``time.perf_counter`` samples on
the CPU), GB/s over the analytic bytes (``_env.bytes_per_element``: 40 B/element for
fp32 PILoT with momentum, 20 for dense SGD; the naive provider is charged PILoT's
bytes, so its GB/s is the rate at which it gets PILoT's work done), that rate as a % of
the device-to-device copy bandwidth measured in the same run, the host time to issue
one step, and the device kernels per step counted by ``torch.profiler``.

The sweeps are declared as ``triton.testing.Benchmark`` objects, as in the Triton
tutorials, but run by :func:`run_benchmark` below rather than ``perf_report``'s runner:
that one needs pandas, which CI does not have, and keeps only (mean, min, max).

GPU:   python benchmarks/bench_step.py
CPU:   TRITON_INTERPRET=1 python benchmarks/bench_step.py --device cpu --quick --out /tmp/bench
"""
from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

try:  # python -m benchmarks.bench_step
    from . import _env
except ImportError:  # python benchmarks/bench_step.py, or benchmarks/ on sys.path
    import _env

try:
    from triton.testing import Benchmark
except ImportError:  # no Triton on this platform: the same record, for the runner below
    @dataclass
    class Benchmark:  # type: ignore[no-redef]
        x_names: list
        x_vals: list
        line_arg: str
        line_vals: list
        line_names: list
        plot_name: str
        args: dict
        ylabel: str = ""
        x_log: bool = False
        styles: Any = None

PROVIDERS = ("naive", "reference", "triton", "cuda", "torch_fused")
PILOT_BACKENDS = ("reference", "triton", "cuda")
SHAPE_SETS = ("single", "resnet50", "gpt2")

# Hyperparameters of the timed steps.  Small steps on small gradients keep m, w and the
# buffers O(1) however many steps do_bench runs (no overflow, no denormals, no zeros).
LR = 1e-4
ALPHA = 1e-6
BETA = 1.0
INIT_STD = 0.05
GRAD_STD = 1e-3

COLUMNS = (
    "shape_set", "size", "shrink", "n_tensors", "n_reparam", "numel", "provider", "dtype",
    "momentum", "status", "time_ms", "time_p20_ms", "time_p80_ms", "host_us", "bytes",
    "bytes_per_elem", "gbps", "pct_copy", "launches", "launch_counter", "device_copies",
    "kernel_us", "timer",
)


# ======================================================================= shape sets
Shapes = list[tuple[str, tuple[int, ...]]]


def resnet50_shapes() -> Shapes:
    """Parameter shapes of torchvision's ResNet-50, built on the meta device (161 tensors)."""
    import torchvision

    models = torchvision.models
    with torch.device("meta"):
        model = models.resnet50()
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def gpt2_shapes(n_layer: int = 12, d: int = 768, vocab: int = 50257, n_ctx: int = 1024) -> Shapes:
    """GPT-2 small's parameter shapes (148 tensors, 124.4 M elements)."""
    shapes: Shapes = [("wte", (vocab, d)), ("wpe", (n_ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def single_shapes(log2: int) -> Shapes:
    """One 2-D tensor of 2^log2 elements, (2^log2 / 1024) × 1024 (2-D so PILoT splits it)."""
    if log2 < 10:
        raise ValueError(f"single sizes start at 2^10 elements, got 2^{log2}")
    return [("x", (2 ** (log2 - 10), 1024))]


def shrink_shapes(shapes: Shapes, factor: int) -> Shapes:
    """Divide every dimension >= 8 by ``factor`` (kernel sizes 1, 3, 7 stay): the same
    tensor count and layout at about 1/factor² of the elements, for smoke runs."""
    if factor <= 1:
        return shapes
    return [(n, tuple(max(1, d // factor) if d >= 8 else d for d in s)) for n, s in shapes]


# ======================================================================= providers
class Unavailable(Exception):
    """A provider that cannot run here (no CUDA, backend not built, ...)."""


class Skipped(Exception):
    """A case that does not fit in memory."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_tensors(shapes: Shapes, dtype: torch.dtype, device: torch.device, seed: int):
    """Random x (std INIT_STD) and gradients (std GRAD_STD): never zeros."""
    gen = torch.Generator(device=device).manual_seed(seed)
    xs, grads = [], []
    for _, shape in shapes:
        xs.append(torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(INIT_STD))
        grads.append(torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(GRAD_STD))
    return xs, grads


class Product(nn.Module):
    """The naive reparameterization for ``torch.nn.utils.parametrize``: ``x = m · w``.

    The factors are fp32 (as PILoT keeps them) and split from x with ``m² − w² = β``;
    forward returns the product in x's dtype.
    """

    def __init__(self, dtype: torch.dtype, beta: float = BETA) -> None:
        super().__init__()
        self.dtype = dtype
        self.beta = beta

    def forward(self, m: Tensor, w: Tensor) -> Tensor:
        return (m * w).to(self.dtype)

    def right_inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        from pilot_kernels import split

        return split(x, self.beta)


def naive_parametrize(module: nn.Module, beta: float = BETA) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Reparameterize every ``ndim >= 2`` parameter of ``module`` as ``m · w`` in place.

    Returns ``(factors, others)``: the new ``m``/``w`` parameters and the untouched ones.
    """
    targets = [
        (mod, name, p)
        for mod in module.modules()
        for name, p in list(mod.named_parameters(recurse=False))
        if p.ndim >= 2 and not parametrize.is_parametrized(mod, name)
    ]
    for mod, name, p in targets:
        parametrize.register_parametrization(mod, name, Product(p.dtype, beta))
    factors = [p for n, p in module.named_parameters() if ".original0" in n or ".original1" in n]
    ids = {id(p) for p in factors}
    others = [p for p in module.parameters() if id(p) not in ids]
    return factors, others


def naive_sgd(factors, others, *, lr: float, momentum: float, alpha: float) -> torch.optim.SGD:
    """SGD on the factors with PILoT's decay (the gradient of α‖m‖² is 2α·m) and plain
    SGD on the rest, multi-tensor (foreach) as a careful user would write it."""
    return torch.optim.SGD(
        [{"params": factors, "weight_decay": 2 * alpha}, {"params": others, "weight_decay": 0.0}],
        lr=lr, momentum=momentum, foreach=True,
    )


def _check_backend(backend: str, device: torch.device) -> None:
    from pilot_kernels.kernels import triton_interpreting

    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise Unavailable("needs a CUDA device (or TRITON_INTERPRET=1 set before the run)")
    if backend == "cuda":
        if device.type != "cuda":
            raise Unavailable("needs a CUDA device")
        try:
            importlib.import_module("pilot_kernels.kernels.fused_cuda")
        except Exception as e:  # not written yet, not built, wrong toolchain, ...
            raise Unavailable(f"pilot_kernels.kernels.fused_cuda: {_env.short_reason(e)}") from None


def build_provider(provider: str, shapes: Shapes, dtype: torch.dtype, device: torch.device,
                   momentum: float, seed: int) -> tuple[Callable[[], None], list]:
    """Fresh tensors and optimizer for ``provider``; returns ``(step, keepalive)``."""
    if provider in PILOT_BACKENDS:
        _check_backend(provider, device)
        from pilot_kernels import PILoT

        xs, grads = _make_tensors(shapes, dtype, device, seed)
        params = [nn.Parameter(x) for x in xs]
        for p, g in zip(params, grads):
            p.grad = g
        del xs, grads
        opt = PILoT(params, lr=LR, momentum=momentum, alpha=ALPHA, beta=BETA, backend=provider)
        return opt.step, [params, opt]

    if provider == "torch_fused":
        xs, grads = _make_tensors(shapes, dtype, device, seed)
        params = [nn.Parameter(x) for x in xs]
        for p, g in zip(params, grads):
            p.grad = g
        del xs, grads
        opt = torch.optim.SGD(params, lr=LR, momentum=momentum, fused=True)
        return opt.step, [params, opt]

    if provider == "naive":
        xs, grads = _make_tensors(shapes, dtype, device, seed)
        holders = nn.ModuleList()
        for x in xs:
            h = nn.Module()
            h.weight = nn.Parameter(x)
            holders.append(h)
        del xs
        with torch.no_grad():
            factors, others = naive_parametrize(holders)
        rep = [(h, g) for h, g in zip(holders, grads) if parametrize.is_parametrized(h)]
        rep_holders = [h for h, _ in rep]
        rep_grads = [g for _, g in rep]
        for h, g in zip(holders, grads):
            if not parametrize.is_parametrized(h):
                h.weight.grad = g  # biases/norms: plain SGD on a fixed gradient
        del grads
        opt = naive_sgd(factors, others, lr=LR, momentum=momentum, alpha=ALPHA)

        def step() -> None:
            for p in factors:
                p.grad = None
            xs_now = [h.weight for h in rep_holders]  # forward: m·w, cast to x's dtype
            if xs_now:
                torch.autograd.backward(xs_now, rep_grads)  # backward: g·w, g·m
            opt.step()

        return step, [holders, opt, rep_grads]

    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def resident_bytes_per_elem(provider: str, dtype: torch.dtype) -> int:
    """Rough peak device memory per element (tensors, state, temporaries), to skip cases
    that cannot fit instead of running out of memory half-way through a sweep."""
    s = _env._itemsize(dtype)
    return {
        "naive": 2 * s + 48,       # g, x; m, w, b_m, b_w, m.grad, w.grad; product/split temporaries
        "reference": 2 * s + 56,   # g, x; state; per-tensor temporaries of the plain-torch step
        "triton": 2 * s + 40,      # g, x; state; the temporaries of the initial split
        "cuda": 2 * s + 40,
        "torch_fused": 3 * s + 4,  # p, g, buffer
    }[provider]


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


# ======================================================================= measurement
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def time_fn(fn: Callable[[], Any], device: torch.device, args) -> Timing:
    """Median time of ``fn`` in ms: ``triton.testing.do_bench`` (CUDA events, L2 flushed
    before each call) on CUDA; a median of perf_counter samples on the CPU."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms,
                                                quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(p20), float(p80), "do_bench")
    for _ in range(args.cpu_warmup):
        fn()
    samples = []
    for _ in range(args.cpu_reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return Timing(_quantile(samples, 0.5), _quantile(samples, 0.2), _quantile(samples, 0.8), "perf_counter")


def host_time_us(fn: Callable[[], Any], device: torch.device, reps: int) -> Optional[float]:
    """CUDA only: host time to *issue* one step (perf_counter around the call, device idle
    before it, no sync inside), median over ``reps``.  On the CPU it is the step time."""
    if device.type != "cuda" or reps <= 0:
        return None
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize(device)
    samples.sort()
    return _quantile(samples, 0.5)


def count_launches(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Profile one call of ``fn`` with ``torch.profiler``.

    CUDA: ``launches`` = device kernel events (user-annotation ranges, memcpy and memset
    excluded), ``device_copies`` = memcpy/memset events, ``kernel_us`` = summed kernel
    time.  CPU: ``launches`` = aten ops dispatched from outside any other aten op.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    _sync(device)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        dev = [e for e in events
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
               and e.name != "gpu_user_annotation"]
        copies = [e for e in dev if e.name.startswith(("Memcpy", "Memset"))]
        kernels = [e for e in dev if not e.name.startswith(("Memcpy", "Memset"))]
        return {"launches": len(kernels), "device_copies": len(copies), "launch_counter": "cuda_kernels",
                "kernel_us": sum(e.time_range.elapsed_us() for e in kernels)}

    def top_level_aten(e) -> bool:
        if not e.name.startswith("aten::"):
            return False
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    return {"launches": sum(top_level_aten(e) for e in events), "device_copies": None,
            "launch_counter": "cpu_aten_ops", "kernel_us": None}


def copy_bandwidth(device: torch.device, nbytes: int, args) -> dict[str, float]:
    """Device copy bandwidth: ``torch.empty_like(src).copy_(src)``, bytes = 2 × size."""
    src = torch.randn(max(1, nbytes // 4), device=device)
    t = time_fn(lambda: torch.empty_like(src).copy_(src), device, args)
    moved = 2 * src.numel() * src.element_size()
    del src
    return {"buffer_bytes": moved // 2, "bytes_moved": moved, "time_ms": t.median_ms,
            "gbps": moved / (t.median_ms * 1e-3) / 1e9, "timer": t.timer}


# ======================================================================= cases
@dataclass
class Case:
    shape_set: str
    size: str          # "2^20" for single, the set's name otherwise
    shapes: Shapes
    shrink: int

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)


def make_benchmarks(args) -> list[tuple[Benchmark, dict[str, Case]]]:
    """One ``triton.testing.Benchmark`` per (shape set, dtype), x = sizes, lines = providers."""
    benches = []
    for shape_set in args.shapes:
        if shape_set == "single":
            cases = {f"2^{k}": Case("single", f"2^{k}", single_shapes(k), 1)
                     for k in range(args.min_log2, args.max_log2 + 1, args.log2_step)}
        elif shape_set == "resnet50":
            cases = {"resnet50": Case("resnet50", "resnet50", shrink_shapes(resnet50_shapes(), args.shrink), args.shrink)}
        elif shape_set == "gpt2":
            cases = {"gpt2": Case("gpt2", "gpt2", shrink_shapes(gpt2_shapes(), args.shrink), args.shrink)}
        else:
            raise ValueError(f"unknown shape set {shape_set!r}; choose from {SHAPE_SETS}")
        for dtype in args.dtypes:
            bench = Benchmark(
                x_names=["size"],
                x_vals=list(cases),
                x_log=shape_set == "single",
                line_arg="provider",
                line_vals=list(args.providers),
                line_names=list(args.providers),
                ylabel="GB/s",
                plot_name=f"pilot-step-{shape_set}-{_env.dtype_name(dtype)}",
                args={"shape_set": shape_set, "dtype": dtype},
            )
            benches.append((bench, cases))
    return benches


def measure(case: Case, provider: str, dtype: torch.dtype, device: torch.device, args,
            copy_gbps: float) -> dict[str, Any]:
    momentum = args.momentum
    algorithm = "sgd" if provider == "torch_fused" else "pilot"
    shapes = [s for _, s in case.shapes]
    nbytes = _env.step_bytes(shapes, algorithm, dtype, momentum != 0)
    row: dict[str, Any] = {
        "shape_set": case.shape_set, "size": case.size, "shrink": case.shrink,
        "n_tensors": len(shapes), "n_reparam": sum(_env.is_reparameterized(s) for s in shapes),
        "numel": case.numel, "provider": provider, "dtype": _env.dtype_name(dtype),
        "momentum": momentum, "bytes": nbytes, "bytes_per_elem": nbytes / case.numel,
    }
    need = case.numel * resident_bytes_per_elem(provider, dtype) + (256 << 20)
    step = keep = None
    try:
        if need > 0.9 * free_bytes(device):
            raise Skipped(f"needs ~{need / 2**30:.1f} GiB, {free_bytes(device) / 2**30:.1f} GiB free")
        step, keep = build_provider(provider, case.shapes, dtype, device, momentum, args.seed)
        step()  # first step: allocates momentum buffers, compiles kernels
        _sync(device)
        t = time_fn(step, device, args)
        row.update(status="ok", time_ms=t.median_ms, time_p20_ms=t.p20_ms, time_p80_ms=t.p80_ms,
                   timer=t.timer, host_us=host_time_us(step, device, args.host_reps))
        row["gbps"] = nbytes / (t.median_ms * 1e-3) / 1e9
        row["pct_copy"] = 100.0 * row["gbps"] / copy_gbps if copy_gbps else None
        if args.profile:
            try:
                row.update(count_launches(step, device))
            except Exception as e:  # the profiler is a diagnostic; never lose the timing
                print(f"  [profiler failed for {provider}: {_env.short_reason(e)}]", file=sys.stderr)
    except Unavailable as e:
        row["status"] = f"unavailable: {e}"
    except Skipped as e:
        row["status"] = f"skipped: {e}"
    except torch.cuda.OutOfMemoryError as e:
        row["status"] = f"skipped: out of memory ({_env.short_reason(e, 120)})"
    except Exception as e:
        if provider == "cuda":  # the CUDA backend is optional: a failure means unavailable
            row["status"] = f"unavailable: {_env.short_reason(e)}"
        else:
            row["status"] = f"error: {_env.short_reason(e)}"
    finally:
        del step, keep
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_benchmark(bench: Benchmark, cases: dict[str, Case], device: torch.device, args,
                  copy_gbps: float, rows: list[dict[str, Any]]) -> None:
    """The loop of ``triton.testing.Mark._run``: every x value × every line value."""
    dtype = bench.args["dtype"]
    for x in bench.x_vals:
        for provider in bench.line_vals:
            row = measure(cases[x], provider, dtype, device, args, copy_gbps)
            rows.append(row)
            print(format_row(row), flush=True)


# ======================================================================= targets, output
def evaluate_targets(rows: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The issue's targets, checked on this run's rows (CUDA runs only), for the fused
    backends: >= 90% of copy bandwidth at the largest ``single`` size; <= 2.0x the time of
    torch_fused and >= 4x faster than naive at that size and on each model set."""
    if device.type != "cuda":
        return {"status": "owed: no GPU measurement yet (CPU run; targets apply to CUDA runs only)"}
    ok = {(r["shape_set"], r["size"], r["dtype"], r["provider"]): r for r in rows if r["status"] == "ok"}
    checks = []
    largest: dict[str, int] = {}
    for r in ok.values():
        if r["shape_set"] == "single":
            largest[r["dtype"]] = max(largest.get(r["dtype"], 0), r["numel"])
    for (shape_set, size, dtype, provider), r in sorted(ok.items()):
        if provider not in ("triton", "cuda"):
            continue
        if shape_set == "single" and r["numel"] != largest.get(dtype):
            continue
        where = f"{provider} {shape_set} {size} {dtype}"
        if shape_set == "single":  # bandwidth target: one large tensor, no launch overheads
            checks.append({"target": "fused step >= 90% of copy bandwidth", "case": where,
                           "value": r["pct_copy"], "pass": r["pct_copy"] >= 90.0})
        dense = ok.get((shape_set, size, dtype, "torch_fused"))
        if dense:
            ratio = r["time_ms"] / dense["time_ms"]
            checks.append({"target": "time <= 2.0x torch_fused", "case": where, "value": ratio,
                           "pass": ratio <= 2.0})
        naive = ok.get((shape_set, size, dtype, "naive"))
        if naive:
            speedup = naive["time_ms"] / r["time_ms"]
            checks.append({"target": ">= 4x faster than naive", "case": where, "value": speedup,
                           "pass": speedup >= 4.0})
    return {"status": "measured", "checks": checks}


def _fmt(v: Any, spec: str, width: int) -> str:
    return f"{v:{spec}}".rjust(width) if isinstance(v, (int, float)) and v is not None else "-".rjust(width)


def format_row(r: dict[str, Any]) -> str:
    head = f"{r['shape_set']:<9}{r['size']:>9} {r['dtype']:<9}{r['provider']:<12}"
    if r["status"] != "ok":
        return head + r["status"]
    return (head + _fmt(r["time_ms"], ".4f", 11) + " ms" + _fmt(r["gbps"], ".2f", 10) + " GB/s"
            + _fmt(r.get("pct_copy"), ".1f", 7) + "%" + _fmt(r.get("host_us"), ".1f", 9) + " us host"
            + _fmt(r.get("launches"), "d", 6) + f" {r.get('launch_counter') or ''}")


def plot(rows: list[dict[str, Any]], copy_gbps: float, path: Path, title: str) -> Optional[Path]:
    """GB/s vs size for ``single`` (lines per provider and dtype) and bars for the model
    sets, with the copy bandwidth as a reference line.  ``None`` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    single = [r for r in ok if r["shape_set"] == "single"]
    models = [r for r in ok if r["shape_set"] != "single"]
    fig = Figure(figsize=(15, 5.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    for key in sorted({(r["provider"], r["dtype"]) for r in single}):
        pts = sorted((r["numel"], r["gbps"]) for r in single if (r["provider"], r["dtype"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if key[1] == "float32" else "--", label=f"{key[0]} ({key[1]})")
    if copy_gbps:
        ax.axhline(copy_gbps, color="black", linestyle=":", label=f"copy {copy_gbps:.0f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements (one tensor)")
    ax.set_ylabel("GB/s (analytic bytes / median time)")
    ax.set_title("single tensor")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    groups = sorted({(r["shape_set"], r["dtype"]) for r in models})
    provs = [p for p in PROVIDERS if any(r["provider"] == p for r in models)]
    width = 0.8 / max(1, len(provs))
    for j, prov in enumerate(provs):
        vals = []
        for g in groups:
            hit = [r["gbps"] for r in models if (r["shape_set"], r["dtype"], r["provider"]) == (*g, prov)]
            vals.append(hit[0] if hit else 0.0)
        ax.bar([i + j * width for i in range(len(groups))], vals, width, label=prov)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{s}\n{d}" for s, d in groups])
    if copy_gbps:
        ax.axhline(copy_gbps, color="black", linestyle=":")
    ax.set_ylabel("GB/s")
    ax.set_title("model shape sets")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ======================================================================= CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: tiny sizes (k <= 16, model sets shrunk 32x), fp32, few reps")
    ap.add_argument("--shapes", default=",".join(SHAPE_SETS), help=f"comma list of {SHAPE_SETS}")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    ap.add_argument("--dtypes", default=None, help="comma list: float32,bfloat16 (default: both on CUDA, "
                    "float32 on CPU)")
    ap.add_argument("--min-log2", type=int, default=10)
    ap.add_argument("--max-log2", type=int, default=None,
                    help="largest single size 2^k (default 30 on CUDA, 24 on CPU, 16 with --quick); "
                         "sizes that do not fit in memory are skipped")
    ap.add_argument("--log2-step", type=int, default=None, help="step between single sizes k (default 2)")
    ap.add_argument("--shrink", type=int, default=None,
                    help="divide model-set dimensions by this (default 1; 32 with --quick)")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up (ms, CUDA)")
    ap.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition time (ms, CUDA)")
    ap.add_argument("--cpu-warmup", type=int, default=None,
                    help="CPU warm-up calls after the first step (default 2; 0 quick)")
    ap.add_argument("--cpu-reps", type=int, default=None, help="CPU timed calls (default 10; 3 quick)")
    ap.add_argument("--host-reps", type=int, default=20, help="calls for the host-issue time (CUDA)")
    ap.add_argument("--copy-mib", type=int, default=None,
                    help="copy-bandwidth buffer in MiB (default 1024 on CUDA, 64 on CPU, 16 quick)")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip counting launches with torch.profiler")
    ap.add_argument("--no-plot", dest="plot", action="store_false")
    _env.add_output_args(ap, "step")
    args = ap.parse_args(argv)

    _env.resolve_device(ap, args)
    on_gpu = args.device.type == "cuda"
    args.shapes = _env.parse_list(args.shapes)
    args.providers = _env.parse_list(args.providers)
    for p in args.providers:
        if p not in PROVIDERS:
            ap.error(f"unknown provider {p!r}; choose from {PROVIDERS}")
    for s in args.shapes:
        if s not in SHAPE_SETS:
            ap.error(f"unknown shape set {s!r}; choose from {SHAPE_SETS}")
    dtypes = args.dtypes or ("float32,bfloat16" if on_gpu and not args.quick else "float32")
    args.dtypes = [_env.parse_dtype(d) for d in _env.parse_list(dtypes)]
    q = args.quick
    if args.max_log2 is None:
        args.max_log2 = 16 if q else (30 if on_gpu else 24)
    if q and args.max_log2 > 16:
        ap.error("--quick keeps single sizes at k <= 16")
    if args.log2_step is None:
        args.log2_step = 2
    if args.shrink is None:
        args.shrink = 32 if q else 1
    if args.cpu_warmup is None:
        args.cpu_warmup = 0 if q else 2
    if args.cpu_reps is None:
        args.cpu_reps = 3 if q else 10
    if args.copy_mib is None:
        args.copy_mib = 16 if q else (1024 if on_gpu else 64)
    if q and on_gpu:
        args.warmup_ms, args.rep_ms, args.host_reps = min(args.warmup_ms, 5), min(args.rep_ms, 20), min(args.host_reps, 5)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = args.device
    env = _env.environment(device)
    print(f"# bench_step on {env['device_name']} (driver {env['driver']}), torch {env['torch']}, "
          f"triton {env['triton']}, commit {str(env['git_commit'])[:12]}{'+dirty' if env['git_dirty'] else ''}")
    if device.type != "cuda":
        print("# CPU run: a smoke test of the harness, not a measurement of the kernels")

    copy = copy_bandwidth(device, args.copy_mib << 20, args)
    print(f"# copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['buffer_bytes'] >> 20} MiB buffer, "
          f"empty_like(src).copy_(src), bytes = 2 x size)")
    print("# shape_set     size dtype    provider         time         GB/s  %copy     host   launches")

    rows: list[dict[str, Any]] = []
    for bench, cases in make_benchmarks(args):
        run_benchmark(bench, cases, device, args, copy["gbps"], rows)

    targets = evaluate_targets(rows, device)
    stem = args.name or _env.results_stem("step", env, args.quick)
    arg_record = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    arg_record["dtypes"] = [_env.dtype_name(d) for d in args.dtypes]
    extra = {
        "copy_bandwidth": copy,
        "analytic_bytes_per_element": {
            _env.dtype_name(d): {"pilot": _env.bytes_per_element("pilot", d, args.momentum != 0),
                                 "sgd": _env.bytes_per_element("sgd", d, args.momentum != 0)}
            for d in args.dtypes
        },
        "hyperparameters": {"lr": LR, "alpha": ALPHA, "beta": BETA, "momentum": args.momentum,
                            "init_std": INIT_STD, "grad_std": GRAD_STD},
        "targets": targets,
    }
    paths = _env.write_results(args.out, stem, rows, env=env, args=arg_record, columns=COLUMNS, extra=extra)
    if args.plot:
        png = plot(rows, copy["gbps"], Path(args.out) / f"{stem}.png",
                   f"PILoT step — {env['device_name']} — torch {env['torch']}, triton {env['triton']}"
                   + ("  [CPU smoke, not a measurement]" if device.type != "cuda" else ""))
        if png:
            paths["png"] = png
    if targets.get("checks"):
        print("# targets:")
        for c in targets["checks"]:
            print(f"#   {'PASS' if c['pass'] else 'FAIL'} {c['target']:<38} {c['case']:<32} {c['value']:.2f}")
    else:
        print(f"# targets: {targets['status']}")
    print("# wrote " + ", ".join(str(p) for p in paths.values()))
    return {**paths, "rows": rows, "copy_bandwidth": copy, "targets": targets}


if __name__ == "__main__":
    main()
