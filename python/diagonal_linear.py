#!/usr/bin/env python
"""The paper's diagonal linear network (Mask in the Mirror, §4 and appendix C.1).

Underdetermined sparse regression: ``n = 100`` features, ``d = 40`` samples
``z ~ N(0, I_n)``, a ground truth ``x*`` with 5 nonzeros, ``y = Z x*``, mean squared
error, initial point ``x0 ~ N(0, I/n)``.  Three ways of training ``x``:

* ``pilot`` — ``x = m ⊙ w`` with PILoT's initialization ``m0² − w0² = 1`` (β = 1),
  trained by :class:`pilot_kernels.PILoT` with momentum 0 (plain gradient descent on
  ``m, w`` with the decay ``α (‖m‖² + ‖w‖²)``);
* ``spred`` — the same optimizer with spred's balanced initialization (β = 0,
  ``m = |w|``), under which no entry of ``x`` can ever change sign;
* ``l1`` — gradient descent on ``x`` itself with an explicit ``α ‖x‖₁`` penalty
  (subgradient ``α · sign(x)``), i.e. LASSO.

Each method runs with a constant α and with decaying α schedules
(:mod:`pilot_kernels.schedules`), each over several random initializations.  All seeds
of one (method, schedule) live in one ``(seeds, n)`` parameter; the loss is a sum over
seeds, so the runs are independent.  Everything runs in one loop on one stacked loss.

The paper uses gradient steps of 1e-4 up to time 1000 (10⁷ steps).  This script uses a
larger step (default 1e-2) and a shorter horizon (default time 250) so that it runs in
about a minute on two CPU cores; the α values below were picked by a small exploration
(see ``DEFAULTS``).  The paper's exact schedule constants are not legible in its text;
ours are our own choice.

Usage::

    python python/diagonal_linear.py                 # ~1 min on 2 CPU cores
    python python/diagonal_linear.py --quick         # a few hundred steps
    python python/diagonal_linear.py --json out.json --out-dir outputs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

try:
    from pilot_kernels import PILoT
    from pilot_kernels.schedules import ConstantAlpha, GeometricAlpha, HarmonicAlpha, QuadraticAlpha
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    from pilot_kernels import PILoT
    from pilot_kernels.schedules import ConstantAlpha, GeometricAlpha, HarmonicAlpha, QuadraticAlpha

METHODS = ("pilot", "spred", "l1")
METHOD_LABELS = {
    "pilot": "m⊙w, PILoT init (β=1)",
    "spred": "m⊙w, spred init (β=0)",
    "l1": "x, explicit L1 (LASSO)",
}
SCHEDULES = ("constant", "geometric", "harmonic", "quadratic")
_SCHEDULERS = {
    "constant": ConstantAlpha,
    "geometric": GeometricAlpha,
    "harmonic": HarmonicAlpha,
    "quadratic": QuadraticAlpha,
}

# Chosen by a small exploration (lr 1e-2, time 250; see the module docstring and the
# README): the constant α of each method is about its best constant value; the decaying
# schedules start at α0 and are stepped once per `period` steps.
DEFAULTS = dict(
    n=100,
    d=40,
    k=5,
    seeds=5,
    lr=1e-2,
    steps=25_000,
    alpha=0.01,        # constant α for m⊙w (pilot, spred): penalty α(‖m‖²+‖w‖²) ≈ 2α‖x‖₁
    alpha0=0.1,        # starting α of the decaying schedules for m⊙w
    l1_alpha=0.01,     # constant α of the explicit α‖x‖₁
    l1_alpha0=0.1,     # starting α of the decaying schedules for explicit L1
    p=0.95,            # ratio of the geometric schedule
    period=100,        # optimizer steps per schedule period (time 1 at lr 1e-2)
    tol=1e-2,          # |x| below this counts as 0 in the sign agreement
)
QUICK = dict(steps=400, period=10)


# --------------------------------------------------------------------------- helpers
def add_l1_subgradient_(optimizer: torch.optim.Optimizer) -> None:
    """Add ``α · sign(x)`` (a subgradient of ``α ‖x‖₁``) to every gradient, with each
    param group's ``group["alpha"]``: explicit L1 on top of plain SGD."""
    for group in optimizer.param_groups:
        alpha = group["alpha"]
        if alpha == 0:
            continue
        for p in group["params"]:
            if p.grad is not None:
                p.grad.add_(torch.sign(p.detach()), alpha=alpha)


def make_problem(seeds: int, n: int, d: int, k: int, data_seed: int, resample: bool):
    """Data ``Z (S, d, n)``, ground truth ``x* (S, n)``, targets ``y (S, d)`` and inits
    ``x0 (S, n)``.  Row ``s`` uses problem ``data_seed`` (or ``data_seed + s`` with
    ``resample``) and initialization seed ``s``.  Nonzeros of ``x*``: random signs,
    magnitudes uniform in [0.5, 1.5] (our choice; the paper does not say)."""
    Zs, xs = [], []
    for s in range(seeds):
        g = torch.Generator().manual_seed(10_000 + data_seed + (s if resample else 0))
        Z = torch.randn(d, n, generator=g)
        support = torch.randperm(n, generator=g)[:k]
        signs = torch.randint(0, 2, (k,), generator=g).float() * 2 - 1
        mags = 0.5 + torch.rand(k, generator=g)
        x_star = torch.zeros(n)
        x_star[support] = signs * mags
        Zs.append(Z)
        xs.append(x_star)
    Z = torch.stack(Zs)
    x_star = torch.stack(xs)
    y = torch.einsum("sdn,sn->sd", Z, x_star)
    x0 = torch.stack(
        [torch.randn(n, generator=torch.Generator().manual_seed(s)) / math.sqrt(n) for s in range(seeds)]
    )
    return Z, x_star, y, x0


def rel_error(x: torch.Tensor, x_star: torch.Tensor) -> torch.Tensor:
    """``‖x − x*‖ / ‖x*‖`` per seed (last dim = features)."""
    return (x - x_star).norm(dim=-1) / x_star.norm(dim=-1)


def sign_agreement(x: torch.Tensor, x_star: torch.Tensor, tol: float) -> torch.Tensor:
    """Fraction of entries whose sign (0 where ``|x| < tol``) equals that of ``x*``."""
    sx = torch.where(x.abs() < tol, torch.zeros_like(x), torch.sign(x))
    return (sx == torch.sign(x_star)).float().mean(dim=-1)


def sign_flips(x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Number of entries with strictly opposite signs in ``x`` and ``x0``."""
    return (x * x0 < 0).sum(dim=-1)


def _mean_std(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    std = v.std(unbiased=False).item() if v.numel() > 1 else 0.0
    return v.mean().item(), std


# --------------------------------------------------------------------------- runs
def build_runs(cfg: dict, x0: torch.Tensor, device: torch.device):
    """One parameter, one optimizer and one α scheduler per (method, schedule)."""
    runs = []
    for method in cfg["methods"]:
        for sched in cfg["schedules"]:
            x = torch.nn.Parameter(x0.clone().to(device))
            if method == "l1":
                a = cfg["l1_alpha"] if sched == "constant" else cfg["l1_alpha0"]
                # SGD ignores the extra group key; the α schedulers read/write it.
                opt = torch.optim.SGD([{"params": [x], "alpha": a}], lr=cfg["lr"], momentum=0.0)
            else:
                a = cfg["alpha"] if sched == "constant" else cfg["alpha0"]
                beta = 1.0 if method == "pilot" else 0.0
                opt = PILoT([x], lr=cfg["lr"], momentum=0.0, alpha=a, beta=beta, reparam=True)
            kwargs = {"p": cfg["p"]} if sched == "geometric" else {}
            scheduler = _SCHEDULERS[sched](opt, **kwargs)
            runs.append(dict(method=method, schedule=sched, x=x, opt=opt, scheduler=scheduler))
    return runs


def train(cfg: dict, progress: bool = True) -> dict[str, Any]:
    device = torch.device(cfg["device"])
    Z, x_star, y, x0 = make_problem(cfg["seeds"], cfg["n"], cfg["d"], cfg["k"], cfg["data_seed"], cfg["resample_data"])
    Z, x_star, y, x0 = Z.to(device), x_star.to(device), y.to(device), x0.to(device)
    Zt = Z.transpose(1, 2).contiguous()                            # (S, n, d)
    runs = build_runs(cfg, x0, device)
    # The PILoT split writes x <- m*w (fp32 rounding); flips are counted from the x0 drawn.
    params = [r["x"] for r in runs]
    steps, period = cfg["steps"], cfg["period"]
    record_every = max(1, steps // cfg["curve_points"])
    rec_steps: list[int] = []
    rec_err: list[torch.Tensor] = []

    def record(step: int) -> None:
        with torch.no_grad():
            rec_steps.append(step)
            rec_err.append(rel_error(torch.stack(params), x_star).cpu())

    try:
        from tqdm import tqdm

        bar = tqdm(range(steps), desc="diagonal linear", unit="step", disable=not progress, mininterval=0.5)
    except ImportError:  # pragma: no cover
        bar = range(steps)
    record(0)
    for step in bar:
        X = torch.stack(params)                                    # (runs, S, n)
        residual = torch.bmm(X.transpose(0, 1), Zt) - y[:, None]   # (S, runs, d)
        loss = residual.pow(2).mean(dim=-1).sum()                  # MSE per run and seed, summed
        for x in params:
            x.grad = None
        loss.backward()
        for r in runs:
            if r["method"] == "l1":
                add_l1_subgradient_(r["opt"])
            r["opt"].step()
        if (step + 1) % period == 0:
            for r in runs:
                r["scheduler"].step()
        if (step + 1) % record_every == 0 or step + 1 == steps:
            record(step + 1)

    with torch.no_grad():
        X = torch.stack(params)
        final_loss = (torch.bmm(X.transpose(0, 1), Zt) - y[:, None]).pow(2).mean(dim=-1).T  # (runs, S)
    curves = torch.stack(rec_err)                                  # (T, runs, S)
    results = []
    for i, r in enumerate(runs):
        x = r["x"].detach()
        err = rel_error(x, x_star).cpu()
        agree = sign_agreement(x, x_star, cfg["tol"]).cpu()
        flips = sign_flips(x, x0).cpu()
        results.append(
            dict(
                method=r["method"],
                schedule=r["schedule"],
                label=METHOD_LABELS[r["method"]],
                alpha_start=float(r["scheduler"].base_alphas[0]),
                alpha_final=float(r["opt"].param_groups[0]["alpha"]),
                rel_error=err.tolist(),
                rel_error_mean=_mean_std(err)[0],
                rel_error_std=_mean_std(err)[1],
                sign_agreement=agree.tolist(),
                sign_agreement_mean=_mean_std(agree)[0],
                sign_agreement_std=_mean_std(agree)[1],
                sign_flips=flips.tolist(),
                sign_flips_mean=_mean_std(flips)[0],
                sign_flips_std=_mean_std(flips)[1],
                final_loss=final_loss[i].cpu().tolist(),
                curve_rel_error=curves[:, i, :].T.tolist(),        # (S, T)
            )
        )
    return dict(curve_steps=rec_steps, runs=results, x_star_nonzeros=int(cfg["k"]))


# --------------------------------------------------------------------------- output
def format_table(out: dict) -> str:
    head = f"{'method':<24} {'schedule':<10} {'α start':>8} {'rel. error ‖x−x*‖/‖x*‖':>24} {'sign agreement':>16} {'sign flips':>14}"
    lines = [head, "-" * len(head)]
    for r in out["runs"]:
        lines.append(
            f"{r['label']:<24} {r['schedule']:<10} {r['alpha_start']:>8.3g} "
            f"{r['rel_error_mean']:>13.2e} ± {r['rel_error_std']:<8.1e} "
            f"{r['sign_agreement_mean']:>9.3f} ± {r['sign_agreement_std']:<4.3f} "
            f"{r['sign_flips_mean']:>6.1f} ± {r['sign_flips_std']:<5.1f}"
        )
    return "\n".join(lines)


def verdict(out: dict, cfg: dict) -> list[str]:
    """Plain statements of what this run shows, computed from the numbers (not tuned)."""
    by = {(r["method"], r["schedule"]): r for r in out["runs"]}
    lines = []
    decaying = [s for s in cfg["schedules"] if s != "constant"]
    if "pilot" in cfg["methods"]:
        best = min((by[("pilot", s)] for s in cfg["schedules"]), key=lambda r: r["rel_error_mean"])
        ok = max(best["rel_error"]) < 1e-2 and min(best["sign_agreement"]) == 1.0
        lines.append(
            f"PILoT init, best schedule {best['schedule']}: rel. error {best['rel_error_mean']:.1e}, "
            f"sign agreement {best['sign_agreement_mean']:.3f} -> "
            + ("reaches the ground truth in every seed." if ok else "does NOT reach the ground truth in every seed.")
        )
        for s in decaying:
            r = by[("pilot", s)]
            ok = max(r["rel_error"]) < 1e-2 and min(r["sign_agreement"]) == 1.0
            lines.append(
                f"PILoT init + {s} α: rel. error {r['rel_error_mean']:.1e} ± {r['rel_error_std']:.1e} -> "
                + ("ground truth in every seed." if ok else "not the ground truth in every seed.")
            )
    if "spred" in cfg["methods"]:
        rs = [by[("spred", s)] for s in cfg["schedules"]]
        flips = sum(sum(r["sign_flips"]) for r in rs)
        best = min(rs, key=lambda r: r["rel_error_mean"])
        lines.append(
            f"spred init: {flips} sign flips over all runs; best rel. error {best['rel_error_mean']:.2f} "
            f"({best['schedule']}) -> " + ("stays off the ground truth." if best["rel_error_mean"] > 1e-2 else "reaches it.")
        )
    if "l1" in cfg["methods"]:
        best = min((by[("l1", s)] for s in cfg["schedules"]), key=lambda r: r["rel_error_mean"])
        lines.append(
            f"explicit L1: best rel. error {best['rel_error_mean']:.2e} ({best['schedule']}, α0 {best['alpha_start']:.3g})"
        )
    return lines


def plot(out: dict, cfg: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(out["curve_steps"], dtype=float) * cfg["lr"]
    methods = [m for m in METHODS if m in cfg["methods"]]
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), sharey=True, squeeze=False)
    colors = {"constant": "C0", "geometric": "C3", "harmonic": "C2", "quadratic": "C1"}
    for ax, method in zip(axes[0], methods):
        for r in out["runs"]:
            if r["method"] != method:
                continue
            c = np.maximum(np.asarray(r["curve_rel_error"]), 1e-12)   # (S, T)
            logc = np.log10(c)
            mean, std = logc.mean(0), logc.std(0)
            col = colors.get(r["schedule"], None)
            ax.plot(t, 10 ** mean, color=col, label=f"{r['schedule']} (α0={r['alpha_start']:.3g})")
            ax.fill_between(t, 10 ** (mean - std), 10 ** (mean + std), color=col, alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_title(METHOD_LABELS[method])
        ax.set_xlabel("time (steps × lr)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("‖x − x*‖ / ‖x*‖  (geo. mean ± 1 sd over seeds)")
    fig.suptitle(
        f"Diagonal linear network: n={cfg['n']}, d={cfg['d']}, ‖x*‖₀={cfg['k']}, {cfg['seeds']} seeds, lr={cfg['lr']:g}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    D = DEFAULTS
    ap.add_argument("--seeds", type=int, default=D["seeds"], help="initializations per (method, schedule)")
    ap.add_argument("--steps", type=int, default=None, help=f"gradient steps (default {D['steps']}, {QUICK['steps']} with --quick)")
    ap.add_argument("--lr", type=float, default=D["lr"], help="step size (the paper: 1e-4)")
    ap.add_argument("--alpha", type=float, default=D["alpha"], help="constant α for m⊙w (pilot, spred)")
    ap.add_argument("--alpha0", type=float, default=D["alpha0"], help="starting α of the decaying schedules, m⊙w")
    ap.add_argument("--l1-alpha", type=float, default=D["l1_alpha"], help="constant α of the explicit α‖x‖₁")
    ap.add_argument("--l1-alpha0", type=float, default=D["l1_alpha0"], help="starting α of decaying schedules, explicit L1")
    ap.add_argument("--p", type=float, default=D["p"], help="ratio of the geometric schedule")
    ap.add_argument("--period", type=int, default=None, help=f"steps per schedule period (default {D['period']}, {QUICK['period']} with --quick)")
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--n", type=int, default=D["n"], help="features")
    ap.add_argument("--d", type=int, default=D["d"], help="samples")
    ap.add_argument("--k", type=int, default=D["k"], help="nonzeros of x*")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the regression problem")
    ap.add_argument("--resample-data", action="store_true", help="a fresh problem per seed (default: one problem, as the paper)")
    ap.add_argument("--tol", type=float, default=D["tol"], help="|x| below this counts as 0 in the sign agreement")
    ap.add_argument("--curve-points", type=int, default=500, help="points kept per curve")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, metavar="PATH", help="write config, final metrics and curves here")
    ap.add_argument("--out-dir", default="outputs", help="where the plot goes")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK['steps']} steps, period {QUICK['period']} (for tests)")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = dict(DEFAULTS)
    extra = ("schedules", "methods", "data_seed", "resample_data", "curve_points", "device")
    cfg.update({k: v for k, v in vars(args).items() if v is not None and (k in DEFAULTS or k in extra)})
    cfg["steps"] = args.steps if args.steps is not None else (QUICK["steps"] if args.quick else DEFAULTS["steps"])
    cfg["period"] = args.period if args.period is not None else (QUICK["period"] if args.quick else DEFAULTS["period"])
    cfg["quick"] = bool(args.quick)
    cfg["horizon_time"] = cfg["steps"] * cfg["lr"]
    torch.manual_seed(0)

    # The tensors are tiny: one thread avoids multi-threading overhead that dominates
    # every op (measured: ~20x faster on 2 busy cores).  Restored afterwards.
    threads = torch.get_num_threads()
    if cfg["device"] == "cpu":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        out = train(cfg, progress=not args.no_progress)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0

    print(
        f"\nDiagonal linear network: n={cfg['n']}, d={cfg['d']}, ‖x*‖₀={cfg['k']}, {cfg['seeds']} seeds, "
        f"lr={cfg['lr']:g}, {cfg['steps']} steps (time {cfg['horizon_time']:g}), "
        f"schedule period {cfg['period']} steps, geometric p={cfg['p']}, sign tol {cfg['tol']:g}"
    )
    print(format_table(out))
    notes = verdict(out, cfg)
    for line in notes:
        print(" * " + line)
    print(f"training took {wall:.1f} s")

    plot_path = None
    if not args.no_plot:
        os.makedirs(args.out_dir, exist_ok=True)
        plot_path = os.path.join(args.out_dir, "diagonal_linear.png")
        plot(out, cfg, plot_path)
        print(f"plot: {plot_path}")
    result = dict(config=cfg, wall_s=wall, plot=plot_path, verdict=notes, **out)
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"json: {args.json}")
    return result


if __name__ == "__main__":
    main()
