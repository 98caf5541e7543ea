"""Backends of the PILoT step.

Every backend module exposes ``pilot_step(xs, grads, ms, ws, momentum_ms, momentum_ws,
firsts, *, lr, momentum, dampening, nesterov, alpha, weight_decay, maximize,
grad_scale, found_inf, l1_accum, l1_clear)`` with the semantics documented in
:func:`pilot_kernels.kernels.reference.pilot_step`, for tensors that share one device,
one dtype and one param group.

* ``reference`` — plain torch; the CPU path and the oracle.
* ``triton``    — one fused Triton launch per call (``fused_triton``).
* ``cuda``      — the CUDA C++ twin in ``csrc/`` (``fused_cuda``), built ahead of time or
  on first use.

``backend="auto"`` picks ``triton`` for CUDA tensors and ``reference`` otherwise; the
environment variable ``PILOT_BACKEND`` overrides ``auto`` (not an explicit choice).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "PILOT_BACKEND"

_MODULES = {
    "reference": "pilot_kernels.kernels.reference",
    "triton": "pilot_kernels.kernels.fused_triton",
    "cuda": "pilot_kernels.kernels.fused_cuda",
}


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` on ``device`` (resolving ``auto``)."""
    check_backend_name(name)
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto")
        check_backend_name(name)
        if name == "auto":
            return "triton" if device.type == "cuda" else "reference"
    if name in ("triton", "cuda") and device.type != "cuda":
        if name == "triton" and triton_interpreting():
            return name
        hint = " (or set TRITON_INTERPRET=1 to run the Triton kernel on the CPU)" if name == "triton" else ""
        raise ValueError(
            f"backend={name!r} needs CUDA tensors but got a {device.type} tensor; "
            f"use backend='auto' or 'reference'{hint}"
        )
    return name


def get_step_fn(name: str) -> Callable[..., None]:
    """The ``pilot_step`` function of a concrete backend (imported on first use)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return importlib.import_module(_MODULES[name]).pilot_step
