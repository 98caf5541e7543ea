#!/usr/bin/env python
"""Accuracy vs. sparsity of the sparsification methods: embedded digits, target sparsities, a generalization matrix.

Every method trains the default ``digits_cnn`` (61 k parameters) on scikit-learn's
handwritten digits with ``train.py`` beside this script (same data, schedule, epochs and
seeds), then the weights are pruned one-shot by global magnitude to each sparsity, without
fine-tuning, and evaluated on the 360 held-out images (the paper's one-shot evaluation,
appendix C.2):

==================  ==========================================================
dense               SGD, no pruning (the reference accuracy)
magnitude pruning   the dense models above, pruned one-shot at each sparsity
l1                  SGD + explicit L1 subgradient ``α·sign(x)``
spred               ``x = m ⊙ w``, balanced init (β = 0), constant α
pilot init only     PILoT's init (β = 1) with a constant α: the split, no schedule
pilot               PILoT: β = 1 and the adaptive α of Algorithm 1
==================  ==========================================================

α of each method is the one ``train.py`` uses by default (picked per method on a small
grid, seed 0, as the sparsest model within 1 point of its own unpruned accuracy);
"pilot init only" reuses PILoT's α.  Runs go in parallel, one thread each.

    python python/classification/compare_methods.py                 # 3 seeds, ~5-8 min on 2 cores
    python python/classification/compare_methods.py --seeds 0 --epochs 5 --out /tmp/cmp   # smoke

Writes ``compare_methods_embedded.{json,md,png}`` into ``--out``
(default ``benchmarks/results``).

Target mode: accuracy at a sparsity chosen before training
--------------------------------------------------------

``--target-sparsity 0.9,0.95,0.98,0.99`` asks a different question: given the sparsity
``S`` you will deploy at, which method gives the best model at ``S``?  Each method is
trained *aimed at* each ``S`` (``train.py --target-sparsity S``: the trainer steers α
with :class:`pilot_kernels.schedules.TargetSparsity`, so no α is picked by hand), then
pruned one-shot to ``S`` and evaluated.  One training per method, target and seed:

======================  ====================================================
pilot                   ``--method pilot --target-sparsity S`` (β = 1)
spred                   ``--method spred --target-sparsity S`` (β = 0)
l1                      ``--method l1 --target-sparsity S`` (α of ``α·sign(x)``)
magnitude pruning       one dense training per seed, pruned one-shot to every ``S``
                        (the baseline: no sparsity-aware training at all)
dense, unpruned         the same dense trainings, not pruned (a reference line)
======================  ====================================================

    python python/classification/compare_methods.py --target-sparsity 0.9,0.95,0.98,0.99
    python python/classification/compare_methods.py --target-sparsity 0.9,0.99 --seeds 0 --epochs 3 --out /tmp/cmp

With 3 seeds and 4 targets that is 3·(3·4 + 1) = 39 trainings of 40 epochs, about
20 min on two otherwise idle cores (the sweep mode's 15 trainings took 7.2 min; one
40-epoch target run took 86–154 s with the cores shared by other work).  Writes
``compare_methods_target.{json,md,png}``: per method and target the mean top-1 at ``S``
with its min–max over seeds, the sparsity the exported model reached, the best method
per target (and whether its lead exceeds the seeds' spread), and a plot of top-1 at
``S`` against ``S`` with min–max bands and the dense unpruned accuracy as a line.

Matrix mode: does it generalize?
--------------------------------

``--matrix [PRESET]`` (issue 19) trains pilot, spred and l1 aimed at each target and one
dense model per cell, pruned by global and by layer-wise magnitude, over data × image
size × model × step budget, the way a new user would run ``train.py`` (see
``matrix.py`` beside this script for what a cell is and ``docs/generalization.md`` for
results and timings).  Presets: ``full`` (the whole matrix), ``short`` (its 300-step
budget), ``slice`` (digits at 32 px, three models, 90%), ``smoke`` (CI); ``--datasets``,
``--sizes``, ``--archs``, ``--budgets``, ``--target-sparsity``, ``--methods`` and
``--seeds`` narrow a preset.  ``--dry-run`` prints the plan with a time estimate measured
on this machine.  The JSON and table are rewritten after every finished training.

    python python/classification/compare_methods.py --matrix --dry-run
    python python/classification/compare_methods.py --matrix slice --keep-runs runs/matrix

Writes ``compare_methods_matrix_<PRESET>.{json,md,png}``.

Both modes take ``--dataset NAME`` (passed to ``train.py``); for a dataset other than
the default ``digits`` the file names end in ``_NAME``, e.g.
``compare_methods_target_mnist.json``.  ``--jobs`` runs that many trainings at once
(default: one per CPU core), each with one thread; a line per finished run shows the
progress.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TRAIN = HERE / "train.py"
# This checkout's pilot_kernels, the one the train.py runs get (_train_env), so that the
# environment recorded with the results names the code that produced them.
sys.path.insert(1, str(ROOT))
sys.path.insert(2, str(ROOT / "benchmarks"))  # envinfo, beside the benchmarks

from envinfo import environment  # noqa: E402
from checkpoint import atomic_write  # noqa: E402
from report import best_within, plot_sweeps, write_json  # noqa: E402
import matrix as mx  # noqa: E402

SPARSITIES = [0.0, 0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995]
TABLE_AT = [0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]
DEFAULT_DATASET = "digits"  # train.py's embedded default

# name -> (train.py flags, label); α values are train.py's embedded defaults, spelled out.
# The α schedules too: train.py's no-flag pilot run trains for 98% sparsity (the target
# mode); this sweep compares the adaptive α, so "pilot" names it (and "pilot_init" its
# constant α), which keeps the target mode off.
CONFIGS: dict[str, tuple[list[str], str]] = {
    "dense": (["--method", "dense"], "dense SGD (wd 1e-4)"),
    "l1": (["--method", "l1", "--alpha", "5e-3"], "SGD + 5e-3·sign(x)"),
    "spred": (["--method", "spred", "--alpha", "1e-2"], "β=0, constant α=1e-2"),
    "pilot_init": (["--method", "pilot", "--alpha-schedule", "constant", "--alpha", "2e-2"], "β=1, constant α=2e-2"),
    "pilot": (["--method", "pilot", "--alpha-schedule", "adaptive", "--alpha", "2e-2", "--l1-threshold", "250"],
              "β=1, adaptive α0=2e-2, δ=1.01, K=250"),
}
ROW_NAMES = {"dense": "dense", "magnitude": "magnitude pruning (of dense)", "l1": "l1", "spred": "spred",
             "pilot_init": "pilot init only (constant α)", "pilot": "pilot"}

# Target mode: α is the trainer's business (--target-sparsity), so only the method is given.
# "dense" is trained once per seed and supplies both the magnitude-pruning baseline and the
# unpruned reference.
TARGET_CONFIGS: dict[str, tuple[list[str], str]] = {
    "dense": (["--method", "dense"], "dense SGD, pruned one-shot to S"),
    "l1": (["--method", "l1"], "SGD + α·sign(x), α steered to S"),
    "spred": (["--method", "spred"], "β=0, α steered to S"),
    "pilot": (["--method", "pilot"], "β=1, α steered to S"),
}
TARGET_ORDER = ["pilot", "spred", "l1", "magnitude"]  # table rows and plot lines
TARGET_ROW_NAMES = {"pilot": "pilot", "spred": "spred", "l1": "l1",
                    "magnitude": "magnitude pruning (of dense)", "dense": "dense, unpruned"}


def _train_env() -> dict[str, str]:
    # One thread per run: the runs themselves are the parallelism (--jobs of them at once).
    # ROOT first on the path: train.py (run as a script) imports this checkout's pilot_kernels,
    # the one this process runs, not whichever checkout is pip-installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}


def _dataset_flags(dataset: Optional[str]) -> list[str]:
    # Passed only when asked for, so the default command line is the one train.py always took.
    return ["--dataset", dataset] if dataset else []


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _run_train(flags: list[str], out: Path, what: str) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """One ``train.py`` process with ``flags`` into ``out`` (quiet, overwriting: --keep-runs
    may hold an earlier run); returns its ``sweep.json``, its ``metrics.jsonl`` records and
    the wall time.  A failed run raises, naming ``what``, the exit code and the output's tail."""
    cmd = [sys.executable, str(TRAIN), *flags, "--no-progress", "--print-freq", "0", "--overwrite",
           "--output-dir", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_train_env(), cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): "
                           f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads((out / "sweep.json").read_text()), _metrics(out), time.perf_counter() - t0


def run_one(config: str, seed: int, epochs: int, workdir: Path, dataset: Optional[str] = None) -> dict[str, Any]:
    flags, _ = CONFIGS[config]
    sweep, metrics, wall = _run_train(
        [*flags, *_dataset_flags(dataset), "--epochs", str(epochs), "--seed", str(seed),
         "--sweep-sparsities", ",".join(f"{s:g}" for s in SPARSITIES)],
        workdir / f"{config}-seed{seed}", f"{config} seed {seed}")
    last = metrics[-1]
    return {"config": config, "seed": seed, "rows": sweep["rows"], "wall_s": wall,
            "final_train_acc": last["train"]["acc"], "final_alpha": last["alpha"], "final_l1": last["l1"],
            "arch": sweep.get("arch"), "val_images": last["val"].get("images")}


def run_all(jobs: Sequence[Any], fn: Callable[[Any], dict[str, Any]], describe: Callable[[Any, dict[str, Any]], str],
            workers: int, print_fn: Callable[[str], None] = print,
            on_done: Optional[Callable[[list, list], None]] = None) -> tuple[list[Optional[dict[str, Any]]], list[str]]:
    """``fn`` over ``jobs`` on ``workers`` threads (each starts one training process).

    Returns the results in the order of ``jobs`` (None where ``fn`` raised) and the
    failures' messages; prints one line per finished run with a time estimate, because a
    full comparison runs for a quarter of an hour or more.  ``on_done(results, failures)``
    is called after each finished run (the matrix writes its results so far)."""
    results: list[Optional[dict[str, Any]]] = [None] * len(jobs)
    failures: list[str] = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        for done, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            try:
                results[i] = fut.result()
                what = describe(jobs[i], results[i])
            except Exception as e:  # noqa: BLE001 - reported, and the other runs still count
                failures.append(f"{jobs[i]}: {e}")
                what = f"{jobs[i]} FAILED: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            elapsed = time.perf_counter() - t0
            left = elapsed / done * (len(jobs) - done)
            print_fn(f"[{done:>{len(str(len(jobs)))}}/{len(jobs)}] {what} | {elapsed / 60:.1f} min elapsed, "
                     f"~{left / 60:.1f} min left")
            if on_done is not None:
                on_done(results, failures)
    return results, failures


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean/min/max top-1 at each sparsity over seeds."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    out: dict[str, Any] = {}
    for name in ["dense", "magnitude", "l1", "spred", "pilot_init", "pilot"]:
        src = by.get("dense" if name in ("dense", "magnitude") else name)
        if not src:
            continue
        rows = []
        for i, s in enumerate(SPARSITIES):
            accs = [r["rows"][i]["top1"] for r in src]
            rows.append({"target": s, "sparsity": statistics.mean(r["rows"][i]["sparsity"] for r in src),
                         "top1": statistics.mean(accs), "min": min(accs), "max": max(accs),
                         "std": statistics.pstdev(accs), "top5": statistics.mean(r["rows"][i]["top5"] for r in src)})
        if name == "dense":
            rows = rows[:1]
        within = [best_within(r["rows"])["sparsity"] for r in src]  # row 0 (unpruned) always qualifies
        out[name] = {"rows": rows, "seeds": [r["seed"] for r in src], "best_within_1pt": within,
                     "label": CONFIGS["dense" if name == "magnitude" else name][1] if name != "magnitude"
                     else "the dense runs, pruned one-shot"}
    return out


def _leaders(summary: dict[str, Any]) -> list[str]:
    out = []
    for t in TABLE_AT:
        cands = [(v["rows"][SPARSITIES.index(t)]["top1"], ROW_NAMES[k]) for k, v in summary.items() if k != "dense"]
        best = max(c[0] for c in cands)
        names = " = ".join(n for a, n in cands if abs(a - best) < 1e-9)
        out.append(f"{100 * t:g}%: {names} {best:.1f}")
    return out


def _alpha_note(runs: list[dict[str, Any]]) -> str:
    ends = [r["final_alpha"] / float(CONFIGS["pilot"][0][CONFIGS["pilot"][0].index("--alpha") + 1])
            for r in runs if r["config"] == "pilot"]
    if not ends:
        return ""
    return (f"With this short schedule the adaptive α of Algorithm 1 grows only while Σ|x| > K (the first "
            f"epochs) and then decays by 1/δ per epoch, ending at {statistics.mean(ends):.2f}× its start, so "
            f"\"pilot\" and \"pilot init only\" (constant α) are close by construction.")


def _data_line(dataset: str, runs: list[dict[str, Any]], epochs: int) -> str:
    """What was trained on, as far as the run records tell (the digits text is the measured one)."""
    if dataset == DEFAULT_DATASET:
        return (f"model `digits_cnn` (61 k parameters, 60,688 in conv/linear weights), scikit-learn digits upscaled to "
                f"16×16, 1,437 train / 360 val images, {epochs} epochs")
    arch = next((r.get("arch") for r in runs if r.get("arch")), None)
    images = next((r.get("val_images") for r in runs if r.get("val_images")), None)
    return (f"dataset `{dataset}`" + (f", model `{arch}`" if arch else "")
            + (f", {images:,} val images" if images else "") + f", {epochs} epochs")


def markdown(summary: dict[str, Any], args, wall: float, env_line: str, runs: list[dict[str, Any]]) -> str:
    dataset = getattr(args, "dataset", None) or DEFAULT_DATASET
    digits = dataset == DEFAULT_DATASET
    head = "| method | setting | unpruned | " + " | ".join(f"{100 * s:g}%" for s in TABLE_AT) + " | sparsest ≤1 pt drop |"
    images = next((r.get("val_images") for r in runs if r.get("val_images")), None) or (360 if digits else None)
    per_image = f" (one image = {100 / images:.2g} points)" if images else ""
    lines = [
        "# Accuracy vs. sparsity on the embedded digits data" if digits else f"# Accuracy vs. sparsity on {dataset}",
        "",
        f"`python python/classification/compare_methods.py --seeds {','.join(map(str, args.seeds))} --epochs {args.epochs}"
        f"{'' if digits else ' --dataset ' + dataset}` — "
        f"{_data_line(dataset, runs, args.epochs)}, batch 64, lr 0.1 (2 warmup epochs + cosine), "
        f"momentum 0.9. Sparsity = fraction of conv/linear weights pruned by one global magnitude ranking, "
        f"no fine-tuning. Top-1 on the {'360 ' if digits else ''}val images{per_image}: mean over "
        f"{len(args.seeds)} seeds, min–max in brackets. {env_line}; total wall time {wall / 60:.1f} min.",
        "",
        head,
        "|" + "---|" * (len(TABLE_AT) + 4),
    ]
    for name, s in summary.items():
        rows = {r["target"]: r for r in s["rows"]}
        base = rows[0.0]

        def cell(r):
            return f"{r['top1']:.1f} [{r['min']:.1f}–{r['max']:.1f}]" if len(s["seeds"]) > 1 else f"{r['top1']:.1f}"

        if name == "dense":
            cells = ["–"] * len(TABLE_AT)
            within = "–"
        else:
            cells = [cell(rows[t]) for t in TABLE_AT]
            within = ", ".join(f"{100 * w:.1f}%" for w in s["best_within_1pt"])
        lines.append(f"| {ROW_NAMES[name]} | {s['label']} | {cell(base)} | " + " | ".join(cells) + f" | {within} |")
    lines += [
        "",
        "\"sparsest ≤1 pt drop\" is per seed: the largest swept sparsity whose top-1 is at most one point below "
        "that run's own unpruned top-1 (the paper's selection rule).",
        "",
        "Best mean top-1 per sparsity (this run): " + "; ".join(_leaders(summary)) + ".",
        "",
    ]
    if digits:
        lines.append(
            "Reading it: on a problem this small and easy (ten classes, 360 val images, one image = 0.28 points) "
            "the differences between the sparsifying methods are a few images and not a ranking; the paper's "
            "claims concern ResNets on CIFAR/ImageNet. What the table does show is the effect all of them share: "
            "the dense model cannot be pruned one-shot much beyond 50 %, while every regularized model keeps its "
            "accuracy to ~97 %. " + _alpha_note(runs) + "")
    else:
        lines.append(_alpha_note(runs))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- target mode
def _env_line(env: dict[str, Any]) -> str:
    """The one-line machine summary printed under each results table."""
    return f"CPU: {env.get('cpu', env.get('platform'))}, {env.get('cpu_count')} cores"


def _stem(out: Path, kind: str, dataset: Optional[str]) -> Path:
    """``compare_methods_<kind>[_<dataset>]``: the default data keeps the unsuffixed names."""
    name = f"compare_methods_{kind}"
    if dataset and dataset != DEFAULT_DATASET:
        name += f"_{dataset}"
    return out / name


def _write_results(args, kind: str, payload: dict[str, Any]) -> Path:
    """``payload`` with the environment into ``<--out>/compare_methods_<kind>[_<dataset>].json``;
    returns the file's stem (the .md and .png go beside it)."""
    env = environment("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(out, kind, args.dataset)
    write_json(str(stem) + ".json", {"environment": env, "env_line": _env_line(env), **payload})
    return stem


def _run_dir(workdir: Path, method: str, target: Optional[float], seed: int) -> Path:
    return workdir / (f"dense-seed{seed}" if method == "dense" else f"{method}-S{target:g}-seed{seed}")


def run_target(method: str, target: Optional[float], seed: int, epochs: int, workdir: Path,
               dataset: Optional[str], targets: Sequence[float], extra_flags: Sequence[str] = ()) -> dict[str, Any]:
    """One training of target mode.  ``method == "dense"`` (``target`` None) is the plain
    dense run, swept at every target for the magnitude-pruning baseline; any other method is
    trained with ``--target-sparsity target`` and read from ``sweep.json``'s ``"target"``
    entry (``sparsity``, ``top1`` at it, ``top1_unpruned``, ``reached``).  ``extra_flags``
    go to ``train.py`` too (the matrix mode's data, model and schedule)."""
    flags, _ = TARGET_CONFIGS[method]
    common = [*_dataset_flags(dataset), *extra_flags, "--epochs", str(epochs), "--seed", str(seed)]
    out = _run_dir(workdir, method, target, seed)
    if method == "dense":
        extra = ["--sweep-sparsities", ",".join(f"{s:g}" for s in [0.0, *targets])]
    else:
        extra = ["--target-sparsity", f"{target:g}"]
    sweep, metrics, wall = _run_train([*flags, *common, *extra], out, f"{method} S={target} seed {seed}")
    last = metrics[-1]
    rec: dict[str, Any] = {"method": method, "target": target, "seed": seed, "wall_s": wall,
                           "final_train_acc": last["train"]["acc"], "arch": sweep.get("arch"),
                           "val_images": last["val"].get("images"), "output_dir": str(out)}
    if method == "dense":
        rec.update(rows=sweep["rows"], top1_unpruned=sweep["rows"][0]["top1"])
        return rec
    got = sweep.get("target")
    if not isinstance(got, dict) or any(k not in got for k in ("top1", "top1_unpruned", "reached")):
        raise RuntimeError(f"{out / 'sweep.json'} has no complete \"target\" entry (got {got!r}); "
                           f"train.py must write sparsity, top1, top1_unpruned and reached under --target-sparsity")
    if got["top1"] is None:
        raise RuntimeError(f"{method} S={target:g} seed {seed}: no accuracy at S "
                           f"({sweep.get('export_skipped') or 'train.py gave none'})")
    rec.update(top1=got["top1"], top1_unpruned=got["top1_unpruned"], reached=got["reached"],
               alpha=[m.get("alpha") for m in metrics], share=[m.get("share") for m in metrics])
    return rec


def _describe_target(job: tuple[str, Optional[float], int], rec: dict[str, Any]) -> str:
    method, target, seed = job
    if method == "dense":
        return f"dense seed {seed}: unpruned top-1 {rec['top1_unpruned']:.2f}%, {rec['wall_s']:.0f} s"
    return (f"{method} S={target:g} seed {seed}: top-1 {rec['top1']:.2f}% at S (reached "
            f"{100 * rec['reached']:.2f}%, unpruned {rec['top1_unpruned']:.2f}%), {rec['wall_s']:.0f} s")


def _stats(xs: Sequence[float], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}mean": statistics.mean(xs), f"{prefix}min": min(xs), f"{prefix}max": max(xs),
            f"{prefix}std": statistics.pstdev(xs)}


def _dense_row(rec: dict[str, Any], target: float) -> dict[str, Any]:
    for row in rec["rows"]:
        if math.isclose(row["target"], target, rel_tol=0, abs_tol=1e-9):
            return row
    raise ValueError(f"dense seed {rec['seed']} has no sweep row at {target:g} "
                     f"(rows at {[r['target'] for r in rec['rows']]})")


def _share_end(pts: Sequence[dict[str, Any]]) -> Optional[float]:
    """Mean over runs of the last logged share (the L1 share pruning to S would remove): at
    or below the controller's τ the run got where it aimed; None for runs without one."""
    ends = [next((v for v in reversed(p.get("share") or []) if v is not None), None) for p in pts]
    ends = [e for e in ends if e is not None]
    return statistics.mean(ends) if ends else None


def summarize_target(runs: Sequence[dict[str, Any]], targets: Sequence[float]) -> dict[str, Any]:
    """Per method (``pilot``, ``spred``, ``l1``, ``magnitude``) one row per target:
    ``top1`` mean/min/max/std over the seeds that ran, ``reached`` (the exported model's
    measured sparsity) likewise, ``top1_unpruned`` and ``share_end`` (the last logged
    share, see :func:`_share_end`) means and ``n`` seeds; ``dense`` is the
    unpruned accuracy of the dense trainings (mean/min/max/std).  ``magnitude`` reads the
    dense trainings' sweep at each target."""
    dense = sorted((r for r in runs if r["method"] == "dense"), key=lambda r: r["seed"])
    out: dict[str, Any] = {}
    for name in TARGET_ORDER:
        rows = []
        for t in targets:
            if name == "magnitude":
                pts = [{"top1": _dense_row(r, t)["top1"], "reached": _dense_row(r, t)["sparsity"],
                        "top1_unpruned": r["top1_unpruned"], "seed": r["seed"]} for r in dense]
            else:
                pts = sorted((r for r in runs if r["method"] == name and math.isclose(r["target"], t, abs_tol=1e-9)),
                             key=lambda r: r["seed"])
            if not pts:
                continue
            rows.append({"target": t, "n": len(pts), "seeds": [p["seed"] for p in pts],
                         **{("top1" if k == "mean" else k): v for k, v in _stats([p["top1"] for p in pts]).items()},
                         **_stats([p["reached"] for p in pts], "reached_"),
                         "top1_unpruned": statistics.mean(p["top1_unpruned"] for p in pts),
                         "share_end": _share_end(pts)})
        if rows:
            for r in rows:
                r["reached"] = r.pop("reached_mean")
            label = TARGET_CONFIGS["dense" if name == "magnitude" else name][1]
            out[name] = {"label": label, "rows": rows}
    if dense:
        accs = [r["top1_unpruned"] for r in dense]
        out["dense"] = {"label": "the dense trainings, not pruned", "seeds": [r["seed"] for r in dense],
                        **{("top1" if k == "mean" else k): v for k, v in _stats(accs).items()}}
    return out


def target_winners(summary: dict[str, Any], targets: Sequence[float],
                   val_images: Optional[int] = None) -> list[dict[str, Any]]:
    """Per target: the method with the best mean top-1 at S, the runner-up, the margin, and
    whether the lead is clear, i.e. the winner's worst seed beats every other method's best
    seed (with one seed there is no spread, so nothing is called clear)."""
    out = []
    for t in targets:
        cands = []
        for name in TARGET_ORDER:
            row = next((r for r in summary.get(name, {}).get("rows", []) if math.isclose(r["target"], t, abs_tol=1e-9)), None)
            if row is not None:
                cands.append((name, row))
        if not cands:
            continue
        cands.sort(key=lambda c: -c[1]["top1"])
        best_name, best = cands[0]
        tied = [n for n, r in cands if abs(r["top1"] - best["top1"]) < 1e-9]
        entry: dict[str, Any] = {"target": t, "best": tied, "top1": best["top1"], "min": best["min"],
                                 "max": best["max"], "n": best["n"]}
        others = [(n, r) for n, r in cands if n not in tied]
        if others:
            ru_name, ru = others[0]
            margin = best["top1"] - ru["top1"]
            entry.update(runner_up=ru_name, runner_up_top1=ru["top1"], margin=margin,
                         clear=len(tied) == 1 and best["n"] > 1 and all(best["min"] > r["max"] for _, r in others))
            if val_images:
                entry["margin_images"] = margin * val_images / 100.0
        else:
            entry.update(runner_up=None, margin=None, clear=False)
        out.append(entry)
    return out


def _winner_line(w: dict[str, Any]) -> str:
    names = " = ".join(TARGET_ROW_NAMES[n] for n in w["best"])
    spread = f" [{w['min']:.1f}–{w['max']:.1f}]" if w["n"] > 1 else ""
    line = f"- {100 * w['target']:g}%: **{names}** {w['top1']:.1f}{spread}"
    if w.get("runner_up") is None:
        return line + (" (tied with every other method)" if len(w["best"]) > 1 else " (the only method)")
    imgs = f" ≈ {w['margin_images']:.1f} val images" if "margin_images" in w else ""
    line += (f", ahead of {TARGET_ROW_NAMES[w['runner_up']]} ({w['runner_up_top1']:.1f}) by "
             f"{w['margin']:.2f} points{imgs}")
    if w["n"] <= 1:
        return line + "; one seed, so no spread to judge it against."
    if w["clear"]:
        return line + "; clear: its worst seed beats every other method's best seed."
    return line + "; not clear: the seeds' min–max ranges overlap."


def markdown_target(data: dict[str, Any]) -> str:
    a = data["args"]
    targets, summary, runs = data["targets"], data["summary"], data["runs"]
    dataset = a.get("dataset") or DEFAULT_DATASET
    digits = dataset == DEFAULT_DATASET
    n_seeds = len(a["seeds"])
    images = next((r.get("val_images") for r in runs if r.get("val_images")), None)
    cmd = (f"python python/classification/compare_methods.py --target-sparsity {','.join(f'{t:g}' for t in targets)} "
           f"--seeds {','.join(map(str, a['seeds']))} --epochs {a['epochs']}"
           + ("" if digits else f" --dataset {dataset}"))
    bracket = ", min–max over seeds in brackets" if n_seeds > 1 else ""
    lines = [
        f"# Accuracy at a target sparsity on {'the embedded digits data' if digits else dataset}",
        "",
        f"`{cmd}` — {_data_line(dataset, runs, a['epochs'])}. Each sparsifying method is trained *aimed at* "
        f"the target S (`train.py --target-sparsity S` steers α; no α picked by hand), one training per "
        f"method, target and seed; then every model is pruned one-shot to S by one global magnitude ranking "
        f"of the conv/linear weights, without fine-tuning. Magnitude pruning prunes one dense training per seed "
        f"to every S. Top-1 on the val images" + (f" (one image = {100 / images:.2g} points)" if images else "")
        + f": mean over {n_seeds} seed{'s' if n_seeds > 1 else ''}{bracket}. {data['env_line']}; "
        f"total wall time {data['wall_s'] / 60:.1f} min ({len(runs)} trainings, {a.get('jobs', '?')} at a time).",
        "",
        "Top-1 (%) at the target sparsity:",
        "",
        "| method | setting | " + " | ".join(f"S = {100 * t:g}%" for t in targets) + " |",
        "|" + "---|" * (len(targets) + 2),
    ]

    def by_target(name):
        return {round(r["target"], 9): r for r in summary.get(name, {}).get("rows", [])}

    def acc_cell(r):
        if r is None:
            return "–"
        cell = f"{r['top1']:.1f}" + (f" [{r['min']:.1f}–{r['max']:.1f}]" if r["n"] > 1 else "")
        return cell + ("" if r["n"] == n_seeds else f" (n={r['n']})")

    for name in TARGET_ORDER:
        if name not in summary:
            continue
        rows = by_target(name)
        lines.append(f"| {TARGET_ROW_NAMES[name]} | {summary[name]['label']} | "
                     + " | ".join(acc_cell(rows.get(round(t, 9))) for t in targets) + " |")
    if "dense" in summary:
        d = summary["dense"]
        ref = f"{d['top1']:.1f}" + (f" [{d['min']:.1f}–{d['max']:.1f}]" if len(d["seeds"]) > 1 else "")
        lines.append(f"| {TARGET_ROW_NAMES['dense']} | reference: {d['label']} | " + " | ".join([ref] * len(targets)) + " |")

    lines += [
        "",
        "Sparsity the exported model reached (fraction of conv/linear weights that are exact zeros, mean over "
        "seeds) / top-1 (%) of the same trainings before pruning / share of Σ|x| that pruning to S removes, "
        "at the end of training (the quantity the α controller drives below its tolerance τ; a share far "
        "above τ means the run never became prunable to S and its top-1 at S collapses):",
        "",
        "| method | " + " | ".join(f"S = {100 * t:g}%" for t in targets) + " |",
        "|" + "---|" * (len(targets) + 1),
    ]
    short = []
    for name in TARGET_ORDER:
        if name not in summary:
            continue
        rows = by_target(name)
        cells = []
        for t in targets:
            r = rows.get(round(t, 9))
            if r is None:
                cells.append("–")
                continue
            mark = ""
            if r["reached_min"] < t - 5e-3:  # half a point of sparsity short of the target
                mark = " †"
                short.append(f"{TARGET_ROW_NAMES[name]} at {100 * t:g}% (lowest seed {100 * r['reached_min']:.2f}%)")
            share = "–" if r.get("share_end") is None else f"{r['share_end']:.3f}"
            cells.append(f"{100 * r['reached']:.2f}%{mark} / {r['top1_unpruned']:.1f} / {share}")
        lines.append(f"| {TARGET_ROW_NAMES[name]} | " + " | ".join(cells) + " |")
    if short:
        lines += ["", "† more than half a point less sparse than asked: " + "; ".join(short) + "."]

    lines += ["", "Best mean top-1 at each target (this run):", ""]
    lines += [_winner_line(w) for w in data["winners"]]
    if data.get("failures"):
        lines += ["", f"{len(data['failures'])} training(s) failed and are left out of the means (the n= in a cell "
                  "counts the seeds that ran):", ""]
        lines += [f"- `{f.splitlines()[0][:300]}`" for f in data["failures"]]
    if digits:
        lines += ["", "On this data one val image is 0.28 points, so differences of a point or less are a few images; "
                  "the seeds' ranges say more than the means."]
    return "\n".join(lines) + "\n"


def plot_target(path: str, summary: dict[str, Any], targets: Sequence[float], title: str = "") -> None:
    """Top-1 at S against S, one line per method with its min–max band over seeds; the dense
    unpruned accuracy as a dotted line with its band.  x in ``-log10(1 - S)`` as in the
    sweep plots, so 99% is as far from 98% as 90% from 80%.  When magnitude pruning is
    among them, a second panel leaves it out: it falls tens of points below the others
    (to chance at 99% on digits), which would squeeze the lines worth comparing together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xpos(s: float) -> float:
        return -math.log10(max(1.0 - s, 1e-7))

    names = [n for n in TARGET_ORDER if summary.get(n, {}).get("rows")]
    panels = [names]
    if "magnitude" in names and len(names) > 1:
        panels.append([n for n in names if n != "magnitude"])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 if len(panels) == 1 else 12, 4.5), squeeze=False)
    colors = {n: f"C{i}" for i, n in enumerate(TARGET_ORDER)}
    for k, (ax, shown) in enumerate(zip(axes[0], panels)):
        lows, highs = [], []
        for name in shown:
            rows = summary[name]["rows"]
            xs = [xpos(r["target"]) for r in rows]
            ax.plot(xs, [r["top1"] for r in rows], marker="o", ms=4, color=colors[name], label=TARGET_ROW_NAMES[name],
                    ls="--" if name == "magnitude" else "-")
            ax.fill_between(xs, [r["min"] for r in rows], [r["max"] for r in rows], color=colors[name], alpha=0.15, lw=0)
            lows += [r["min"] for r in rows]
            highs += [r["max"] for r in rows]
        if "dense" in summary:
            d = summary["dense"]
            ax.axhline(d["top1"], color="0.3", ls=":", lw=1.2, label=f"{TARGET_ROW_NAMES['dense']} ({d['top1']:.1f})")
            ax.axhspan(d["min"], d["max"], color="0.5", alpha=0.12, lw=0)
            lows.append(d["min"])
            highs.append(d["max"])
        ax.set_xticks([xpos(t) for t in targets])
        ax.set_xticklabels([f"{100 * t:g}%" for t in targets])
        if targets:
            pad = 0.15 * (xpos(max(targets)) - xpos(min(targets)) or 1.0)
            ax.set_xlim(xpos(min(targets)) - pad, xpos(max(targets)) + pad)
        if lows:
            margin = max(0.5, 0.08 * (max(highs) - min(lows)))
            ax.set_ylim(max(0.0, min(lows) - margin), min(100.0, max(highs) + margin))
        ax.set_xlabel("target sparsity S (trained for S, pruned one-shot to S)")
        ax.set_ylabel("top-1 accuracy at S (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        if k == 1:
            ax.set_title("without magnitude pruning (zoom)", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_target(stem: Path) -> dict[str, Any]:
    """Write ``<stem>.md`` and ``<stem>.png`` from ``<stem>.json`` (target mode)."""
    data = json.loads(Path(str(stem) + ".json").read_text())
    # From the run records, so that a re-render picks up a change to the summary's rules.
    data["summary"] = summarize_target(data["runs"], data["targets"])
    images = next((r.get("val_images") for r in data["runs"] if r.get("val_images")), None)
    data["winners"] = target_winners(data["summary"], data["targets"], images)
    md = markdown_target(data)
    with atomic_write(str(stem) + ".md", "w") as f:
        f.write(md)
    a = data["args"]
    n = len(a["seeds"])
    arch = next((r.get("arch") for r in data["runs"] if r.get("arch")), None) or "model"
    plot_target(str(stem) + ".png", data["summary"], data["targets"],
                title=f"{arch} on {a.get('dataset') or DEFAULT_DATASET}, {a['epochs']} epochs, {n} seed{'s' if n > 1 else ''}"
                      + (" (mean, min–max)" if n > 1 else ""))
    print(md)
    print(f"wrote {stem}.json, .md, .png in {data['wall_s']:.0f}s")
    return data


def main_target(args, targets: list[float]) -> dict[str, Any]:
    methods = args.methods
    t0 = time.perf_counter()
    jobs: list[tuple[str, Optional[float], int]] = []
    for seed in args.seeds:
        if "dense" in methods:
            jobs.append(("dense", None, seed))
        jobs += [(m, t, seed) for t in targets for m in methods if m != "dense"]
    print(f"{len(jobs)} trainings ({args.epochs} epochs each), {args.jobs} at a time", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep_runs or tmp)
        results, failures = run_all(
            jobs, lambda j: run_target(j[0], j[1], j[2], args.epochs, workdir, args.dataset, targets),
            _describe_target, args.jobs, print_fn=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    runs = [r for r in results if r is not None]
    if not runs:
        raise SystemExit("every training failed:\n" + "\n\n".join(failures))
    summary = summarize_target(runs, targets)
    images = next((r.get("val_images") for r in runs if r.get("val_images")), None)

    stem = _write_results(args, "target", {
        "args": {"seeds": args.seeds, "epochs": args.epochs, "methods": methods, "dataset": args.dataset,
                 "jobs": args.jobs},
        "targets": targets,
        "configs": {k: {"flags": v[0], "label": v[1]} for k, v in TARGET_CONFIGS.items() if k in methods},
        "summary": summary, "winners": target_winners(summary, targets, images),
        "runs": runs, "failures": failures, "wall_s": wall,
    })
    res = render_target(stem)
    if failures:
        print(f"{len(failures)} training(s) failed:\n" + "\n\n".join(failures), file=sys.stderr)
    return res


# ---------------------------------------------------------------------- matrix mode
MATRIX_ORDER = ["pilot", "spred", "l1", "magnitude", "magnitude_layer"]  # rows of each cell
MATRIX_ROW_NAMES = {**TARGET_ROW_NAMES, "magnitude": "dense + global magnitude",
                    "magnitude_layer": "dense + layer-wise magnitude"}


def run_matrix_job(job: tuple, workdir: Path, root: Path, targets: Sequence[float]) -> dict[str, Any]:
    """One training of the matrix: :func:`run_target` with the cell's flags; a dense run
    also gets its layer-wise magnitude sweep (:func:`matrix.layerwise_rows`).  The record
    is kept as ``record.json`` in the run's directory and reused when a later matrix
    (``--keep-runs`` the same folder) asks for the same training with the same flags."""
    cell, method, target, seed = job
    extra = cell.flags(root) + ([] if method == "dense" else ["--sweep-sparsities", "0"])
    out = _run_dir(workdir / cell.key, method, target, seed)
    asked = {"flags": extra, "epochs": cell.epochs(), "targets": list(targets)}
    saved = out / "record.json"
    if saved.is_file():
        rec = json.loads(saved.read_text())
        if rec.get("asked") == asked:
            return {**rec, "reused": True}
    rec = run_target(method, target, seed, cell.epochs(), workdir / cell.key, None, targets, extra)
    rec.update(cell=cell.key, steps=cell.steps(), epochs=cell.epochs(), asked=asked)
    if method == "dense":
        rec["layer_rows"] = mx.layerwise_rows(cell, out / "checkpoint.pt", targets, root)
    write_json(str(saved), rec)
    return rec


def _describe_matrix(job: tuple, rec: dict[str, Any]) -> str:
    cell, method, target, seed = job
    text = _describe_target((method, target, seed), rec)
    if method == "dense":
        text += ", layer-wise " + ", ".join(f"{100 * r['target']:g}%: {r['top1']:.1f}"
                                            for r in rec["layer_rows"] if r["target"] > 0)
    return f"{cell.key} {text}"


def summarize_matrix(runs: Sequence[dict[str, Any]], plan: Sequence[Any], targets: Sequence[float]) -> dict[str, Any]:
    """Per cell: :func:`summarize_target` of its runs plus ``magnitude_layer`` (the dense
    runs' layer-wise sweep at each target, same row fields as ``magnitude``)."""
    out: dict[str, Any] = {}
    for cell in plan:
        mine = [r for r in runs if r["cell"] == cell.key]
        if not mine:
            continue
        summary = summarize_target(mine, targets)
        dense = [r for r in mine if r["method"] == "dense"]
        rows = []
        for t in targets:
            pts = [next(x for x in r["layer_rows"] if math.isclose(x["target"], t, abs_tol=1e-9)) for r in dense]
            if pts:
                rows.append({"target": t, "n": len(pts), "seeds": [r["seed"] for r in dense],
                             **{("top1" if k == "mean" else k): v for k, v in _stats([p["top1"] for p in pts]).items()},
                             "reached": statistics.mean(p["sparsity"] for p in pts),
                             "reached_min": min(p["sparsity"] for p in pts), "share_end": None})
        if rows:
            summary["magnitude_layer"] = {"label": "dense SGD, the same fraction pruned from every tensor",
                                          "rows": rows}
        out[cell.key] = {"dataset": cell.dataset, "size": cell.size, "arch": cell.arch, "budget": cell.budget,
                         "epochs": cell.epochs(), "steps": cell.steps(), "summary": summary}
    return out


def matrix_best(cell_summary: dict[str, Any], target: float) -> tuple[list[str], Optional[float]]:
    """The methods with the best mean top-1 at ``target`` in one cell (ties all count)."""
    tops = {}
    for name in MATRIX_ORDER:
        row = next((r for r in cell_summary.get(name, {}).get("rows", []) if math.isclose(r["target"], target)), None)
        if row is not None:
            tops[name] = row["top1"]
    if not tops:
        return [], None
    best = max(tops.values())
    return [n for n, v in tops.items() if abs(v - best) < 1e-9], best


def markdown_matrix(data: dict[str, Any]) -> str:
    a, targets, cells = data["args"], data["targets"], data["cells"]
    env = data["environment"]
    versions = ", ".join(f"{k} {env.get(k)}" for k in ("torch", "torchvision", "pilot_kernels") if env.get(k))
    n_seeds = len(a["seeds"])
    reused = sum(1 for r in data["runs"] if r.get("reused"))
    lines = [
        f"# Generalization matrix: `{a['preset']}`" + (" (partial)" if a["preset"] != "full" else ""),
        "",
        f"`{data['command']}` — {len(data['runs'])} trainings"
        + ("" if data.get("complete", True) else f" of {data['planned']} planned (stopped or still running)")
        + f", {a['jobs']} at a time, {data['wall_s'] / 60:.1f} min"
        + (f" ({reused} of them reused from the records of an earlier run under --keep-runs)" if reused else "")
        + f"; the trainings' own wall times sum to {sum(r['wall_s'] for r in data['runs']) / 60:.1f} min; "
        f"{data['env_line']}" + (f"; {versions}" if versions else "")
        + f"; commit {env.get('git_commit')}"
        + (" (dirty)" if env.get("git_dirty") else "") + ".",
        "",
        f"Every training is `train.py` with `-b {mx.BATCH} --lr {mx.LR:g}` and the cell's data, model and epochs, every "
        "other flag at its default (see `python/classification/matrix.py`). pilot, spred and l1 are trained with "
        "`--target-sparsity S` and pruned one-shot to S; the dense training of each cell and seed is pruned one-shot "
        "to every S by one global magnitude ranking and by the same fraction per tensor (layer-wise). Top-1 (%) on "
        f"the val images at S, mean over {n_seeds} seed{'s' if n_seeds > 1 else ''}"
        + (", min–max in brackets" if n_seeds > 1 else "") + "; **bold** = best at S in the cell. "
        "Unpruned: the same trainings' top-1 before pruning (for the magnitude rows: the dense model's). "
        "† = the exported model is more than half a point less sparse than S.",
        "",
        "| data | model | budget | method | unpruned | " + " | ".join(f"S = {100 * t:g}%" for t in targets) + " |",
        "|" + "---|" * (len(targets) + 5),
    ]
    wins = {n: 0 for n in MATRIX_ORDER}
    for key, c in cells.items():
        s = c["summary"]
        best = {t: matrix_best(s, t)[0] for t in targets}
        for t in targets:
            for n in best[t]:
                wins[n] += 1
        head = [f"{c['dataset']} {c['size']} px", c["arch"], f"{c['budget']} ({c['steps']} steps)"]
        first = True
        for name in MATRIX_ORDER:
            if name not in s:
                continue
            rows = {round(r["target"], 9): r for r in s[name]["rows"]}
            unpruned = s["dense"]["top1"] if name.startswith("magnitude") and "dense" in s else \
                statistics.mean(r["top1_unpruned"] for r in s[name]["rows"])
            cells_ = []
            for t in targets:
                r = rows.get(round(t, 9))
                if r is None:
                    cells_.append("–")
                    continue
                text = f"{r['top1']:.1f}" + (f" [{r['min']:.1f}–{r['max']:.1f}]" if r["n"] > 1 else "")
                text = f"**{text}**" if name in best[t] else text
                cells_.append(text + (" †" if r["reached_min"] < t - 5e-3 else ""))
            lines.append("| " + " | ".join(head if first else ["", "", ""]) + f" | {MATRIX_ROW_NAMES[name]} | "
                         f"{unpruned:.1f} | " + " | ".join(cells_) + " |")
            first = False
    total = sum(len(targets) for _ in cells)
    lines += ["", f"Best at S, counted over the {total} (cell, target) pairs (ties count for each): "
              + ", ".join(f"{MATRIX_ROW_NAMES[n]} {k}" for n, k in wins.items() if any(
                  n in c["summary"] for c in cells.values())) + "."]
    aimed = [r for r in data["runs"] if r["method"] != "dense"]
    if aimed:
        lines += ["", "Each aimed training at its end: train top-1 (last epoch, with augmentation), α at the first and "
                  "last epoch, the share of Σ|x| that pruning to S removes (the controller aims at ≤ τ = 0.02):", "",
                  "| cell | method | S | seed | train top-1 | α first → last | share at the end | top-1 at S |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(aimed, key=lambda r: (r["cell"], MATRIX_ORDER.index(r["method"]), r["target"], r["seed"])):
            alpha = [x for x in r.get("alpha") or [] if x is not None]
            share = next((x for x in reversed(r.get("share") or []) if x is not None), None)
            lines.append(f"| {r['cell']} | {r['method']} | {100 * r['target']:g}% | {r['seed']} | "
                         f"{r['final_train_acc']:.1f} | "
                         + (f"{alpha[0]:.3g} → {alpha[-1]:.3g}" if alpha else "–") + " | "
                         + ("–" if share is None else f"{share:.3f}") + f" | {r['top1']:.1f} |")
    if data.get("failures"):
        lines += ["", f"{len(data['failures'])} training(s) failed and are left out:", ""]
        lines += [f"- `{f.splitlines()[0][:300]}`" for f in data["failures"]]
    return "\n".join(lines) + "\n"


def plot_matrix(path: str, cells: dict[str, Any], targets: Sequence[float], title: str = "") -> None:
    """One panel per cell: top-1 at S against S for each method, the dense unpruned
    accuracy dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(cells)
    cols = min(3, len(keys)) or 1
    rows = math.ceil(len(keys) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = {n: f"C{i}" for i, n in enumerate(MATRIX_ORDER)}
    for ax, key in zip(axes.flat, keys):
        s = cells[key]["summary"]
        for name in MATRIX_ORDER:
            if name in s:
                pts = s[name]["rows"]
                ax.plot([100 * r["target"] for r in pts], [r["top1"] for r in pts], marker="o", ms=4,
                        color=colors[name], ls="--" if name.startswith("magnitude") else "-",
                        label=MATRIX_ROW_NAMES[name])
        if "dense" in s:
            ax.axhline(s["dense"]["top1"], color="0.3", ls=":", lw=1.2, label="dense, unpruned")
        c = cells[key]
        ax.set_title(f"{c['dataset']} {c['size']}px, {c['arch']}, {c['steps']} steps", fontsize=9)
        ax.set_xticks([100 * t for t in targets])
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_xlabel("target sparsity S (%)", fontsize=8)
        ax.set_ylabel("top-1 at S (%)", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_matrix(stem: Path) -> dict[str, Any]:
    """Write ``<stem>.md`` and ``<stem>.png`` from ``<stem>.json`` (matrix mode)."""
    data = json.loads(Path(str(stem) + ".json").read_text())
    md = markdown_matrix(data)
    with atomic_write(str(stem) + ".md", "w") as f:
        f.write(md)
    plot_matrix(str(stem) + ".png", data["cells"], data["targets"],
                title=f"compare_methods.py --matrix {data['args']['preset']}: top-1 at the target sparsity")
    print(md)
    print(f"wrote {stem}.json, .md, .png")
    return data


def matrix_plan(args) -> tuple[list[Any], list[tuple]]:
    plan = mx.cells(args.matrix_data[0], args.matrix_data[1], args.archs, args.budgets)
    return plan, mx.jobs(plan, args.methods, args.target_sparsity, args.seeds)


def print_plan(plan: Sequence[Any], jobs: Sequence[tuple], workers: int,
               print_fn: Callable[[str], None] = print) -> float:
    """The cells, their trainings and an estimate of the wall time: Σ steps × a forward,
    backward and SGD step measured now on this machine (:func:`matrix.seconds_per_step`,
    one thread) / ``workers``.  Evaluation, PILoT's extra optimizer work and the data
    loading come on top.  Returns the estimate in seconds."""
    per_step = {(c.arch, c.size): mx.seconds_per_step(c.arch, c.size) for c in plan}
    print_fn(f"{'cell':<34} {'epochs':>6} {'steps':>6} {'trainings':>9} {'s/step':>7} {'est. min':>8}")
    total = 0.0
    for c in plan:
        n = sum(1 for j in jobs if j[0] == c)
        t = n * c.steps() * per_step[(c.arch, c.size)]
        total += t
        print_fn(f"{c.key:<34} {c.epochs():>6} {c.steps():>6} {n:>9} {per_step[(c.arch, c.size)]:>7.3f} {t / 60:>8.1f}")
    wall = total / max(1, workers)
    print_fn(f"{len(jobs)} trainings, {workers} at a time: about {wall / 3600:.1f} h of training steps "
             f"({total / 3600:.1f} h on one core; evaluation and PILoT's optimizer work come on top)")
    return wall


def main_matrix(args, command: str) -> dict[str, Any]:
    plan, jobs = matrix_plan(args)
    root = Path(args.data_root)
    print_plan(plan, jobs, args.jobs, print_fn=lambda s: print(s, flush=True))
    if args.dry_run:
        return {"plan": [c.key for c in plan], "jobs": len(jobs)}
    for d, size in sorted({(c.dataset, c.size) for c in plan if c.arch != mx.DIGITS_ARCH}):
        print(f"ImageFolder {mx.render_imagefolder(d, size, root)}", flush=True)
    import torch

    torch.set_num_threads(1)  # the layer-wise sweeps run in this process, beside --jobs trainings
    t0 = time.perf_counter()

    def write(results: list, failures: list, final: bool) -> Optional[Path]:
        runs = [r for r in results if r is not None]
        if not runs:
            return None
        return _write_results(argparse.Namespace(out=args.out, dataset=args.matrix), "matrix", {
            "command": command,
            "args": {"preset": args.matrix, "seeds": args.seeds, "methods": args.methods, "jobs": args.jobs,
                     "datasets": args.matrix_data[0], "sizes": args.matrix_data[1], "archs": args.archs,
                     "budgets": args.budgets},
            "targets": args.target_sparsity, "train_flags": {c.key: c.flags(Path("DATA_ROOT")) for c in plan},
            "cells": summarize_matrix(runs, plan, args.target_sparsity), "planned": len(jobs), "complete": final,
            "runs": runs, "failures": failures, "wall_s": time.perf_counter() - t0,
        })

    def so_far(results: list, failures: list) -> None:
        # The JSON and table after every finished training: a matrix that is stopped keeps what it measured.
        stem = write(results, failures, final=False)
        if stem is not None:
            with atomic_write(str(stem) + ".md", "w") as f:
                f.write(markdown_matrix(json.loads(Path(str(stem) + ".json").read_text())))

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep_runs or tmp)
        results, failures = run_all(jobs, lambda j: run_matrix_job(j, workdir, root, args.target_sparsity),
                                    _describe_matrix, args.jobs, print_fn=lambda s: print(s, flush=True),
                                    on_done=so_far)
    stem = write(results, failures, final=True)
    if stem is None:
        raise SystemExit("every training failed:\n" + "\n\n".join(failures))
    res = render_matrix(stem)
    if failures:
        print(f"{len(failures)} training(s) failed:\n" + "\n\n".join(failures), file=sys.stderr)
    return res


# ---------------------------------------------------------------------- command line
def _targets(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated fractions, e.g. 0.9,0.95,0.98,0.99")
    if not vals:
        raise argparse.ArgumentTypeError("give at least one sparsity, e.g. 0.9")
    bad = [v for v in vals if not 0.0 < v < 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad}: a target sparsity is a fraction strictly between 0 and 1 "
                                         f"(0.9 = 90% of the weights pruned)")
    return sorted(set(vals))


def _dataset(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a dataset name of letters, digits, '_' and '-' (it goes into "
                                         f"the result file names), e.g. mnist")
    return text


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 0,1,2")


def _matrix_main(p: argparse.ArgumentParser, args, argv) -> dict[str, Any]:
    """--matrix: the preset's axes where no flag narrows them; every name checked before anything runs."""
    if args.epochs is not None or args.dataset is not None:
        p.error("--matrix sets the epochs from its budgets and the data from --datasets/--sizes: "
                "leave out --epochs and --dataset")
    preset = mx.PRESETS[args.matrix]
    args.target_sparsity = args.target_sparsity or list(preset["targets"])
    args.methods = args.methods or list(preset["methods"])
    args.seeds = args.seeds or list(preset["seeds"])
    datasets, sizes = args.datasets or list(preset["datasets"]), args.sizes or list(preset["sizes"])
    args.archs = args.archs or list(preset["archs"])
    args.budgets = args.budgets or list(preset["budgets"])
    args.matrix_data = (datasets, sizes)
    checks = [("methods", args.methods, list(TARGET_CONFIGS)), ("datasets", datasets, list(mx.DATASETS)),
              ("budgets", args.budgets, list(mx.BUDGETS))]
    for flag, given, choices in checks:
        unknown = sorted(set(given) - set(choices))
        if unknown:
            p.error(f"--{flag}: unknown {unknown}; choose from {choices}")
    if any(n < 8 for n in sizes):
        p.error(f"--sizes {sizes}: give image sides of at least 8 pixels")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    stem = _stem(Path(args.out), "matrix", args.matrix)
    if args.render_only:
        if not Path(str(stem) + ".json").is_file():
            p.error(f"--render-only: {stem}.json does not exist; run the matrix first")
        return render_matrix(stem)
    command = "python python/classification/compare_methods.py " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    return main_matrix(args, command)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=_ints, default=None, help="default 0,1,2 (--matrix: the preset's, 0)")
    p.add_argument("--epochs", type=int, default=None, help="default 40 (not with --matrix: its budgets set them)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=None,
                   help=f"subset of {list(CONFIGS)} (target mode: of {list(TARGET_CONFIGS)}); default all")
    p.add_argument("--target-sparsity", type=_targets, default=None, metavar="S1,S2,...",
                   help="target mode: train every method aimed at each of these sparsities (see the module docstring)")
    p.add_argument("--dataset", type=_dataset, default=None,
                   help=f"passed to train.py (default: its {DEFAULT_DATASET!r}); other names go into the file names")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel runs, one thread each (default: CPU cores)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--keep-runs", default=None, help="keep every run's output directory here")
    g = p.add_argument_group("matrix mode (issue 19: does it generalize?)")
    g.add_argument("--matrix", nargs="?", const="full", choices=list(mx.PRESETS), default=None,
                   help="train the generalization matrix (python/classification/matrix.py); a preset picks its "
                        "axes (default: full), the flags below and --target-sparsity/--methods/--seeds narrow them")
    g.add_argument("--dry-run", action="store_true", help="--matrix: print the plan and its time estimate only")
    g.add_argument("--datasets", type=lambda s: s.split(","), default=None, help=f"--matrix: of {list(mx.DATASETS)}")
    g.add_argument("--sizes", type=_ints, default=None, help=f"--matrix: image sides, e.g. {','.join(map(str, mx.SIZES))}")
    g.add_argument("--archs", type=lambda s: s.split(","), default=None, help=f"--matrix: e.g. {','.join(mx.ARCHS)}")
    g.add_argument("--budgets", type=lambda s: s.split(","), default=None, help=f"--matrix: of {list(mx.BUDGETS)}")
    g.add_argument("--data-root", default=str(mx.DEFAULT_ROOT), help="--matrix: where the ImageFolders are rendered")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the .md and .png from the existing .json (with --target-sparsity: the target-mode "
                        "files; their targets come from the .json)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: give at least 1")
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs {args.epochs}: give at least 1")
    if args.matrix:
        return _matrix_main(p, args, argv)
    matrix_only = [f for f, v in (("--dry-run", args.dry_run), ("--datasets", args.datasets), ("--sizes", args.sizes),
                                  ("--archs", args.archs), ("--budgets", args.budgets)) if v]
    if matrix_only:
        p.error(f"{', '.join(matrix_only)}: only with --matrix")
    args.seeds = [0, 1, 2] if args.seeds is None else args.seeds
    args.epochs = 40 if args.epochs is None else args.epochs
    target_mode = args.target_sparsity is not None
    if args.render_only:
        stem = _stem(Path(args.out), "target" if target_mode else "embedded", args.dataset)
        if not Path(str(stem) + ".json").is_file():
            p.error(f"--render-only: {stem}.json does not exist; run the comparison first")
        return render_target(stem) if target_mode else render(stem)
    choices = TARGET_CONFIGS if target_mode else CONFIGS
    if args.methods is None:
        args.methods = list(choices)
    unknown = set(args.methods) - set(choices)
    if unknown:
        why = " (target mode steers α itself; \"pilot_init\" is the constant-α ablation of the sweep mode)" \
            if target_mode and "pilot_init" in unknown else ""
        p.error(f"unknown methods {sorted(unknown)}; choose from {list(choices)}{why}")
    if target_mode:
        return main_target(args, args.target_sparsity)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep_runs or tmp)
        jobs = [(c, s) for s in args.seeds for c in args.methods]
        results, failures = run_all(
            jobs, lambda cs: run_one(cs[0], cs[1], args.epochs, workdir, args.dataset),
            lambda cs, r: f"{cs[0]} seed {cs[1]}: unpruned top-1 {r['rows'][0]['top1']:.2f}%, {r['wall_s']:.0f} s",
            args.jobs, print_fn=lambda s: print(s, flush=True))
    if failures:  # the sweep table needs every method at every seed
        raise RuntimeError("\n\n".join(failures))
    runs = [r for r in results if r is not None]
    wall = time.perf_counter() - t0
    summary = summarize(runs)

    stem = _write_results(args, "embedded", {
        "args": {"seeds": args.seeds, "epochs": args.epochs, "methods": args.methods, "dataset": args.dataset},
        "configs": {k: {"flags": v[0], "label": v[1]} for k, v in CONFIGS.items() if k in args.methods},
        "sparsities": SPARSITIES, "summary": summary, "runs": runs, "wall_s": wall,
    })
    return render(stem)


def render(stem: Path) -> dict[str, Any]:
    """Write ``<stem>.md`` and ``<stem>.png`` from ``<stem>.json``."""
    data = json.loads(Path(str(stem) + ".json").read_text())
    args = argparse.Namespace(**data["args"])
    summary, runs, wall = data["summary"], data["runs"], data["wall_s"]
    env = data["environment"]
    env_line = data.get("env_line") or _env_line(env)
    md = markdown(summary, args, wall, env_line, runs)
    with atomic_write(str(stem) + ".md", "w") as f:
        f.write(md)
    series = {ROW_NAMES[k]: v["rows"] for k, v in summary.items() if k != "dense"}
    bands = {ROW_NAMES[k]: ([r["min"] for r in v["rows"]], [r["max"] for r in v["rows"]])
             for k, v in summary.items() if k != "dense"}
    dataset = getattr(args, "dataset", None) or DEFAULT_DATASET
    data_title = "digits_cnn on sklearn digits" if dataset == DEFAULT_DATASET else \
        f"{next((r.get('arch') for r in runs if r.get('arch')), 'model')} on {dataset}"
    plot_sweeps(str(stem) + ".png", series, bands=bands,
                title=f"{data_title}, {args.epochs} epochs, {len(args.seeds)} seeds (mean, min–max)")
    print(md)
    print(f"wrote {stem}.json, .md, .png in {wall:.0f}s")
    return {"summary": summary, "runs": runs, "wall_s": wall}


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res.get("failures") else 0)
