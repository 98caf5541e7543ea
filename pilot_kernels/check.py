"""``python -m pilot_kernels.check``: does PILoT run right, and fast, on this machine?

Like ``python -m torch.utils.collect_env``, it prints what a bug report needs, and then:

1. **Correctness.**  For every backend that runs here, three steps on ResNet-50's
   parameter shapes in float32, bfloat16 and float16 (momentum, weight decay, α, fresh
   gradients each step and a pruning-style write into x that the step must adopt),
   against the plain-torch reference: every parameter and every state tensor, as the
   largest distance in units in the last place (0 = bitwise equal, which every backend
   promises and the default ``--max-ulps 0`` demands).
2. **Speed.**  On float32 ResNet-50 (:mod:`pilot_kernels._measure`): time per step, GB/s
   over the analytic bytes and as a % of a ``copy_`` of the same elements measured in
   the same run, launches per step (``torch.profiler``), next to
   ``SGD(momentum=0.9, fused=True)``, SGD foreach and the naive parametrization.

On a machine without CUDA the GPU backends are reported as needing a GPU; the Triton
kernel is still checked for correctness in Triton's CPU interpreter (when
``TRITON_INTERPRET=1`` is set before the start) on ResNet-50's shapes shrunk 32×.

    python -m pilot_kernels.check                 # table on stdout
    python -m pilot_kernels.check --json check.json
    TRITON_INTERPRET=1 python -m pilot_kernels.check --device cpu --quick

The exit status is 1 when a backend differs from the reference by more than
``--max-ulps``, else 0.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from . import __version__
from . import _measure as bench
from .init import split
from .kernels import BACKENDS, StepExtras, StepHparams, StepTensors, resolve_backend, run_step

STEPS = 3
# Hyperparameters of the correctness run: large enough that every term of the update
# changes the low bits of every element.
OPTIONS = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, alpha=1e-3)
BETA = 1.0

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
         torch.float64: torch.int64}

SPEED_TABLE = (
    ("provider", "provider", ""), ("time_min_ms", "min ms", ".3f"), ("time_ms", "median ms", ".3f"),
    ("gbps", "GB/s", ".1f"), ("pct_copy", "%copy", ".1f"), ("launches", "launches", "d"),
)
CORRECTNESS_TABLE = (
    ("backend", "backend", ""), ("device", "device", ""), ("dtype", "dtype", ""), ("verdict", "verdict", ""),
    ("worst", "worst tensor", ""), ("max_ulps", "max ulps", "d"),
)


# ======================================================================= ulps
def _ordered(t: Tensor) -> Tensor:
    """Float bits as int64 keys whose order is the floats' order (−0 and +0 both 0)."""
    bits = t.contiguous().view(_BITS[t.dtype]).to(torch.int64)
    magnitude = bits & ((1 << (8 * t.element_size() - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def ulp_distance(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise distance between two float tensors of one dtype in units in the last
    place: how many representable numbers lie between them, plus one (0 when equal, so
    ``+0`` and ``−0`` are 0 apart).  Two NaNs are 0 apart; a NaN and a number are as far
    apart as int64 allows."""
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"need one dtype and shape, got {a.dtype}{tuple(a.shape)} and {b.dtype}{tuple(b.shape)}")
    if a.dtype not in _BITS:
        raise ValueError(f"ulp_distance takes {sorted(map(str, _BITS))}, got {a.dtype}")
    d = (_ordered(a) - _ordered(b)).abs()
    na, nb = a.isnan(), b.isnan()
    d = torch.where(na & nb, 0, d)
    return torch.where(na ^ nb, torch.iinfo(torch.int64).max, d)


def max_ulps(a: Tensor, b: Tensor) -> int:
    return int(ulp_distance(a, b).max()) if a.numel() else 0


# ======================================================================= environment
def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """The versions and the device a bug report needs (``benchmarks/envinfo.py`` records
    more: git commit, hostname, driver)."""
    env: dict[str, Any] = {
        "pilot_kernels": __version__, "torch": torch.__version__, "triton": _version("triton"),
        "torchvision": _version("torchvision"), "python": platform.python_version(),
        "platform": platform.platform(), "device_type": device.type, "cuda_runtime": torch.version.cuda,
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device.index if device.index is not None else torch.cuda.current_device())
        env.update(device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, device_memory_gib=round(props.total_memory / 2**30, 2))
    else:
        env.update(device_name=platform.processor() or platform.machine())
    return env


# ======================================================================= correctness
def compare_with_reference(backend: str, shapes: bench.Shapes, dtype: torch.dtype, device: torch.device,
                           *, steps: int = STEPS, seed: int = 0) -> dict[str, Any]:
    """``steps`` steps of ``backend`` and of the reference (:func:`run_step`) from the same
    split tensors and gradients, with a pruning-style write into every x (every third
    element zeroed through ``.data``) before the second step, which both must adopt; the
    largest ulp distance over x, m, w and both momentum buffers, and where."""
    xs, _ = bench.make_tensors(shapes, dtype, device, seed)
    factors = [split(x, BETA) for x in xs]
    h = StepHparams(lr=OPTIONS["lr"], momentum=OPTIONS["momentum"], dampening=0.0, nesterov=False,
                    alpha=OPTIONS["alpha"], beta=BETA, weight_decay=OPTIONS["weight_decay"],
                    maximize=False, adopt_writes=True)
    runs = []
    for b in ("reference", backend):
        state = {"x": [(m * w).to(dtype) for m, w in factors], "m": [m.clone() for m, _ in factors],
                 "w": [w.clone() for _, w in factors], "momentum_m": [torch.zeros_like(m) for m, _ in factors],
                 "momentum_w": [torch.zeros_like(m) for m, _ in factors]}
        workspace: dict = {}
        for step in range(steps):
            if step == 1:
                for x in state["x"]:
                    x.data.view(-1)[::3] = 0
            _, grads = bench.make_tensors(shapes, dtype, device, seed + 1 + step)
            t = StepTensors(state["x"], grads, state["m"], state["w"], state["momentum_m"],
                            state["momentum_w"], [step == 0] * len(xs))
            run_step(b, t, h, StepExtras(), workspace)
        runs.append(state)
    bench.sync(device)
    worst, where = 0, "-"
    for key in runs[0]:
        for (name, _), a, b in zip(shapes, runs[0][key], runs[1][key]):
            u = max_ulps(a, b.to(a.device))
            if u > worst:
                worst, where = u, f"{name}:{key}"
    return {"max_ulps": worst, "worst": where}


# ======================================================================= CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pilot_kernels.check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--quick", action="store_true", help="ResNet-50's shapes shrunk 32x, few repetitions")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {BACKENDS} (default: all)")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="correctness dtypes (comma list)")
    ap.add_argument("--max-ulps", type=int, default=0,
                    help="largest ulp distance that passes (default 0: every backend promises bitwise equality)")
    ap.add_argument("--rounds", type=int, default=None, help="CPU interleaved timing rounds (default 10; 3 quick)")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backends:
        if b not in BACKENDS:
            ap.error(f"unknown backend {b!r}; choose from {BACKENDS}")
    try:
        args.dtypes = [bench.parse_dtype(d.strip()) for d in args.dtypes.split(",") if d.strip()]
    except ValueError as e:
        ap.error(str(e))
    if args.rounds is None:
        args.rounds = 3 if args.quick else 10
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = args.device
    env = environment(device)
    print(f"pilot_kernels {env['pilot_kernels']}  torch {env['torch']}  triton {env['triton']}  "
          f"torchvision {env['torchvision']}  python {env['python']}")
    if device.type == "cuda":
        print(f"device: {env['device_name']}, compute capability {env['compute_capability']}, "
              f"{env['sm_count']} SMs, {env['device_memory_gib']} GiB, CUDA {env['cuda_runtime']}")
    else:
        print(f"device: {env['device_name']} ({env['cpu_count']} CPUs); "
              f"CUDA available: {torch.cuda.is_available()}")
    full = bench.resnet50_shapes()
    shrunk = bench.shrink_shapes(full, 32)

    # ---------------------------------------------------------------- backends
    # Each backend is checked on the device, or else on the CPU (the cpu backend on a GPU
    # machine); a backend that runs on neither is reported with the reason.
    backends: dict[str, dict[str, Any]] = {}
    for b in args.backends:
        for where in dict.fromkeys([device, torch.device("cpu")]):
            try:
                bench.check_available(b, where)
            except bench.Unavailable as e:
                reason = e
                continue
            interpreted = b == "triton" and where.type != "cuda"
            backends[b] = {"status": "ok", "device": str(where), "interpreted": interpreted,
                           "shapes": "resnet50/32" if interpreted or args.quick else "resnet50"}
            break
        else:
            backends[b] = {"status": f"needs a GPU: {reason}" if "CUDA" in str(reason) else f"unavailable: {reason}"}
    print(f"backend='auto' picks {resolve_backend('auto', device)!r} here")

    # ---------------------------------------------------------------- correctness
    correctness = []
    failed = False
    for b, info in backends.items():
        if b == "reference" or info["status"] != "ok":
            continue
        shapes = shrunk if info["shapes"] == "resnet50/32" else full
        for dtype in args.dtypes:
            row = {"backend": b, "device": info["device"], "dtype": bench.dtype_name(dtype), "shapes": info["shapes"]}
            try:
                row.update(compare_with_reference(b, shapes, dtype, torch.device(info["device"])))
                row["verdict"] = ("bitwise" if row["max_ulps"] == 0 else
                                  "ok" if row["max_ulps"] <= args.max_ulps else f"FAIL (> {args.max_ulps} ulps)")
                failed |= row["max_ulps"] > args.max_ulps
            except Exception as e:
                row.update(verdict=f"error: {bench.short_reason(e)}")
                failed = True
            correctness.append(row)
    print(f"\ncorrectness: {STEPS} steps against the reference, parameters and state "
          f"({'ResNet-50 shrunk 32x' if args.quick else 'ResNet-50'}; the Triton interpreter on the shrunk set)")
    print(bench.table(correctness, CORRECTNESS_TABLE) if correctness else "  no backend besides the reference runs here")

    # ---------------------------------------------------------------- speed
    providers = [p for p in bench.native_providers(device) if p in bench.BASELINES or p in args.backends]
    speed_shapes = shrunk if args.quick else full
    speed = bench.measure(providers, speed_shapes, torch.float32, device, rounds=args.rounds,
                          warmup_ms=5 if args.quick else 25, rep_ms=20 if args.quick else 100)
    print(f"\nspeed: one step on float32 ResNet-50{' shrunk 32x' if args.quick else ''} "
          f"({bench.numel(speed_shapes) / 1e6:.2f} M elements, {len(speed_shapes)} tensors)")
    print(bench.table(speed, SPEED_TABLE))

    needs_gpu = [b for b, info in backends.items() if info["status"].startswith("needs a GPU")]
    if needs_gpu:
        print(f"\nneeds a GPU: {', '.join(needs_gpu)} (correctness on CUDA, and every GPU speed figure)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(bench.jsonable({"environment": env, "backends": backends, "correctness": correctness,
                                      "speed": speed, "max_ulps_allowed": args.max_ulps, "passed": not failed}),
                      f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
