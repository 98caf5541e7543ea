"""The accuracy-vs-sparsity sweep: rows, the export choice, table, JSON and plot (shared by
train.py and compare_methods.py)."""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Optional, Sequence

from checkpoint import atomic_write

# Finer than spred's 1 − 10^(−c) list in the range that matters, and including it.
DEFAULT_SWEEP = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999,
                 0.9999, 0.99999, 0.999999)


def sweep_rows(results: Iterable[tuple[float, float, dict[str, float]]]) -> list[dict[str, float]]:
    """``pilot_kernels.sparsity.sweep`` output (``fn`` returning an eval dict) as rows."""
    return [{"target": s, "sparsity": measured, "top1": r["top1"], "top5": r["top5"], "loss": r["loss"]}
            for s, measured, r in results]


def best_within(rows: Sequence[dict[str, float]], drop: float = 1.0) -> Optional[dict[str, float]]:
    """The sparsest row whose top-1 is at most ``drop`` points below the unpruned row's
    (the paper's selection: "the level just before the accuracy drops 1%")."""
    if not rows:
        return None
    base = rows[0]["top1"]
    ok = [r for r in rows if r["top1"] >= base - drop]
    return max(ok, key=lambda r: r["sparsity"]) if ok else None


def chance_top1(num_classes: int, images: int) -> tuple[float, float]:
    """Top-1 (%) of guessing among ``num_classes`` classes, and the most a guessing model
    scores on ``images`` validation images within 3 binomial standard deviations."""
    p = 1.0 / num_classes
    return 100 * p, 100 * (p + 3 * math.sqrt(p * (1 - p) / max(images, 1)))


def choose_export(rows: Sequence[dict[str, float]], num_classes: int, images: int, target: Optional[float] = None,
                  export_sparsity: Optional[float] = None, drop: float = 1.0) -> dict[str, Any]:
    """The sweep point the run exports, and why.

    ``rows``: :func:`sweep_rows`, the unpruned model first.  ``target`` (``--target-sparsity
    S``, a sweep point) is exported when it is "met": top-1 at ``S`` within ``drop`` points
    of the unpruned top-1, on a model above chance that keeps a weight.  Otherwise, and
    without a target, the sparsest sweep point within ``drop`` points is exported
    (``export_sparsity`` overrides that where there is no target).  Nothing is exported
    when the unpruned model is no better than chance (:func:`chance_top1` on ``images``
    images), or keeps no nonzero weight: a chance-level model is never exported.

    Returns ``sparsity`` (``None``: no export), ``reason``, ``skipped`` (why nothing is
    exported, or ``None``), ``pick`` (the sparsest row within ``drop`` points) and
    ``target`` (``sparsity``, ``top1`` and ``reached`` at ``S``, ``top1_unpruned``, ``met``).
    """
    unpruned = rows[0]
    # A model without a single nonzero weight is not a model, however it scores.
    pick = best_within([r for r in rows if r["sparsity"] < 1.0], drop) if unpruned["sparsity"] < 1.0 else None
    out: dict[str, Any] = {"sparsity": None, "reason": None, "skipped": None, "pick": pick, "target": None}
    guess, bound = chance_top1(num_classes, images)
    if target is not None:  # met: a model at S, above chance, within drop points of unpruned
        at = next(r for r in rows if r["target"] == target)
        out["target"] = {"sparsity": target, "top1": at["top1"], "top1_unpruned": unpruned["top1"],
                         "reached": at["sparsity"], "met": pick is not None and unpruned["top1"] > bound
                         and at["sparsity"] < 1.0 and at["top1"] >= unpruned["top1"] - drop}
    if unpruned["top1"] <= bound:
        out["skipped"] = (f"the unpruned model is no better than chance (top-1 {unpruned['top1']:.2f}%; guessing "
                          f"among {num_classes} classes scores {guess:.2f}%, up to {bound:.2f}% on {images} "
                          "images). Train longer, or with a smaller --alpha or --lr")
    elif pick is None:
        out["skipped"] = "the unpruned model has no nonzero weight in its tensors with ndim >= 2; give a smaller --alpha"
    elif target is not None and out["target"]["met"]:
        out["sparsity"], out["reason"] = target, f"the target sparsity: top-1 there is within {drop:g} point of unpruned"
    elif target is not None:
        out["sparsity"] = pick["target"]
        out["reason"] = (f"the sparsest sweep point within {drop:g} point of unpruned: top-1 at the target sparsity "
                         f"{target:g} is more than {drop:g} point below unpruned")
    elif export_sparsity is not None:
        out["sparsity"], out["reason"] = export_sparsity, "--export-sparsity"
    else:
        out["sparsity"], out["reason"] = pick["target"], f"the sparsest sweep point within {drop:g} point of unpruned"
    return out


def format_table(rows: Sequence[dict[str, float]], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'target':>9}  {'sparsity':>9}  {'remaining':>10}  {'top-1':>7}  {'top-5':>7}")
    for r in rows:
        remaining = 1.0 - r["sparsity"]
        lines.append(f"{100 * r['target']:>8.4f}%  {100 * r['sparsity']:>8.4f}%  {100 * remaining:>9.4f}%  "
                     f"{r['top1']:>6.2f}%  {r['top5']:>6.2f}%")
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON, written atomically; non-finite floats become ``null``."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    with atomic_write(path, "w") as f:
        json.dump(clean(payload), f, indent=2)
        f.write("\n")


def plot_sweeps(path: str, series: dict[str, Sequence[dict[str, float]]], title: str = "",
                bands: Optional[dict[str, tuple[Sequence[float], Sequence[float]]]] = None,
                target: Optional[float] = None) -> None:
    """Top-1 vs sparsity, one line per series; x axis in ``-log10(1 - sparsity)`` so the
    high-sparsity end is readable (ticks labelled in percent).  ``bands`` (name →
    (low, high) per row) draws a shaded range, e.g. min/max over seeds; ``target`` (a
    fraction, ``--target-sparsity``) a dashed vertical line at that sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xpos(s: float) -> float:
        return -math.log10(max(1.0 - s, 1e-7))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in series.items():
        xs = [xpos(r["sparsity"]) for r in rows]
        ys = [r["top1"] for r in rows]
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=name)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    if target is not None:
        ax.axvline(xpos(target), color="0.3", ls="--", lw=1, label=f"target {100 * target:g}%")
    top = max((r["sparsity"] for rows in series.values() for r in rows), default=0.0)
    ticks = [t for t in (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 0.99999, 0.999999)
             if t <= top + 1e-9]
    ax.set_xticks([xpos(t) for t in ticks])
    ax.set_xticklabels([f"{100 * t:g}%" for t in ticks], rotation=45)
    ax.set_xlabel("sparsity (fraction of weights pruned by magnitude, no fine-tuning)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
