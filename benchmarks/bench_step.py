"""One optimizer step: every PILoT backend against SGD (foreach and fused), the naive
reparameterization and a ``copy_`` of the same elements.

Providers and shape sets are those of :mod:`bench`; every backend in
``pilot_kernels.kernels.BACKENDS`` that runs on the device is measured (Triton's CPU
interpreter only when ``--providers`` names it).  Shape sets: ``resnet50`` (161 tensors,
25.6 M elements), ``small2000`` (2,000 small tensors), ``gpt2`` (GPT-2 small) and
``single`` (one tensor of 2^k elements for each k in ``--log2``).

Per (shape set, dtype, provider) one row: min and median step time; GB/s over the
analytic bytes (:mod:`pilot_kernels.kernels.traffic`: 40 B/element for fp32 PILoT with
momentum, 20 for SGD, 8 for the copy); ``pct_copy``, that rate as a % of the copy's
measured in the same run; ``x_foreach``, the time over ``torch_foreach``'s; launches per
step (``torch.profiler``).  On the CPU the repetitions are interleaved across providers
(``--rounds``), so the machine's load falls on all of them alike; on CUDA each provider
is timed alone with ``triton.testing.do_bench``.

Then, in the same run:
  * host cost of ``step()`` for ResNet-50's tensors with every kernel replaced by a
    no-op (:func:`bench.stubbed_kernels`), PILoT's backends against
    ``SGD(fused=True)``;
  * peak temporary memory of a step on one tensor of 2^``--temp-log2`` elements.

The targets are evaluated on these rows and written to the JSON with the environment.
The sweeps are plain loops rather than ``triton.testing.perf_report`` benchmarks: a row
holds a dozen measurements, not one line of a plot, and the CPU's interleaved rounds time
all providers together rather than one (x, line) cell at a time.

    python benchmarks/bench_step.py                        # CUDA: all sets, fp32 and bf16
    python benchmarks/bench_step.py --device cpu           # CPU: resnet50 and small2000
    python benchmarks/bench_step.py --shapes single --log2 30    # one 1.07e9-element tensor
    python benchmarks/bench_step.py --device cpu --quick --out /tmp/b   # smoke (CI)
"""
from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import torch

import bench
import bench_utils
from envinfo import environment
from pilot_kernels.kernels import BACKENDS, resolve_backend, traffic

SHAPE_SETS = ("resnet50", "small2000", "gpt2", "single")

COLUMNS = (
    "shape_set", "size", "n_tensors", "n_reparam", "numel", "dtype", "provider", "status",
    "time_min_ms", "time_ms", "time_p20_ms", "time_p80_ms", "rounds", "bytes", "bytes_per_elem",
    "gbps", "gbps_best", "pct_copy", "x_foreach", "x_foreach_min", "launches", "launch_counter",
    "kernel_us", "timer",
)

TABLE = (
    ("shape_set", "set", ""), ("size", "size", ""), ("dtype", "dtype", ""), ("provider", "provider", ""),
    ("time_min_ms", "min ms", ".3f"), ("time_ms", "median ms", ".3f"), ("gbps", "GB/s", ".1f"),
    ("pct_copy", "%copy", ".1f"), ("x_foreach", "x foreach", ".2f"), ("launches", "launches", "d"),
)


def cases(args) -> list[tuple[str, str, bench.Shapes]]:
    """``(shape_set, size label, shapes)`` for every case of the run."""
    out = []
    for s in args.shapes:
        if s == "single":
            out += [("single", f"2^{k}", bench.single_shapes(k)) for k in args.log2]
        else:
            if s == "small2000":  # shrinking divides the count: the tensors are small already
                shapes = bench.small_shapes(2000 // args.shrink)
            else:
                shapes = bench.shrink_shapes({"resnet50": bench.resnet50_shapes, "gpt2": bench.gpt2_shapes}[s](),
                                             args.shrink)
            out.append((s, s if args.shrink == 1 else f"{s}/{args.shrink}", shapes))
    return out


def measure_case(shape_set: str, size: str, shapes: bench.Shapes, dtype: torch.dtype, args) -> list[dict]:
    rows = bench.measure(args.providers, shapes, dtype, args.device, momentum=args.momentum, seed=args.seed,
                         rounds=args.rounds, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, profile=args.profile)
    return [{"shape_set": shape_set, "size": size, "dtype": bench.dtype_name(dtype), **r} for r in rows]


def evaluate_targets(rows: list[dict], host: dict[str, dict], temps: dict[str, dict],
                     device: torch.device) -> dict[str, Any]:
    """The performance targets, checked on this run's measurements.

    CPU, for the backend ``auto`` picks there: the ResNet-50 step within 2.5× of
    SGD(foreach) and at >= 70% of the copy's bandwidth; 2,000 small tensors within 3× of
    SGD(foreach); <= 1 B/element of temporaries.  CUDA, for the fused backends: >= 90%
    of copy bandwidth on the largest single tensor, within 2× of SGD(fused) and >= 4×
    faster than naive on every case, <= 1 B/element of temporaries.  Both: the host cost
    of ``step()`` no more than SGD(fused)'s.
    """
    ok = {(r["shape_set"], r["dtype"], r["provider"]): r for r in rows if r.get("status") == "ok"}
    checks = []
    if device.type == "cuda":
        fused = [b for b in BACKENDS if b != "reference"]
        largest = max((r["numel"] for r in rows if r["shape_set"] == "single"), default=None)
        for (shape_set, dtype, p), r in sorted(ok.items()):
            if p not in fused:
                continue
            case = f"{p} {r['size']} {dtype}"
            if shape_set == "single" and r["numel"] == largest:
                checks.append(bench_utils.target(">= 90% of copy bandwidth", case, r.get("pct_copy"), 90, at_most=False))
            if (dense := ok.get((shape_set, dtype, "torch_fused"))):
                checks.append(bench_utils.target("time <= 2x SGD(fused)", case, r["time_ms"] / dense["time_ms"],
                                                 2.0, at_most=True))
            if (naive := ok.get((shape_set, dtype, "naive"))):
                checks.append(bench_utils.target(">= 4x faster than naive", case, naive["time_ms"] / r["time_ms"],
                                                 4.0, at_most=False))
    else:
        fused = [resolve_backend("auto", device)]
        p = fused[0]
        measured = {r["shape_set"] for r in rows if r["dtype"] == "float32"}
        for shape_set, limit in (("resnet50", 2.5), ("small2000", 3.0)):
            if shape_set in measured:
                r = ok.get((shape_set, "float32", p))
                checks.append(bench_utils.target(f"time <= {limit}x SGD(foreach)", f"{p} {shape_set} float32",
                                                 r and r.get("x_foreach"), limit, at_most=True,
                                                 value_min=r and r.get("x_foreach_min")))
        if "resnet50" in measured:
            r = ok.get(("resnet50", "float32", p))
            checks.append(bench_utils.target(">= 70% of copy bandwidth", f"{p} resnet50 float32",
                                             r and r.get("pct_copy"), 70, at_most=False))
    for p in fused:
        t = temps.get(p, {})
        if t:
            checks.append(bench_utils.target("temporaries <= 1 B/element", f"{p} 2^{t['numel'].bit_length() - 1}",
                                             t.get("bytes_per_element"), 1.0, at_most=True))
    sgd = host.get("torch_fused", {})
    auto = resolve_backend("auto", device)
    for p in [b for b in BACKENDS if b != "reference" or b == auto]:
        h = host.get(p, {})
        if h.get("status") == "ok" and sgd.get("status") == "ok":
            checks.append(bench_utils.target("host cost <= SGD(fused)'s", f"{p} resnet50",
                                             h["median"] / sgd["median"], 1.0, at_most=True,
                                             value_min=h["min"] / sgd["min"]))
    return {"status": "measured", "checks": checks}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_utils.add_common_args(ap, "step")
    ap.add_argument("--shapes", default=None, help=f"comma list of {SHAPE_SETS} (default: all on CUDA; "
                    "resnet50,small2000 on CPU)")
    ap.add_argument("--log2", default=None, help="single-tensor sizes 2^k, comma list of k "
                    "(default 20,24,28,30 on CUDA, 24 on CPU, 12 with --quick)")
    ap.add_argument("--providers", default=None, help=f"comma list of {bench.PROVIDERS} "
                    "(default: the backends that run natively on the device, and the yardsticks)")
    ap.add_argument("--dtypes", default=None, help="comma list (default float32,bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--shrink", type=int, default=None, help="divide model-set dimensions (default 1; 32 quick)")
    ap.add_argument("--momentum", type=float, default=bench.MOMENTUM)
    ap.add_argument("--rounds", type=int, default=None, help="CPU interleaved rounds (default 15; 3 quick)")
    ap.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up (CUDA)")
    ap.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition time (CUDA)")
    ap.add_argument("--host-rounds", type=int, default=None, help="rounds of the host-cost measurement "
                    "(default 50; 5 quick; 0 skips it)")
    ap.add_argument("--temp-log2", type=int, default=None, help="tensor of 2^k elements for peak temporaries "
                    "(default 26; 16 quick)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch.set_num_threads for the run (default: torch's own, one per core)")
    ap.add_argument("--no-temp", dest="temp", action="store_false", help="skip the peak-temporaries measurement")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip counting launches")
    args = ap.parse_args(argv)

    bench_utils.resolve_device(ap, args)
    on_gpu, q = args.device.type == "cuda", args.quick
    args.shapes = bench_utils.parse_list(args.shapes or (",".join(SHAPE_SETS) if on_gpu else "resnet50,small2000"))
    for s in args.shapes:
        if s not in SHAPE_SETS:
            ap.error(f"unknown shape set {s!r}; choose from {SHAPE_SETS}")
    args.log2 = [int(k) for k in bench_utils.parse_list(args.log2 or ("12" if q else "20,24,28,30" if on_gpu else "24"))]
    args.providers = bench_utils.parse_list(args.providers) if args.providers else bench.native_providers(args.device)
    for p in args.providers:
        if p not in bench.PROVIDERS:
            ap.error(f"unknown provider {p!r}; choose from {bench.PROVIDERS}")
    try:
        args.dtypes = [bench.parse_dtype(d) for d in
                       bench_utils.parse_list(args.dtypes or ("float32,bfloat16" if on_gpu and not q else "float32"))]
    except ValueError as e:
        ap.error(str(e))
    defaults = {"shrink": (32, 1), "rounds": (3, 15), "host_rounds": (5, 50), "temp_log2": (16, 26)}
    for k, (quick_v, full_v) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick_v if q else full_v)
    if q and on_gpu:
        args.warmup_ms, args.rep_ms = min(args.warmup_ms, 5), min(args.rep_ms, 20)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {**environment(device), "torch_threads": torch.get_num_threads()}
    print(f"# bench_step on {env['device_name']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads), "
          f"torch {env['torch']}, "
          f"triton {env['triton']}, commit {str(env['git_commit'])[:12]}{'+dirty' if env['git_dirty'] else ''}")

    rows: list[dict[str, Any]] = []
    for shape_set, size, shapes in cases(args):
        for dtype in args.dtypes:
            case_rows = measure_case(shape_set, size, shapes, dtype, args)
            print(bench.table(case_rows, TABLE) + "\n", flush=True)
            rows += case_rows

    host_shapes = bench.shrink_shapes(bench.resnet50_shapes(), args.shrink)
    host_providers = list(BACKENDS) + ["torch_fused"]
    host = bench.host_cost(host_providers, host_shapes, device, rounds=args.host_rounds) if args.host_rounds else {}
    if host:
        print(f"# host cost of step(), kernels stubbed, ResNet-50's {len(host_shapes)} tensors (µs; "
              "x fused: over SGD(fused=True)'s in the same interleaved rounds, min and median):")
        sgd = host.get("torch_fused", {})
        for p, h in host.items():
            line = f"min {h['min']:8.1f}  median {h['median']:8.1f}" if h["status"] == "ok" else h["status"]
            if h["status"] == "ok" and sgd.get("status") == "ok" and p != "torch_fused":
                line += f"  x fused {h['min'] / sgd['min']:.2f} / {h['median'] / sgd['median']:.2f}"
            print(f"#   {p:<12} {line}")

    temps: dict[str, dict] = {}
    if args.temp:
        for p in args.providers:
            if p != "copy":
                temps[p] = bench.peak_temporaries(p, args.temp_log2, torch.float32, device, momentum=args.momentum)
        print(f"# peak temporaries of a step, one fp32 tensor of 2^{args.temp_log2} elements (B/element):")
        for p, t in temps.items():
            print(f"#   {p:<14} " + (f"{t['bytes_per_element']:.2f}" if t["status"] == "ok" else t["status"]))

    targets = evaluate_targets(rows, host, temps, device)
    bench_utils.print_targets(targets)
    stem = args.name or bench_utils.results_stem("step", env, args.quick)
    extra = {
        "analytic_bytes_per_element": {
            bench.dtype_name(d): {a: traffic.bytes_per_element(a, d, args.momentum != 0) for a in traffic.ALGORITHMS}
            for d in args.dtypes},
        "hyperparameters": {"lr": bench.LR, "alpha": bench.ALPHA, "beta": bench.BETA, "momentum": args.momentum,
                            "init_std": bench.INIT_STD, "grad_std": bench.GRAD_STD},
        "host_cost_us": host,
        "peak_temporaries": temps,
        "targets": targets,
    }
    paths = bench_utils.write_results(args.out, stem, rows, env=env, args=args, columns=COLUMNS, extra=extra)
    print("# wrote " + ", ".join(str(p) for p in paths.values()))
    return {**paths, "rows": rows, "host_cost_us": host, "peak_temporaries": temps, "targets": targets}


if __name__ == "__main__":
    main()
