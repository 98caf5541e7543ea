"""What ``python -m pilot_kernels.check`` measures with; ``benchmarks/bench.py`` builds on it.

* **Shape sets**: ResNet-50's 161 parameter tensors, and any set shrunk for smoke runs.
* **Providers**: one optimizer step, built fresh on random tensors, for every PILoT
  backend (``pilot_kernels.kernels.BACKENDS``) and for the yardsticks:

  ============== ===================================================================
  torch_foreach  ``torch.optim.SGD(momentum=0.9, foreach=True)`` on dense ``x``
  torch_fused    ``torch.optim.SGD(momentum=0.9, fused=True)`` on dense ``x``
  naive          ``x = m·w`` through ``torch.nn.utils.parametrize`` and SGD(foreach)
                 on ``m, w``: the product in forward, its backward and the SGD step —
                 what the reparameterization costs without PILoT
  copy           ``dst.copy_(src)`` over the same number of elements (8 B/element
                 in fp32): the memory bandwidth the step is held against
  ============== ===================================================================

* **Measurements**: step time (``triton.testing.do_bench`` on CUDA; on the CPU,
  repetitions interleaved across providers so that a busy machine slows all of them
  alike) and launches per step (``torch.profiler``).

Every GB/s figure is the analytic traffic of :mod:`pilot_kernels.kernels.traffic` over
the measured time; the naive provider is charged PILoT's bytes, so its GB/s is the rate
at which it gets PILoT's work done.  Private: not part of the package's API.
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .init import split, splits_by_default
from .kernels import BACKENDS, resolve_backend, traffic

# Hyperparameters of the timed steps.  Small steps on small gradients keep m, w and the
# buffers O(1) however many steps a timer runs (no overflow, no denormals, no zeros).
LR = 1e-4
ALPHA = 1e-6
BETA = 1.0
MOMENTUM = 0.9
INIT_STD = 0.05
GRAD_STD = 1e-3

BASELINES = ("torch_foreach", "torch_fused", "naive", "copy")
PROVIDERS = BACKENDS + BASELINES

Shapes = list[tuple[str, tuple[int, ...]]]


class Unavailable(Exception):
    """A provider that cannot run here (no CUDA, backend not built, ...)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """One line naming an exception, for a ``status`` column."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}") from None


# ======================================================================= statistics
def summarize(samples: Sequence[float]) -> dict[str, float]:
    """``min``, ``p20``, ``median``, ``p80`` (linear interpolation, as numpy) and ``n``."""
    if not samples:
        raise ValueError("no samples")
    if len(samples) == 1:
        v = float(samples[0])
        return {"min": v, "p20": v, "median": v, "p80": v, "n": 1}
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return {"min": float(min(samples)), "p20": deciles[1], "median": float(statistics.median(samples)),
            "p80": deciles[7], "n": len(samples)}


# ======================================================================= shape sets
def resnet50_shapes() -> Shapes:
    """Parameter names and shapes of torchvision's ``resnet50()``, in its order, written
    out so that the check needs no torchvision (161 tensors, 25.6 M elements, 54 of them
    split by PILoT)."""
    def conv_bn(prefix: str, cout: int, cin: int, k: int, conv: str, bn: str) -> Shapes:
        return [(f"{prefix}{conv}.weight", (cout, cin, k, k)),
                (f"{prefix}{bn}.weight", (cout,)), (f"{prefix}{bn}.bias", (cout,))]

    shapes = conv_bn("", 64, 3, 7, "conv1", "bn1")
    cin = 64
    for layer, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for block in range(blocks):
            p = f"layer{layer}.{block}."
            shapes += conv_bn(p, width, cin, 1, "conv1", "bn1") + conv_bn(p, width, width, 3, "conv2", "bn2")
            shapes += conv_bn(p, 4 * width, width, 1, "conv3", "bn3")
            if block == 0:  # the projection shortcut
                shapes += conv_bn(p, 4 * width, cin, 1, "downsample.0", "downsample.1")
            cin = 4 * width
    return shapes + [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]


def shrink_shapes(shapes: Shapes, factor: int) -> Shapes:
    """Divide every dimension >= 8 by ``factor`` (kernel sizes 1, 3, 7 stay): the same
    tensor count and layout at about 1/factor² of the elements, for smoke runs."""
    if factor <= 1:
        return shapes
    return [(n, tuple(max(1, d // factor) if d >= 8 else d for d in s)) for n, s in shapes]


def numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for _, s in shapes)


# ======================================================================= providers
def algorithm(provider: str) -> str:
    """The :mod:`~pilot_kernels.kernels.traffic` algorithm a provider is charged for."""
    if provider in ("torch_foreach", "torch_fused"):
        return "sgd"
    if provider == "copy":
        return "copy"
    return "pilot"


def check_available(provider: str, device: torch.device) -> None:
    """Raise :class:`Unavailable` with the reason when ``provider`` cannot run on ``device``."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    if provider in BACKENDS:
        try:
            resolve_backend(provider, device)
        except ValueError as e:
            raise Unavailable(str(e)) from None


def native_providers(device: torch.device) -> list[str]:
    """The providers worth timing on ``device``: every backend that runs there natively
    (Triton's CPU interpreter is a correctness tool, not a benchmark) and the yardsticks."""
    out = []
    for b in BACKENDS:
        if b == "triton" and device.type != "cuda":
            continue
        try:
            check_available(b, device)
        except Unavailable:
            continue
        out.append(b)
    return out + list(BASELINES)


def make_tensors(shapes: Shapes, dtype: torch.dtype, device: torch.device, seed: int):
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
        return split(x, self.beta)


def naive_parametrize(module: nn.Module, beta: float = BETA) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Reparameterize every ``ndim >= 2`` parameter of ``module`` as ``m · w`` in place.

    Returns ``(factors, others)``: the new ``m``/``w`` parameters and the untouched ones.
    """
    targets = [
        (mod, name, p)
        for mod in module.modules()
        for name, p in list(mod.named_parameters(recurse=False))
        if splits_by_default(p) and not parametrize.is_parametrized(mod, name)
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


@dataclass
class Built:
    """A provider ready to step: ``step()`` performs one step; ``params``/``opt`` are the
    parameters and optimizer (``None`` for ``copy``); ``keep`` holds everything alive."""
    step: Callable[[], None]
    params: list = field(default_factory=list)
    opt: Optional[torch.optim.Optimizer] = None
    keep: list = field(default_factory=list)


def _params_with_grads(shapes: Shapes, dtype, device, seed) -> list[nn.Parameter]:
    xs, grads = make_tensors(shapes, dtype, device, seed)
    params = [nn.Parameter(x) for x in xs]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def build(provider: str, shapes: Shapes, dtype: torch.dtype, device: torch.device, *,
          momentum: float = MOMENTUM, seed: int = 0) -> Built:
    """Fresh tensors and optimizer for ``provider`` (the gradients stay fixed)."""
    check_available(provider, device)
    if provider in BACKENDS:
        from .optimizer import PILoT

        params = _params_with_grads(shapes, dtype, device, seed)
        opt = PILoT(params, lr=LR, momentum=momentum, alpha=ALPHA, beta=BETA, backend=provider)
        return Built(opt.step, params, opt)
    if provider in ("torch_foreach", "torch_fused"):
        params = _params_with_grads(shapes, dtype, device, seed)
        fused = provider == "torch_fused"
        opt = torch.optim.SGD(params, lr=LR, momentum=momentum, foreach=not fused, fused=fused or None)
        return Built(opt.step, params, opt)
    if provider == "copy":
        n = numel(shapes)
        src = torch.randn(n, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        return Built(lambda: dst.copy_(src), keep=[src, dst])
    # naive
    xs, grads = make_tensors(shapes, dtype, device, seed)
    holders = nn.ModuleList()
    for x in xs:
        h = nn.Module()
        h.weight = nn.Parameter(x)
        holders.append(h)
    del xs
    with torch.no_grad():
        factors, others = naive_parametrize(holders)
    rep_holders = [h for h in holders if parametrize.is_parametrized(h)]
    rep_grads = [g for h, g in zip(holders, grads) if parametrize.is_parametrized(h)]
    for h, g in zip(holders, grads):
        if not parametrize.is_parametrized(h):
            h.weight.grad = g  # biases/norms: plain SGD on a fixed gradient
    opt = naive_sgd(factors, others, lr=LR, momentum=momentum, alpha=ALPHA)

    def step() -> None:
        for p in factors:
            p.grad = None
        xs_now = [h.weight for h in rep_holders]  # forward: m·w, cast to x's dtype
        if xs_now:
            torch.autograd.backward(xs_now, rep_grads)  # backward: g·w, g·m
        opt.step()

    return Built(step, factors + others, opt, keep=[holders, rep_grads])


def step_bytes(provider: str, shapes: Shapes, dtype: torch.dtype, momentum: float = MOMENTUM) -> int:
    """Analytic bytes of one step of ``provider`` over ``shapes``."""
    return traffic.step_bytes([s for _, s in shapes], algorithm(provider), dtype, momentum != 0)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def resident_bytes_per_element(provider: str, dtype: torch.dtype) -> int:
    """Rough peak memory per element of a built provider (tensors, state, temporaries of
    the plain-torch paths), to skip a case that cannot fit instead of failing in it."""
    s = dtype.itemsize
    if provider in ("torch_foreach", "torch_fused"):
        return 3 * s
    if provider == "copy":
        return 2 * s
    if provider in ("reference", "naive"):
        return 2 * s + 56  # g, x; m, w, b_m, b_w; the per-tensor temporaries
    return 2 * s + 24      # a fused backend: g, x; state; the split's temporaries


# ======================================================================= timing
def time_steps(steps: dict[str, Callable[[], Any]], device: torch.device, *, rounds: int,
               warmup: int = 1, warmup_ms: float = 25, rep_ms: float = 100) -> dict[str, dict]:
    """Per provider, :func:`summarize` of its step times in ms.

    CUDA: ``triton.testing.do_bench`` per provider (CUDA events; L2 flushed before each
    call).  CPU: ``rounds`` rounds, each timing every provider once with
    ``time.perf_counter`` in a rotated order, so that load from other processes falls on
    all providers alike.
    """
    if device.type == "cuda":
        import triton.testing

        return {name: summarize(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))
                for name, fn in steps.items()}
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            steps[name]()
            samples[name].append(1e3 * (time.perf_counter() - t0))
    return {name: summarize(v) for name, v in samples.items()}


def count_launches(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Profile one call of ``fn`` with ``torch.profiler``.

    CUDA: ``launches`` = device kernels (memcpy/memset counted apart as
    ``device_copies``), ``kernel_us`` = their summed time.  CPU: ``launches`` = aten ops
    dispatched from outside any other aten op.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
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


def measure(providers: Sequence[str], shapes: Shapes, dtype: torch.dtype, device: torch.device, *,
            momentum: float = MOMENTUM, seed: int = 0, rounds: int = 15, warmup_ms: float = 25,
            rep_ms: float = 100, profile: bool = True) -> list[dict[str, Any]]:
    """One row per provider on one shape set: step time (min, p20, median, p80), GB/s
    over the analytic bytes, ``pct_copy`` (that rate over the ``copy`` provider's),
    ``x_foreach`` (the time over ``torch_foreach``'s, median and min) and, with
    ``profile``, launches per step.  A provider that cannot run gets a ``status`` that
    says why.  On CUDA the providers are built and timed one at a time (a large set
    fills the device); on the CPU they are built together and timed in interleaved
    rounds (:func:`time_steps`)."""
    dims = [s for _, s in shapes]
    n = numel(shapes)
    rows: dict[str, dict[str, Any]] = {}
    for p in providers:
        nbytes = step_bytes(p, shapes, dtype, momentum)
        rows[p] = {"provider": p, "n_tensors": len(shapes), "n_reparam": sum(traffic.is_reparameterized(s) for s in dims),
                   "numel": n, "bytes": nbytes, "bytes_per_elem": nbytes / n}

    def ready(p: str) -> Optional[Built]:
        need = n * resident_bytes_per_element(p, dtype) + (256 << 20)
        try:
            if need > 0.9 * free_bytes(device):
                rows[p]["status"] = f"skipped: needs ~{need / 2**30:.1f} GiB"
                return None
            built = build(p, shapes, dtype, device, momentum=momentum, seed=seed)
            built.step()  # the first step allocates momentum buffers and compiles kernels
            sync(device)
            return built
        except Unavailable as e:
            rows[p]["status"] = f"unavailable: {e}"
        except torch.cuda.OutOfMemoryError as e:
            rows[p]["status"] = f"skipped: out of memory ({short_reason(e, 100)})"
        except Exception as e:
            rows[p]["status"] = f"error: {short_reason(e)}"
        return None

    def record(p: str, built: Built, t: dict[str, float]) -> None:
        r = rows[p]
        r.update(status="ok", time_min_ms=t["min"], time_ms=t["median"], time_p20_ms=t["p20"],
                 time_p80_ms=t["p80"], rounds=t["n"], timer="do_bench" if device.type == "cuda" else "perf_counter",
                 gbps=r["bytes"] / t["median"] / 1e6, gbps_best=r["bytes"] / t["min"] / 1e6)
        if profile:
            r.update(count_launches(built.step, device))

    if device.type == "cuda":
        for p in providers:
            built = ready(p)
            if built is not None:
                record(p, built, time_steps({p: built.step}, device, rounds=rounds,
                                            warmup_ms=warmup_ms, rep_ms=rep_ms)[p])
            del built
            gc.collect()
            torch.cuda.empty_cache()
    else:
        everything = {p: b for p in providers if (b := ready(p)) is not None}
        times = time_steps({p: b.step for p, b in everything.items()}, device, rounds=rounds)
        for p, b in everything.items():
            record(p, b, times[p])
        del everything
        gc.collect()

    copy, foreach = rows.get("copy", {}), rows.get("torch_foreach", {})
    for r in rows.values():
        if r.get("status") != "ok":
            continue
        if copy.get("status") == "ok":
            r["pct_copy"] = 100 * r["gbps"] / copy["gbps"]
        if foreach.get("status") == "ok":
            r["x_foreach"] = r["time_ms"] / foreach["time_ms"]
            r["x_foreach_min"] = r["time_min_ms"] / foreach["time_min_ms"]
    return list(rows.values())


# ======================================================================= output
def fmt(v: Any, spec: str, width: int) -> str:
    """``v`` formatted with ``spec`` and right-aligned, or ``-`` when missing."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        return "-".rjust(width)
    return f"{v:{spec}}".rjust(width)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table.  ``columns`` are ``(key, header, format spec)``; the text
    columns (spec ``""``) come first, and a row whose ``status`` is not ``"ok"`` shows
    that status after them instead of numbers."""
    n_text = next((i for i, (_, _, spec) in enumerate(columns) if spec), len(columns))
    body = []
    for r in rows:
        cells = [str(r.get(key, "")) for key, _, _ in columns[:n_text]]
        if r.get("status", "ok") != "ok":
            body.append(cells + [str(r["status"])])
        else:
            body.append(cells + [fmt(r.get(key), spec, 0) for key, _, spec in columns[n_text:]])
    headers = [head for _, head, _ in columns]
    full = [c for c in body if len(c) == len(columns)]
    widths = [max([len(h)] + [len(c[i]) for c in (body if i < n_text else full)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        numbers = len(cells) == len(columns)
        return "  ".join(c.rjust(w) if i >= n_text and numbers else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers)] + [line(c) for c in body])


def jsonable(v: Any) -> Any:
    """``v`` with non-finite floats as ``None`` and torch/path objects as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (torch.dtype, torch.device, os.PathLike)):
        return str(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v
