"""Training throughput with PILoT against dense SGD and the naive reparameterization.

A torchvision model (``--arch``, default resnet50) trains on one synthetic batch that
lives on the device (``--batch-size``, default 256, ``--image-size`` 224), under bf16
autocast and channels_last, for ``--warmup`` iterations and then ``--iters`` timed ones
(synchronized before and after).  Per provider one row:

  img_per_s        images per second over the timed iterations
  rel_dense        img_per_s / dense's img_per_s (target for PILoT: >= 0.99)
  peak_mem_mib     torch.cuda.max_memory_allocated over the timed iterations
  step_host_us     host time of ``opt.step()`` alone: time.perf_counter around the call,
                   no sync inside, device idle before it (median of --host-iters);
                   target <= 50 us for ResNet-50's 161 tensors.  On the CPU it is the
                   whole step.
  step_gpu_us      the step's span on the GPU timeline during the timed loop (CUDA events
                   around ``opt.step()``; it includes gaps where the GPU waits on the host)
  step_kernel_us   summed device-kernel time of one step (torch.profiler)
  step_launches    device kernels in one step (CPU: aten ops dispatched)
  step_bytes       analytic bytes of the step (:mod:`pilot_kernels.kernels.traffic`);
                   step_gbps = step_bytes over step_kernel_us (CUDA) or step_host_us (CPU)

Providers: ``dense`` (torch.optim.SGD fused), ``pilot_<backend>`` for every backend in
``pilot_kernels.kernels.BACKENDS`` (PILoT with that backend), ``naive`` (every ndim >= 2
weight reparameterized with ``torch.nn.utils.parametrize`` as m·w, SGD foreach on m, w).

GPU:   python benchmarks/bench_training.py --profile /tmp/traces
CPU:   python benchmarks/bench_training.py --device cpu --quick --out /tmp/bench
"""
from __future__ import annotations

import argparse
import gc
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

import bench
import bench_utils
from envinfo import environment
from pilot_kernels.kernels import BACKENDS, traffic

PROVIDERS = ("dense", *(f"pilot_{b}" for b in BACKENDS), "naive")

COLUMNS = (
    "arch", "provider", "status", "batch_size", "image_size", "amp", "channels_last",
    "n_tensors", "n_reparam", "n_params", "warmup", "iters", "iter_ms", "img_per_s", "rel_dense",
    "peak_mem_mib", "step_host_us", "step_host_p80_us", "step_gpu_us", "step_kernel_us",
    "step_launches", "launch_counter", "step_bytes", "step_gbps",
)


def build(provider: str, args, device: torch.device):
    """Model (on ``device``, channels_last) and optimizer for ``provider``, same init for all.

    Returns ``(model, opt, step_bytes, shapes)``, ``shapes`` those of the model's own
    parameters (before any reparameterization).
    """
    import torchvision

    models = torchvision.models
    torch.manual_seed(args.seed)
    model = getattr(models, args.arch)(num_classes=args.num_classes)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    shapes = [tuple(p.shape) for p in model.parameters()]
    dtype = next(model.parameters()).dtype
    mom = args.momentum != 0
    if provider == "dense":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, fused=True)
        nbytes = traffic.step_bytes(shapes, "sgd", dtype, mom)
    elif provider.startswith("pilot_"):
        from pilot_kernels import PILoT

        backend = provider.removeprefix("pilot_")
        bench.check_available(backend, device)
        opt = PILoT(model.parameters(), lr=args.lr, momentum=args.momentum, alpha=args.alpha, backend=backend)
        nbytes = traffic.step_bytes(shapes, "pilot", dtype, mom)
    elif provider == "naive":
        with torch.no_grad():
            factors, others = bench.naive_parametrize(model)
        opt = bench.naive_sgd(factors, others, lr=args.lr, momentum=args.momentum, alpha=args.alpha)
        # The step is SGD on the fp32 factors m and w (the product and its backward are
        # part of forward/backward, so they show in img/s, not here).
        sgd = traffic.bytes_per_element("sgd", torch.float32, mom)
        nbytes = sum(math.prod(s) * (2 * sgd if traffic.is_reparameterized(s) else
                                     traffic.bytes_per_element("sgd", dtype, mom)) for s in shapes)
    else:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    return model, opt, nbytes, shapes


def run_provider(provider: str, args, device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {
        "arch": args.arch, "provider": provider, "batch_size": args.batch_size,
        "image_size": args.image_size, "amp": args.amp, "channels_last": args.channels_last,
        "warmup": args.warmup, "iters": args.iters,
    }
    model = opt = images = labels = None
    try:
        model, opt, nbytes, shapes = build(provider, args, device)
        row.update(n_tensors=len(shapes), n_reparam=sum(traffic.is_reparameterized(s) for s in shapes),
                   n_params=sum(math.prod(s) for s in shapes), step_bytes=nbytes)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen,
                             device=device)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen, device=device)
        model.train()

        def fwd_bwd() -> None:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()

        # warm-up: compiles kernels, allocates momentum buffers, settles cudnn autotuning
        for _ in range(args.warmup):
            fwd_bwd()
            opt.step()
            opt.zero_grad(set_to_none=True)
        bench.sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # timed iterations, with CUDA events around each step (no sync inside the loop)
        cuda = device.type == "cuda"
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(args.iters)] if cuda else []
        host: list[float] = []
        bench.sync(device)
        t0 = time.perf_counter()
        for i in range(args.iters):
            fwd_bwd()
            if cuda:
                ev[i][0].record()
            t1 = time.perf_counter()
            opt.step()
            host.append(1e6 * (time.perf_counter() - t1))
            if cuda:
                ev[i][1].record()
            opt.zero_grad(set_to_none=True)
        bench.sync(device)
        elapsed = time.perf_counter() - t0
        row.update(status="ok", iter_ms=1e3 * elapsed / args.iters,
                   img_per_s=args.batch_size * args.iters / elapsed)
        if cuda:
            row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            row["step_gpu_us"] = bench.summarize([1e3 * a.elapsed_time(b) for a, b in ev])["median"]
            # Host cost of step() alone: inside the loop above the launch queue may be
            # full and block the host, so measure again with the device idle before the
            # call and no sync inside it.
            host = []
            for _ in range(args.host_iters):
                fwd_bwd()
                bench.sync(device)
                t1 = time.perf_counter()
                opt.step()
                host.append(1e6 * (time.perf_counter() - t1))
                opt.zero_grad(set_to_none=True)
            bench.sync(device)
        # (on the CPU the step is synchronous: the loop's samples are the whole step)
        host_stats = bench.summarize(host)
        row.update(step_host_us=host_stats["median"], step_host_p80_us=host_stats["p80"])

        # kernels in one step and their summed time
        fwd_bwd()
        bench.sync(device)
        try:
            prof = bench.count_launches(opt.step, device)
            row.update(step_launches=prof["launches"], launch_counter=prof["launch_counter"],
                       step_kernel_us=prof["kernel_us"])
        except Exception as e:
            print(f"  [profiler failed for {provider}: {bench.short_reason(e)}]")
        opt.zero_grad(set_to_none=True)
        step_us = row.get("step_kernel_us") if cuda else row.get("step_host_us")
        if step_us:
            row["step_gbps"] = nbytes / (step_us * 1e-6) / 1e9

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                for _ in range(args.profile_iters):
                    fwd_bwd()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                bench.sync(device)
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            trace = Path(args.profile) / f"trace-{args.arch}-{provider}-{device.type}.json"
            prof.export_chrome_trace(str(trace))
            row["trace"] = str(trace)
    except bench.Unavailable as e:
        row["status"] = f"unavailable: {e}"
    except torch.cuda.OutOfMemoryError as e:
        row["status"] = f"skipped: out of memory ({bench.short_reason(e, 120)})"
    except Exception as e:
        row["status"] = f"error: {bench.short_reason(e)}"
    finally:
        del model, opt, images, labels
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def evaluate_targets(rows: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """CUDA runs, for the fused backends: training at >= 99% of dense SGD's images per
    second, and the host cost of ``step()`` <= 50 µs."""
    if device.type != "cuda":
        return {"status": "CPU run: the training targets apply to CUDA runs"}
    checks = []
    for r in rows:
        if r["status"] != "ok" or r["provider"] in ("dense", "naive", "pilot_reference"):
            continue
        checks.append(bench_utils.target("training >= 99% of dense img/s", r["provider"], r.get("rel_dense"),
                                         0.99, at_most=False))
        checks.append(bench_utils.target(f"host step <= 50 us ({r['n_tensors']} tensors)", r["provider"],
                                         r.get("step_host_us"), 50.0, at_most=True))
    return {"status": "measured", "checks": checks}


TABLE = (
    ("arch", "arch", ""), ("provider", "provider", ""), ("img_per_s", "img/s", ".1f"),
    ("rel_dense", "x dense", ".3f"), ("peak_mem_mib", "peak MiB", ".0f"), ("step_host_us", "host us", ".1f"),
    ("step_gpu_us", "gpu us", ".1f"), ("step_kernel_us", "kernel us", ".1f"), ("step_launches", "launches", "d"),
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_utils.add_common_args(ap, "training")
    ap.add_argument("--arch", default=None, help="torchvision model name (default resnet50)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256")
    ap.add_argument("--image-size", type=int, default=None, help="default 224")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 10)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 50)")
    ap.add_argument("--host-iters", type=int, default=None,
                    help="CUDA: iterations for the host cost of step() with the device idle (default 20)")
    ap.add_argument("--providers", default=None, help=f"comma list of {PROVIDERS} (default: dense, "
                    "the backends that run on the device, naive)")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--alpha", type=float, default=1e-5)
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="write a torch.profiler chrome trace per provider into DIR")
    ap.add_argument("--profile-iters", type=int, default=3)
    args = ap.parse_args(argv)

    bench_utils.resolve_device(ap, args)
    q = args.quick
    defaults = dict(arch=("resnet18", "resnet50"), batch_size=(4, 256), image_size=(32, 224),
                    warmup=(1, 10), iters=(2, 50), host_iters=(5, 20))
    for k, (quick_v, full_v) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick_v if q else full_v)
    if args.iters < 1:
        ap.error("--iters must be >= 1")
    if args.providers:
        args.providers = bench_utils.parse_list(args.providers)
    else:
        backends = [b for b in bench.native_providers(args.device) if b in BACKENDS]
        args.providers = ["dense", *(f"pilot_{b}" for b in backends), "naive"]
    for p in args.providers:
        if p not in PROVIDERS:
            ap.error(f"unknown provider {p!r}; choose from {PROVIDERS}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = environment(device)
    print(f"# bench_training on {env['device_name']} (driver {env['driver']}), torch {env['torch']}, "
          f"commit {str(env['git_commit'])[:12]}{'+dirty' if env['git_dirty'] else ''}")
    print(f"# {args.arch}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"amp bf16={args.amp}, channels_last={args.channels_last}, warmup {args.warmup}, iters {args.iters}")

    rows = []
    for provider in args.providers:
        row = run_provider(provider, args, device)
        rows.append(row)
        print(bench.table([row], TABLE).splitlines()[-1], flush=True)
    dense = next((r for r in rows if r["provider"] == "dense" and r["status"] == "ok"), None)
    for r in rows:
        if dense and r["status"] == "ok":
            r["rel_dense"] = r["img_per_s"] / dense["img_per_s"]

    targets = evaluate_targets(rows, device)
    stem = args.name or bench_utils.results_stem("training", env, args.quick)
    paths = bench_utils.write_results(args.out, stem, rows, env=env, args=args, columns=COLUMNS,
                                      extra={"targets": targets})
    print(bench.table(rows, TABLE))
    bench_utils.print_targets(targets)
    print("# wrote " + ", ".join(str(p) for p in paths.values()))
    return {**paths, "rows": rows, "targets": targets}


if __name__ == "__main__":
    main()
