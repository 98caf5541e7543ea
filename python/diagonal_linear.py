#!/usr/bin/env python
"""The paper's diagonal linear network (Mask in the Mirror, §4 and appendix C.1).

Underdetermined sparse regression: ``n = 100`` features, ``d = 40`` samples
``z ~ N(0, I_n)``, a ground truth ``x*`` with 5 nonzeros, ``y = Z x*``, mean squared
error, initial point ``x0 ~ N(0, I/n)``.  Three ways of training ``x``:

* ``pilot`` — ``x = m ⊙ w`` with PILoT's initialization ``m0² − w0² = 1`` (β = 1),
  trained by :class:`pilot_kernels.PILoT` with momentum 0 (plain gradient descent on
  ``m, w`` with the decay ``α (‖m‖² + ‖w‖²)``);
* ``spred`` — the same optimizer with spred's balanced initialization (β = 0,
  ``m = |w|``, exact in fp32), under which an entry of ``x`` cannot change sign:
  gradient descent multiplies ``m² − w²`` by ``(1 − 2αη)² − η²g²``, so it stays 0;
* ``l1`` — gradient descent on ``x`` itself with an explicit ``α ‖x‖₁`` penalty
  (subgradient ``α · sign(x)``), i.e. LASSO.

Each method runs with a constant α and with decaying α schedules from
:mod:`pilot_kernels.schedules`, each over several random initializations.  All seeds of
one (method, schedule) live in one ``(seeds, n)`` parameter with its own optimizer; the
loss is a sum over seeds and runs, so every run is independent.

Choices that are ours (the paper does not give them or they are not legible in its
text): the step size and horizon (the paper: step 1e-4 up to time 1000, i.e. 10⁷ steps;
here 1e-2 up to time 200 so that the script runs in about a minute on two CPU cores),
the α values and schedule periods (picked by a small exploration, see ``DEFAULTS``), and
the nonzeros of ``x*`` (random signs, magnitudes uniform in [0.5, 1.5]).

Schedules (stepped once per ``period`` optimizer steps; k = 1, 2, … is the period):

* ``constant``        α = α_const
* ``geometric``       α = α0 · p^(k−1)                   (fast: period ``--period``)
* ``geometric_slow``  the same ∫α dt as ``geometric``, spread ``--slow-factor`` times
  longer (period × f, α0 / f).  By the paper's theory (gradient flow) PILoT's end point
  depends on ∫α dt only; LASSO's depends on how fast α decays.
* ``harmonic``        α = α0 / k     (optional)
* ``quadratic``       α = α0 / k²    (optional)

Usage::

    python python/diagonal_linear.py                 # ~1 min on 2 CPU cores
    python python/diagonal_linear.py --quick         # a few hundred steps (tests)
    python python/diagonal_linear.py --json out.json --out-dir outputs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pilot_kernels import PILoT
from pilot_kernels.schedules import ConstantAlpha, GeometricAlpha, HarmonicAlpha, QuadraticAlpha
from pilot_kernels.sparsity import add_l1_subgradient_

METHODS = ("pilot", "spred", "l1")
METHOD_LABELS = {
    "pilot": "m⊙w, PILoT init (β=1)",
    "spred": "m⊙w, spred init (β=0)",
    "l1": "x, explicit L1 (LASSO)",
}
SCHEDULES = ("constant", "geometric", "geometric_slow", "harmonic", "quadratic")
DEFAULT_SCHEDULES = ("constant", "geometric", "geometric_slow")

# Picked by a small exploration at lr 1e-2 up to time 250 (5 seeds, problem seed 0):
# * constant α: about the best constant value of each method within the horizon
#   (m⊙w: 0.003 has not converged by time 250, 0.03 ends more biased; explicit L1:
#   0.003 has not converged, 0.03 ends at a larger LASSO bias);
# * geometric: α0 = 5 for m⊙w, decayed by p = 0.95 every 10 steps, i.e.
#   ∫α dt = α0 · period · lr / (1 − p) = 10, gone after ~time 20.  For PILoT the error
#   at time 250 was the same (rel. error 1.5–1.7e-3) for every (α0, period) with
#   ∫α dt = 10 that we tried (period 2 … 50), as the theory predicts; ∫α dt = 2 left
#   it at 3e-2 with wrong zeros, ∫α dt = 6 … 20 all gave 1e-3 … 3e-3.  Explicit L1 starts at 2·α0
#   (α(‖m‖²+‖w‖²) ≥ 2α‖x‖₁, so this is the same penalty).
DEFAULTS = dict(
    n=100,
    d=40,
    k=5,
    seeds=5,
    lr=1e-2,
    steps=20_000,
    alpha=0.01,        # constant α for m⊙w (pilot, spred)
    alpha0=5.0,        # starting α of the decaying schedules for m⊙w
    l1_alpha=0.01,     # constant α of the explicit α‖x‖₁
    l1_alpha0=10.0,    # starting α of the decaying schedules for explicit L1
    p=0.95,            # ratio of the geometric schedules (the paper's)
    period=10,         # optimizer steps per schedule period
    slow_factor=5,     # geometric_slow: period × this, α0 / this (same ∫α dt)
    tol=1e-2,          # |x| below this counts as 0 (sign agreement, sign flips)
)
QUICK = dict(steps=400)


# --------------------------------------------------------------------------- helpers
def make_problem(seeds: int, n: int, d: int, k: int, data_seed: int, resample: bool):
    """Data ``Z (S, d, n)``, ground truth ``x* (S, n)``, targets ``y (S, d)`` and inits
    ``x0 (S, n)``.  Row ``s`` uses problem ``data_seed`` (or ``data_seed + s`` with
    ``resample``) and initialization seed ``s``."""
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


def _sign_tol(x: torch.Tensor, tol: float) -> torch.Tensor:
    return torch.where(x.abs() < tol, torch.zeros_like(x), torch.sign(x))


def sign_agreement(x: torch.Tensor, x_star: torch.Tensor, tol: float) -> torch.Tensor:
    """Fraction of entries whose sign (0 where ``|x| < tol``) equals that of ``x*``."""
    return (_sign_tol(x, tol) == torch.sign(x_star)).float().mean(dim=-1)


def sign_flips(x: torch.Tensor, x0: torch.Tensor, tol: float) -> torch.Tensor:
    """Entries that end with ``|x| >= tol`` and the sign opposite to ``x0``'s."""
    return (_sign_tol(x, tol) * torch.sign(x0) < 0).sum(dim=-1)


def lasso_reference(Z: torch.Tensor, y: torch.Tensor, lam: float, iters: int = 5_000) -> torch.Tensor:
    """The minimizer of ``mean((Z x − y)²) + lam ‖x‖₁`` per seed, by FISTA in float64."""
    Z, y = Z.double(), y.double()
    d = Z.shape[1]
    H = 2.0 / d * Z.transpose(1, 2) @ Z                            # Hessian of the MSE, (S, n, n)
    b = 2.0 / d * torch.einsum("sdn,sd->sn", Z, y)
    step = 1.0 / torch.linalg.eigvalsh(H)[:, -1:]                  # 1 / Lipschitz constant, (S, 1)
    x = torch.zeros_like(b)
    v, t = x.clone(), 1.0
    for _ in range(iters):
        g = torch.einsum("snm,sm->sn", H, v) - b
        u = v - step * g
        x_new = torch.sign(u) * torch.clamp(u.abs() - step * lam, min=0.0)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        v = x_new + (t - 1) / t_new * (x_new - x)
        x, t = x_new, t_new
    return x.float()


def _mean_std(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    std = v.std(unbiased=False).item() if v.numel() > 1 else 0.0
    return v.mean().item(), std


# --------------------------------------------------------------------------- runs
def _schedule(name: str, cfg: dict, const_alpha: float, alpha0: float):
    """(scheduler class, its kwargs, starting α, period in steps) of a named schedule."""
    if name == "constant":
        return ConstantAlpha, {}, const_alpha, cfg["period"]
    if name == "geometric":
        return GeometricAlpha, {"p": cfg["p"]}, alpha0, cfg["period"]
    if name == "geometric_slow":
        f = cfg["slow_factor"]
        return GeometricAlpha, {"p": cfg["p"]}, alpha0 / f, cfg["period"] * f
    if name == "harmonic":
        return HarmonicAlpha, {}, alpha0, cfg["period"]
    if name == "quadratic":
        return QuadraticAlpha, {}, alpha0, cfg["period"]
    raise ValueError(f"unknown schedule {name!r}; choose from {SCHEDULES}")


def build_runs(cfg: dict, x0: torch.Tensor, device: torch.device) -> list[dict]:
    """One parameter ``(seeds, n)``, one optimizer and one α scheduler per (method, schedule)."""
    runs = []
    for method in cfg["methods"]:
        for name in cfg["schedules"]:
            x = torch.nn.Parameter(x0.clone().to(device))
            if method == "l1":
                cls, kw, a, period = _schedule(name, cfg, cfg["l1_alpha"], cfg["l1_alpha0"])
                # SGD keeps the extra group key; the α schedulers read/write group["alpha"].
                opt = torch.optim.SGD([{"params": [x], "alpha": a}], lr=cfg["lr"], momentum=0.0)
            else:
                cls, kw, a, period = _schedule(name, cfg, cfg["alpha"], cfg["alpha0"])
                beta = 1.0 if method == "pilot" else 0.0
                opt = PILoT([x], lr=cfg["lr"], momentum=0.0, alpha=a, beta=beta, reparam=True)
            imbalance = None
            if method != "l1":  # how far the split is from m² − w² = β, in fp32
                st = opt.state[x]
                imbalance = (st["m"] ** 2 - st["w"] ** 2 - beta).abs().max().item()
            runs.append(dict(method=method, schedule=name, x=x, opt=opt, scheduler=cls(opt, **kw),
                             period=period, alpha_start=a, alpha_integral=0.0, init_imbalance=imbalance))
    return runs


def train(cfg: dict, progress: bool = True) -> dict[str, Any]:
    device = torch.device(cfg["device"])
    Z, x_star, y, x0 = make_problem(cfg["seeds"], cfg["n"], cfg["d"], cfg["k"], cfg["data_seed"], cfg["resample_data"])
    Z, x_star, y, x0 = Z.to(device), x_star.to(device), y.to(device), x0.to(device)
    Zt = Z.transpose(1, 2).contiguous()                            # (S, n, d)
    runs = build_runs(cfg, x0, device)
    params = [r["x"] for r in runs]
    steps, lr = cfg["steps"], cfg["lr"]
    record_every = max(1, steps // cfg["curve_points"])
    rec_steps: list[int] = []
    rec_err: list[torch.Tensor] = []

    def record(step: int) -> None:
        with torch.no_grad():
            rec_steps.append(step)
            rec_err.append(rel_error(torch.stack(params), x_star).cpu())

    def loss_per_run() -> torch.Tensor:
        X = torch.stack(params)                                    # (runs, S, n)
        residual = torch.bmm(X.transpose(0, 1), Zt) - y[:, None]   # (S, runs, d)
        return residual.pow(2).mean(dim=-1).T                      # MSE, (runs, S)

    bar = tqdm(range(steps), desc="diagonal linear", unit="step", mininterval=0.5, dynamic_ncols=True,
               disable=not progress)
    record(0)
    for step in bar:
        loss = loss_per_run().sum()                                # independent runs and seeds
        for x in params:
            x.grad = None
        loss.backward()
        for r in runs:
            r["alpha_integral"] += r["opt"].param_groups[0]["alpha"] * lr
            if r["method"] == "l1":  # explicit L1 on top of plain SGD, α from the scheduler
                for group in r["opt"].param_groups:
                    add_l1_subgradient_(group["params"], group["alpha"])
            r["opt"].step()
            if (step + 1) % r["period"] == 0:
                r["scheduler"].step()
        if (step + 1) % record_every == 0 or step + 1 == steps:
            record(step + 1)

    with torch.no_grad():
        final_loss = loss_per_run().cpu()
    lasso = None
    if "l1" in cfg["methods"] and "constant" in cfg["schedules"]:
        lasso = lasso_reference(Z.cpu(), y.cpu(), cfg["l1_alpha"]).to(device)
    curves = torch.stack(rec_err)                                  # (T, runs, S)
    results = []
    for i, r in enumerate(runs):
        x = r["x"].detach()
        err = rel_error(x, x_star).cpu()
        agree = sign_agreement(x, x_star, cfg["tol"]).cpu()
        flips = sign_flips(x, x0, cfg["tol"]).cpu()
        crossings = (x * x0 < 0).sum(dim=-1).cpu()
        half = min(range(len(rec_steps)), key=lambda j: abs(rec_steps[j] - steps / 2))
        trend = (curves[-1, i, :] / curves[half, i, :].clamp_min(1e-30)).double().mean().item()
        extra = {}
        if r["init_imbalance"] is not None:
            extra["init_imbalance_max"] = r["init_imbalance"]
        if lasso is not None and r["method"] == "l1" and r["schedule"] == "constant":
            dist = ((x - lasso).norm(dim=-1) / x_star.norm(dim=-1)).cpu()   # ‖x − x_lasso‖ / ‖x*‖
            extra = dict(dist_to_lasso=dist.tolist(), dist_to_lasso_mean=_mean_std(dist)[0])
        results.append(
            dict(
                method=r["method"],
                schedule=r["schedule"],
                label=METHOD_LABELS[r["method"]],
                alpha_start=float(r["alpha_start"]),
                alpha_final=float(r["opt"].param_groups[0]["alpha"]),
                period_steps=int(r["period"]),
                alpha_integral=float(r["alpha_integral"]),
                rel_error=err.tolist(),
                rel_error_mean=_mean_std(err)[0],
                rel_error_std=_mean_std(err)[1],
                error_ratio_second_half=trend,                     # err(T) / err(T/2), seed mean
                sign_agreement=agree.tolist(),
                sign_agreement_mean=_mean_std(agree)[0],
                sign_agreement_std=_mean_std(agree)[1],
                sign_flips=flips.tolist(),
                sign_flips_mean=_mean_std(flips)[0],
                sign_flips_std=_mean_std(flips)[1],
                # x·x0 < 0 at any magnitude (also entries that ended below tol).
                sign_crossings_any_magnitude=crossings.tolist(),
                final_loss=final_loss[i].tolist(),
                **extra,
                curve_rel_error=curves[:, i, :].T.tolist(),        # (S, T)
            )
        )
    out = dict(curve_steps=rec_steps, curve_time=[s * lr for s in rec_steps], runs=results)
    if lasso is not None:
        ref_err = rel_error(lasso, x_star).cpu()
        out["lasso_reference"] = dict(
            lam=cfg["l1_alpha"],
            rel_error=ref_err.tolist(),
            rel_error_mean=_mean_std(ref_err)[0],
            sign_agreement=sign_agreement(lasso, x_star, cfg["tol"]).cpu().tolist(),
        )
    return out


# --------------------------------------------------------------------------- output
def format_table(out: dict) -> str:
    head = (
        f"{'method':<24} {'schedule':<15} {'α start':>8} {'∫α dt':>7} "
        f"{'‖x−x*‖/‖x*‖ (mean ± sd)':>24} {'T/2→T':>6} {'sign agreement':>16} {'sign flips':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in out["runs"]:
        lines.append(
            f"{r['label']:<24} {r['schedule']:<15} {r['alpha_start']:>8.3g} {r['alpha_integral']:>7.3g} "
            f"{r['rel_error_mean']:>13.2e} ± {r['rel_error_std']:<8.1e} ×{r['error_ratio_second_half']:<5.2f} "
            f"{r['sign_agreement_mean']:>9.3f} ± {r['sign_agreement_std']:<4.3f} "
            f"{r['sign_flips_mean']:>5.1f} ± {r['sign_flips_std']:<5.1f}"
        )
    return "\n".join(lines)


def _reached(r: dict, thr: float = 1e-2) -> bool:
    """Every seed within ``thr`` relative error with every sign (and every zero) right."""
    return max(r["rel_error"]) < thr and min(r["sign_agreement"]) == 1.0


def verdict(out: dict, cfg: dict) -> list[str]:
    """Plain statements computed from this run's numbers, whatever they turn out to be."""
    by = {(r["method"], r["schedule"]): r for r in out["runs"]}
    scheds = list(cfg["schedules"])
    lines = []

    def describe(r: dict) -> str:
        signs = "all signs right" if min(r["sign_agreement"]) == 1.0 else f"signs {r['sign_agreement_mean']:.3f}"
        return f"{r['schedule']} {r['rel_error_mean']:.1e} ({signs}, ×{r['error_ratio_second_half']:.2f} over T/2→T)"

    for method in ("pilot", "l1"):
        if method in cfg["methods"]:
            lines.append(f"{METHOD_LABELS[method]}: " + "; ".join(describe(by[(method, s)]) for s in scheds))
    if "pilot" in cfg["methods"] and "geometric" in scheds:
        g = by[("pilot", "geometric")]
        line = (
            f"PILoT init + geometric α: max rel. error over seeds {max(g['rel_error']):.1e}, "
            f"min sign agreement {min(g['sign_agreement']):.3f} -> "
            + ("reaches x* (rel. error < 1e-2, every sign and zero right) in every seed"
               if _reached(g) else "does NOT reach x* (rel. error < 1e-2, every sign right) in every seed")
        )
        if "geometric_slow" in scheds:
            sl = by[("pilot", "geometric_slow")]
            line += (f"; with the same ∫α dt decayed {cfg['slow_factor']}x slower: "
                     f"{sl['rel_error_mean']:.2e} vs {g['rel_error_mean']:.2e}")
        lines.append(line)
    if "spred" in cfg["methods"]:
        rs = [by[("spred", s)] for s in scheds]
        flips = sum(sum(r["sign_flips"]) for r in rs)
        best = min(rs, key=lambda r: r["rel_error_mean"])
        line = (
            f"spred init: best rel. error {best['rel_error_mean']:.2f} ({best['schedule']}) -> "
            + ("reaches x*" if _reached(best) else "stays off x*")
            + f"; {flips} sign flips (|x| ≥ tol) over all its runs"
        )
        if flips:
            line += (". In exact arithmetic β = 0 forbids any flip; fp32 rounding of the updates "
                     "leaves m² − w² slightly off 0, which lets entries that reach ~0 cross")
        lines.append(line)
    if "l1" in cfg["methods"]:
        if "constant" in scheds and "lasso_reference" in out:
            c, ref = by[("l1", "constant")], out["lasso_reference"]
            lines.append(
                f"explicit L1, constant α = {c['alpha_start']:g}: rel. error {c['rel_error_mean']:.1e}, "
                f"×{c['error_ratio_second_half']:.2f} over T/2→T; the exact LASSO minimizer (λ = α, FISTA) has "
                f"rel. error {ref['rel_error_mean']:.1e} and lies {c['dist_to_lasso_mean']:.1e}·‖x*‖ from the run's end"
            )
        if "geometric" in scheds and "geometric_slow" in scheds:
            f, sl = by[("l1", "geometric")], by[("l1", "geometric_slow")]
            line = (
                f"explicit L1, same ∫α dt, decay {cfg['slow_factor']}x slower: rel. error "
                f"{f['rel_error_mean']:.1e} (fast) vs {sl['rel_error_mean']:.1e} (slow)"
            )
            if _reached(sl) and not _reached(f):
                line += (": the slowly decaying α follows the LASSO path down to λ → 0 (whose end is the "
                         "minimum-L1 interpolator, here x*); the fast one freezes a point off it")
            lines.append(line)
    return lines


def plot(out: dict, cfg: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(out["curve_time"], dtype=float)
    methods = [m for m in METHODS if m in cfg["methods"]]
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4.2), sharey=True, squeeze=False)
    colors = {"constant": "C0", "geometric": "C3", "geometric_slow": "C4", "harmonic": "C2", "quadratic": "C1"}
    for ax, method in zip(axes[0], methods):
        for r in out["runs"]:
            if r["method"] != method:
                continue
            logc = np.log10(np.maximum(np.asarray(r["curve_rel_error"]), 1e-12))   # (S, T)
            mean, std = logc.mean(0), logc.std(0)
            col = colors.get(r["schedule"])
            ax.plot(t, 10 ** mean, color=col, lw=1.5,
                    label=f"{r['schedule']} (α0={r['alpha_start']:.3g}, ∫α={r['alpha_integral']:.3g})")
            ax.fill_between(t, 10 ** (mean - std), 10 ** (mean + std), color=col, alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_title(METHOD_LABELS[method])
        ax.set_xlabel("time (steps × lr)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("‖x − x*‖ / ‖x*‖  (geometric mean ± 1 sd over seeds)")
    fig.suptitle(
        f"Diagonal linear network: n={cfg['n']}, d={cfg['d']}, ‖x*‖₀={cfg['k']}, "
        f"{cfg['seeds']} seeds, lr={cfg['lr']:g}, {cfg['steps']} steps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="PILoT / spred / explicit L1 on the paper's diagonal linear network.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    D = DEFAULTS
    ap.add_argument("--seeds", type=int, default=D["seeds"], help="initializations per (method, schedule)")
    ap.add_argument("--steps", type=int, default=None, help=f"gradient steps (default {D['steps']}; {QUICK['steps']} with --quick)")
    ap.add_argument("--lr", type=float, default=D["lr"], help="step size (the paper: 1e-4)")
    ap.add_argument("--alpha", type=float, default=D["alpha"], help="constant α for m⊙w (pilot and spred)")
    ap.add_argument("--alpha0", type=float, default=D["alpha0"], help="starting α of the decaying schedules, m⊙w")
    ap.add_argument("--l1-alpha", type=float, default=D["l1_alpha"], help="constant α of the explicit α‖x‖₁")
    ap.add_argument("--l1-alpha0", type=float, default=D["l1_alpha0"], help="starting α of the decaying schedules, explicit L1")
    ap.add_argument("--p", type=float, default=D["p"], help="ratio of the geometric schedules")
    ap.add_argument("--period", type=int, default=D["period"], help="optimizer steps per schedule period")
    ap.add_argument("--slow-factor", type=int, default=D["slow_factor"],
                    help="geometric_slow: period × this and α0 / this (same ∫α dt as geometric)")
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(DEFAULT_SCHEDULES))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--n", type=int, default=D["n"], help="features")
    ap.add_argument("--d", type=int, default=D["d"], help="samples")
    ap.add_argument("--k", type=int, default=D["k"], help="nonzeros of x*")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the regression problem")
    ap.add_argument("--resample-data", action="store_true",
                    help="a fresh problem per seed (default: one problem, several inits, as the paper)")
    ap.add_argument("--tol", type=float, default=D["tol"], help="|x| below this counts as 0")
    ap.add_argument("--curve-points", type=int, default=500, help="points kept per curve (plot and JSON)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, metavar="PATH", help="write config, final metrics and curves here")
    ap.add_argument("--out-dir", default="outputs", help="where diagonal_linear.png goes")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK['steps']} steps (for tests)")
    args = ap.parse_args(argv)
    if args.seeds < 1 or (args.steps is not None and args.steps < 1) or args.period < 1 or args.slow_factor < 1:
        ap.error("--seeds, --steps, --period and --slow-factor must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    cfg.update(
        steps=args.steps if args.steps is not None else (QUICK["steps"] if args.quick else DEFAULTS["steps"]),
        schedules=list(dict.fromkeys(args.schedules)),
        methods=list(dict.fromkeys(args.methods)),
        data_seed=args.data_seed,
        resample_data=args.resample_data,
        curve_points=args.curve_points,
        device=args.device,
        quick=bool(args.quick),
    )
    cfg["horizon_time"] = cfg["steps"] * cfg["lr"]

    # The tensors are tiny: on CPU one thread avoids threading overhead that dominated
    # every op in our measurements (~20x slower on 2 busy cores).  Restored afterwards.
    threads = torch.get_num_threads()
    if torch.device(cfg["device"]).type == "cpu":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        out = train(cfg, progress=not args.no_progress)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0

    print(
        f"\nDiagonal linear network: n={cfg['n']}, d={cfg['d']}, ‖x*‖₀={cfg['k']}, {cfg['seeds']} seeds, "
        f"lr={cfg['lr']:g}, {cfg['steps']} steps (time {cfg['horizon_time']:g}); schedules stepped every "
        f"{cfg['period']} steps (geometric_slow: {cfg['period'] * cfg['slow_factor']}), p={cfg['p']}; "
        f"|x| < {cfg['tol']:g} counts as 0"
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
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"json: {args.json}")
    return result


if __name__ == "__main__":
    main()
