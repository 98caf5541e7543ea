"""What the benchmarks measure: :mod:`pilot_kernels._measure` (the shape sets, providers,
timer and tables ``python -m pilot_kernels.check`` uses, re-exported here) and, on top,
the instruments only the benchmarks need:

* **Shape sets**: 2,000 small tensors, GPT-2 small, one large 2-D tensor (beside
  ResNet-50's 161 parameter tensors).
* **Host cost** of ``step()`` with every kernel replaced by a no-op
  (:func:`stubbed_kernels`, :func:`host_cost`).
* **Peak temporary memory** of a step (:func:`peak_temporaries`).

It lives beside the scripts that use it (``bench_step.py``, ``bench_training.py``), not in
the package: ``import bench`` with ``benchmarks/`` on the path, as a script there has it.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
from typing import Any, Iterator, Sequence

import torch

from pilot_kernels._measure import (  # noqa: F401  (re-exported for the scripts and tests)
    ALPHA, BETA, GRAD_STD, INIT_STD, LR, MOMENTUM, PROVIDERS, Shapes, Unavailable, build, check_available,
    count_launches, dtype_name, jsonable, measure, naive_parametrize, naive_sgd, native_providers, numel,
    parse_dtype, resnet50_shapes, short_reason, shrink_shapes, summarize, sync, table, time_steps,
)
from pilot_kernels.kernels import BACKENDS, get_step_fn


# ======================================================================= shape sets
def small_shapes(n: int = 2000) -> Shapes:
    """``n`` small tensors, half of them 64×32 weights (split by PILoT) and half 64-element
    biases: the per-tensor overhead dominates (2.1 M elements for n = 2,000)."""
    return [(f"w{i // 2}", (64, 32)) if i % 2 == 0 else (f"b{i // 2}", (64,)) for i in range(n)]


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
    return shapes + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def single_shapes(log2: int) -> Shapes:
    """One 2-D tensor of 2^log2 elements, (2^log2 / 1024) × 1024 (2-D so PILoT splits it)."""
    if log2 < 10:
        raise ValueError(f"single sizes start at 2^10 elements, got 2^{log2}")
    return [("x", (2 ** (log2 - 10), 1024))]


# ======================================================================= host cost
class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)``, ``kernel.run(...)`` and a
    kernel compiled ahead with ``kernel.warmup(...)`` all launch nothing."""

    def __getitem__(self, grid):
        return self

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


def _noop(*args, **kwargs) -> None:
    return None


def _first_arg(tensors, *args, **kwargs):
    """Stub of an out-of-place foreach op: hands its input back, launching nothing."""
    return tensors


# The foreach ops torch's multi-tensor SGD issues (PILoT's tensors that are not split
# take that path outside AMP): in place → nothing, out of place → the input list.
_FOREACH_STUBS = {"_foreach_add_": _noop, "_foreach_mul_": _noop,
                  "_foreach_add": _first_arg, "_foreach_mul": _first_arg, "_foreach_neg": _first_arg}


@contextlib.contextmanager
def stubbed_kernels() -> Iterator[None]:
    """Replace every kernel an optimizer step launches by a no-op, leaving its Python.

    ``torch._fused_sgd_`` (``SGD(fused=True)``, and PILoT's tensors that are not split
    under AMP) and the foreach ops of torch's multi-tensor SGD (PILoT's tensors that are
    not split otherwise) launch nothing; in a backend with Triton kernels those kernels launch nothing (the
    launch plan still runs); in any other backend ``pilot_step`` itself is the kernel.
    Build the optimizer inside the context: one that holds the step function from its
    construction then holds the stub.
    """
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:  # no Triton on this platform: no Triton kernels to stub
        KernelInterface = ()  # noqa: N806
    patches: list[tuple[Any, str, Any]] = [(torch, "_fused_sgd_", _noop)]
    patches += [(torch, name, stub) for name, stub in _FOREACH_STUBS.items()]
    for name in BACKENDS:
        try:
            module = sys.modules[get_step_fn(name).__module__]
        except Exception:  # a backend that cannot even be imported here stubs nothing
            continue
        kernels = [a for a, v in vars(module).items() if KernelInterface and isinstance(v, KernelInterface)]
        patches += [(module, a, _NoLaunch()) for a in kernels] if kernels else [(module, "pilot_step", _noop)]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    try:
        for obj, attr, new in patches:
            setattr(obj, attr, new)
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


def host_cost(providers: Sequence[str], shapes: Shapes, device: torch.device, *, rounds: int,
              momentum: float = MOMENTUM, seed: int = 0) -> dict[str, dict]:
    """Host time of ``step()`` in µs with kernels stubbed (:func:`stubbed_kernels`),
    providers interleaved as in :func:`time_steps`; a provider that cannot run here gets
    ``{"status": "unavailable: …"}``."""
    out: dict[str, dict] = {}
    with stubbed_kernels():
        steps = {}
        for p in providers:
            try:
                steps[p] = build(p, shapes, torch.float32, device, momentum=momentum, seed=seed)
            except Unavailable as e:
                out[p] = {"status": f"unavailable: {e}"}
        if steps:
            times = time_steps({p: b.step for p, b in steps.items()}, torch.device("cpu"),
                               rounds=rounds, warmup=2)
            sync(device)
            for p, t in times.items():
                out[p] = {"status": "ok", **{k: (v * 1e3 if k != "n" else v) for k, v in t.items()}}
        del steps
    gc.collect()
    return {p: out[p] for p in providers}


# ======================================================================= temporaries
def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _peak_temporaries_here(provider: str, log2: int, dtype: torch.dtype, device: torch.device,
                           momentum: float) -> dict[str, Any]:
    """Peak memory above the resident set during one (not the first) step, in this process."""
    n = 2 ** log2
    built = build(provider, single_shapes(log2), dtype, device, momentum=momentum)
    built.step()  # the first step allocates momentum buffers: state, not temporaries
    built.step()
    sync(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        built.step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        how = "torch.cuda.max_memory_allocated"
    else:
        before = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set, to the current one
        built.step()
        peak = _proc_status_bytes("VmHWM") - before
        how = "VmHWM - VmRSS (fresh process, allocations >= 64 KiB mmapped)"
    return {"status": "ok", "numel": n, "peak_bytes": max(0, peak), "bytes_per_element": max(0, peak) / n,
            "method": how}


def peak_temporaries(provider: str, log2: int, dtype: torch.dtype, device: torch.device, *,
                     momentum: float = MOMENTUM, timeout: float = 600) -> dict[str, Any]:
    """Peak memory a step allocates above what it holds, for one tensor of 2^log2 elements.

    CUDA: ``torch.cuda.max_memory_allocated`` around the step.  CPU: in a fresh Python
    process (so no other provider's freed memory is reused) with every allocation of
    64 KiB or more mapped afresh, the peak resident set during the step (``VmHWM``,
    reset through ``/proc/self/clear_refs``) minus the resident set before it; Linux
    with glibc only.
    """
    n = 2 ** log2
    try:
        check_available(provider, device)
        if device.type == "cuda":
            try:
                return _peak_temporaries_here(provider, log2, dtype, device, momentum)
            finally:
                gc.collect()
                torch.cuda.empty_cache()
        if not os.path.exists("/proc/self/clear_refs"):
            raise Unavailable("the CPU measurement reads /proc/self/status (Linux only)")
        code = ("import json, torch, bench; "
                f"print(json.dumps(bench._peak_temporaries_here({provider!r}, {log2}, "
                f"torch.{dtype_name(dtype)}, torch.device('cpu'), {momentum!r})))")
        # Every allocation of 64 KiB or more straight from mmap and back to the system when
        # freed (glibc's threshold otherwise grows up to 32 MiB): a temporary then always
        # shows in the resident set, whatever the size measured.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10),
               "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                           os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"status": f"error: {tail[:200]}", "numel": n}
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Unavailable as e:
        return {"status": f"unavailable: {e}", "numel": n}
    except (subprocess.TimeoutExpired, OSError, torch.cuda.OutOfMemoryError) as e:
        return {"status": f"error: {short_reason(e)}", "numel": n}


