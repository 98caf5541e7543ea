"""What the benchmark scripts share beyond :mod:`bench`: the command-line
options every script takes, the results-file convention and target checks.

A results file is ``<stem>.json`` (``environment``, ``args``, ``columns``, ``rows`` and
extras such as ``targets``) with ``<stem>.csv`` (the rows) beside it, by default in
``benchmarks/results/``.  A CPU ``--quick`` run is named ``cpu-smoke-<script>-<time>`` so
that it is never mistaken for a measurement.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from bench import jsonable
from envinfo import REPO_ROOT, device_slug

DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def add_common_args(ap: argparse.ArgumentParser, script: str) -> None:
    """``--device``, ``--quick``, ``--out``, ``--name`` and ``--seed``."""
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--quick", action="store_true", help="smoke mode: small sizes, few repetitions (seconds)")
    ap.add_argument("--out", default=str(DEFAULT_RESULTS_DIR), help="results folder")
    ap.add_argument("--name", default=None, help=f"file stem (default: {script}-<device>-<UTC time>; "
                    f"cpu-smoke-{script}-<time> for a CPU --quick run)")
    ap.add_argument("--seed", type=int, default=0)


def resolve_device(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.device`` as a torch.device (CUDA when available), or an argparse error."""
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def results_stem(script: str, env: dict[str, Any], quick: bool) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if env["device_type"] != "cuda" and quick:
        return f"cpu-smoke-{script}-{stamp}"
    return f"{script}-{device_slug(env)}-{stamp}"


def write_results(out_dir: Path | str, stem: str, rows: list[dict[str, Any]], *, env: dict[str, Any],
                  args: argparse.Namespace, columns: Sequence[str],
                  extra: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    """Write ``<stem>.csv`` (``columns`` in order) and ``<stem>.json``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    payload = {"environment": env, "args": vars(args), "columns": list(columns), "rows": rows, **(extra or {})}
    with open(json_path, "w") as f:
        json.dump(jsonable(payload), f, indent=2)
        f.write("\n")
    return {"csv": csv_path, "json": json_path}


def target(name: str, case: str, value: Optional[float], limit: float, *, at_most: bool,
           **extra: Any) -> dict[str, Any]:
    """One target check: ``value <= limit`` (``at_most``) or ``value >= limit``; a
    missing value fails."""
    ok = value is not None and (value <= limit if at_most else value >= limit)
    return {"target": name, "case": case, "value": value, "limit": limit, "pass": ok, **extra}


def print_targets(targets: dict[str, Any]) -> None:
    if not targets.get("checks"):
        print(f"# targets: {targets.get('status', 'none')}")
        return
    print("# targets:")
    for c in targets["checks"]:
        value = "missing" if c["value"] is None else f"{c['value']:.3g}"
        print(f"#   {'PASS' if c['pass'] else 'FAIL'}  {c['target']:<44} {c['case']:<30} {value}")
