"""One HAM-AdamW step on GPT-2 small's parameter shapes, side by side:

* ``torch_adamw_fused``   — ``torch.optim.AdamW(fused=True)``: the target's yardstick;
* ``torch_adamw_foreach`` — ``torch.optim.AdamW(foreach=True)``;
* ``ham_adamw``           — :class:`pilot_kernels.HAMAdamW` (one fused pass, ``--backend``);
* ``ham_wrapper``         — :class:`pilot_kernels.HAM` around ``AdamW(fused=True)``;
* ``published``           — the published wrapper's algorithm written as plain torch ops
  (:func:`published_ham_step`: a clone per tensor, NaN checks that each sync the host, a
  masked copy) around ``AdamW(foreach=True)``.

On the CPU the repetitions are interleaved across providers (:func:`bench.time_steps`),
so load from other processes falls on all of them alike; CUDA uses ``do_bench``.  Peak
temporary memory of a ``ham_adamw`` step is measured in a fresh process (VmHWM − VmRSS on
the CPU, ``max_memory_allocated`` on CUDA).  Targets (issue 20): ham_adamw ≤ 1.15×
torch_adamw_fused, ≥ 3× faster than published, temporaries ≤ 1 B/element.

    python benchmarks/bench_ham.py --device cpu --shrink 2     # GPT-2 small at 1/4 of the elements
    python benchmarks/bench_ham.py                             # CUDA, full GPT-2 small
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable

import torch

import bench_utils
import bench
from envinfo import environment
from pilot_kernels import HAM, HAMAdamW
from pilot_kernels.init import splits_by_default

PROVIDERS = ("torch_adamw_fused", "torch_adamw_foreach", "ham_adamw", "ham_wrapper", "published")
COLUMNS = ("shapes", "numel", "n_tensors", "dtype", "provider", "time_min_ms", "time_ms",
           "time_p20_ms", "time_p80_ms", "rounds", "x_fused")
LR, ALPHA, BETA = 1e-3, 200.0, 1e-3


def published_ham_step(base: torch.optim.Optimizer, alpha: float, beta: float) -> None:
    """The published wrapper's algorithm as plain torch ops (our rendering, for timing):
    keep each gradient, run the base step, then per weight tensor clone it, compute the
    mirror factor, check for NaNs on the host and copy the result back where θ ≠ 0."""
    grads = {p: p.grad.clone() for g in base.param_groups for p in g["params"]
             if p.grad is not None and splits_by_default(p)}
    base.step()
    for group in base.param_groups:
        lr = group["lr"]
        for p in group["params"]:
            if p not in grads:
                continue
            theta = p.detach().clone()
            factor = torch.exp((-lr * (alpha * torch.sign(theta) * grads[p] + beta)).clamp(-5, 5))
            if torch.isnan(factor).any():          # host sync
                continue
            new = theta * factor
            if torch.isnan(new).any():             # host sync
                continue
            keep = theta != 0
            p.data[keep] = new[keep]               # masked copy


def _params(shapes, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for _, s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device, dtype))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(device, dtype)
        ps.append(p)
    return ps


def build(provider: str, shapes, dtype, device, seed: int, backend: str) -> Callable[[], None]:
    ps = _params(shapes, dtype, device, seed)
    if provider == "torch_adamw_fused":
        return torch.optim.AdamW(ps, lr=LR, fused=True).step
    if provider == "torch_adamw_foreach":
        return torch.optim.AdamW(ps, lr=LR, foreach=True).step
    if provider == "ham_adamw":
        return HAMAdamW(ps, lr=LR, alpha=ALPHA, beta=BETA, backend=backend).step
    if provider == "ham_wrapper":
        return HAM(torch.optim.AdamW(ps, lr=LR, fused=True), ALPHA, BETA, backend=backend).step
    if provider == "published":
        base = torch.optim.AdamW(ps, lr=LR, foreach=True)
        return lambda: published_ham_step(base, ALPHA, BETA)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def temporaries(log2: int, dtype: torch.dtype, device: torch.device, backend: str) -> dict:
    """Peak bytes above the resident set during one (not the first) ham_adamw step."""
    n = 2 ** log2
    step = build("ham_adamw", bench.single_shapes(log2), dtype, device, 0, backend)
    step()
    step()
    bench.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        bench.sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        before = bench._proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        step()
        peak = bench._proc_status_bytes("VmHWM") - before
    return {"numel": n, "peak_bytes": max(0, peak), "bytes_per_element": max(0, peak) / n}


def _temporaries_in_child(args) -> dict:
    code = ("import json, sys, torch; sys.path.insert(0, 'benchmarks'); import bench_ham; "
            f"print(json.dumps(bench_ham.temporaries({args.temp_log2}, torch.{bench.dtype_name(args.dtype)}, "
            f"torch.device({str(args.device)!r}), {args.backend!r})))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10)}  # temporaries show in VmRSS
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(bench_utils.DEFAULT_RESULTS_DIR.parents[1]))
    if proc.returncode != 0:
        return {"status": "error: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_utils.add_common_args(ap, "ham")
    ap.add_argument("--shrink", type=int, default=1, help="divide GPT-2 small's dimensions by this")
    ap.add_argument("--dtype", default="float32", type=bench.parse_dtype)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--backend", default="auto", help="HAM backend (auto: triton on CUDA, cpu on CPU)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--temp-log2", type=int, default=24)
    args = ap.parse_args(argv)
    bench_utils.resolve_device(ap, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.shrink, args.rounds, args.temp_log2 = max(args.shrink, 16), 2, 16
    shapes = bench.shrink_shapes(bench.gpt2_shapes(), args.shrink)
    providers = bench_utils.parse_list(args.providers)
    steps = {p: build(p, shapes, args.dtype, args.device, args.seed, args.backend) for p in providers}
    times = bench.time_steps(steps, args.device, rounds=args.rounds)
    fused = times.get("torch_adamw_fused", {}).get("median")
    rows = []
    for p in providers:
        t = times[p]
        rows.append(dict(shapes=f"gpt2/{args.shrink}", numel=bench.numel(shapes), n_tensors=len(shapes),
                         dtype=bench.dtype_name(args.dtype), provider=p, time_min_ms=t["min"],
                         time_ms=t["median"], time_p20_ms=t["p20"], time_p80_ms=t["p80"], rounds=t["n"],
                         x_fused=None if fused is None else t["median"] / fused))
    temp = _temporaries_in_child(args)
    med = {r["provider"]: r["time_ms"] for r in rows}
    checks = []
    if "ham_adamw" in med and fused:
        checks.append(bench_utils.target("ham_adamw <= 1.15x AdamW(fused=True)", f"gpt2/{args.shrink}",
                                         med["ham_adamw"] / fused, 1.15, at_most=True))
    if "ham_adamw" in med and "published" in med:
        checks.append(bench_utils.target("ham_adamw >= 3x faster than published", f"gpt2/{args.shrink}",
                                         med["published"] / med["ham_adamw"], 3.0, at_most=False))
    if "bytes_per_element" in temp:
        checks.append(bench_utils.target("temporaries <= 1 B/element", f"2^{args.temp_log2}",
                                         temp["bytes_per_element"], 1.0, at_most=True))
    env = environment(args.device)
    print(bench.table(rows, (("provider", "provider", ""), ("time_min_ms", "min ms", ".1f"),
                             ("time_ms", "median ms", ".1f"), ("x_fused", "x fused", ".2f"))))
    print(f"# temporaries: {temp}")
    targets = {"checks": checks}
    bench_utils.print_targets(targets)
    stem = args.name or bench_utils.results_stem("ham", env, args.quick)
    paths = bench_utils.write_results(args.out, stem, rows, env=env, args=args, columns=COLUMNS,
                                      extra={"targets": targets, "temporaries": temp})
    print(f"# wrote {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
