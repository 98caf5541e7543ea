"""Helpers shared by ``bench_step.py`` and ``bench_training.py`` (one copy of each):

* :func:`environment` — the record of where a result was measured (device, driver,
  library versions, git commit) that goes into every results file;
* :func:`bytes_per_element` / :func:`step_bytes` — the analytic memory traffic of one
  optimizer step (spec §3: 40 B/element for fp32 PILoT with momentum, 20 for dense SGD);
* :func:`write_results` — the results-file convention: ``<stem>.json`` (environment,
  arguments, rows, extras) and ``<stem>.csv`` (the rows) in one folder;
"""
from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from pilot_kernels.envinfo import REPO_ROOT, device_slug, environment, git_commit  # noqa: F401  (re-exported)

DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# fp32 state of a reparameterized tensor: m, w and (with momentum) b_m, b_w.
_STATE_BYTES = 4


# --------------------------------------------------------------------- analytic bytes
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_element(algorithm: str, dtype: torch.dtype = torch.float32, momentum: bool = True) -> int:
    """Fewest bytes one optimizer step must move per element (each input read once,
    each output written once).

    ``"pilot"`` (spec §3): read ``g``; read and write ``m, w`` and, with momentum,
    ``b_m, b_w`` (all fp32); write ``x`` (never read, it is recomputed).  ``g`` and ``x``
    are in the parameter's dtype: fp32 → 4 + 2·8 + 2·8 + 4 = 40 bytes; bf16 → 36.

    ``"sgd"`` (``torch.optim.SGD``, fused): read ``g``; read and write ``p`` and, with
    momentum, its buffer, all in the parameter's dtype: fp32 → 20 bytes; bf16 → 10.
    """
    s = _itemsize(dtype)
    if algorithm == "pilot":
        n_state = 4 if momentum else 2
        return s + 2 * n_state * _STATE_BYTES + s
    if algorithm == "sgd":
        return s + 2 * s + (2 * s if momentum else 0)
    raise ValueError(f"algorithm must be 'pilot' or 'sgd', got {algorithm!r}")


def is_reparameterized(shape: Sequence[int]) -> bool:
    """PILoT's default rule (``reparam="auto"``): tensors with ``ndim >= 2`` are split."""
    return len(shape) >= 2


def step_bytes(
    shapes: Iterable[Sequence[int]],
    algorithm: str,
    dtype: torch.dtype = torch.float32,
    momentum: bool = True,
) -> int:
    """Analytic bytes of one step over tensors of ``shapes``.

    ``"pilot"``: reparameterized tensors (``ndim >= 2``) at PILoT's rate, the rest
    (biases, norms) at dense SGD's, as :class:`pilot_kernels.PILoT` treats them.
    ``"sgd"``: every tensor at dense SGD's rate.
    """
    pilot_b = bytes_per_element("pilot", dtype, momentum)
    sgd_b = bytes_per_element("sgd", dtype, momentum)
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        total += n * (pilot_b if algorithm == "pilot" and is_reparameterized(shape) else sgd_b)
    return total


# --------------------------------------------------------------------- results files
def results_stem(script: str, env: dict[str, Any], quick: bool) -> str:
    """``<script>-<device>-<UTC time>``; a CPU quick run is named ``cpu-smoke-<script>-…``
    so that it can never be mistaken for a measurement."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if env["device_type"] != "cuda" and quick:
        return f"cpu-smoke-{script}-{stamp}"
    return f"{script}-{device_slug(env)}-{stamp}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (torch.dtype, torch.device, Path)):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_results(
    out_dir: Path | str,
    stem: str,
    rows: list[dict[str, Any]],
    *,
    env: dict[str, Any],
    args: dict[str, Any],
    columns: Sequence[str],
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Path]:
    """Write ``<stem>.csv`` (one line per row, ``columns`` in order) and ``<stem>.json``
    (``{"environment", "args", "columns", "rows", **extra}``); return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    payload = {"environment": env, "args": args, "columns": list(columns), "rows": rows, **(extra or {})}
    with open(json_path, "w") as f:
        json.dump(_jsonable(payload), f, indent=2)
        f.write("\n")
    return {"csv": csv_path, "json": json_path}


# --------------------------------------------------------------------- small utilities
def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """One line naming an exception, for the ``status`` column."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def add_output_args(ap, script: str) -> None:
    """``--out``, ``--name`` and ``--seed``, shared by every benchmark script."""
    ap.add_argument("--out", default=str(DEFAULT_RESULTS_DIR), help="results folder")
    ap.add_argument("--name", default=None, help=f"file stem (default: {script}-<device>-<UTC time>; "
                    f"cpu-smoke-{script}-<time> for a CPU --quick run)")
    ap.add_argument("--seed", type=int, default=0)


def resolve_device(ap, args) -> None:
    """``args.device`` as a torch.device (CUDA when available), or an argparse error."""
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
