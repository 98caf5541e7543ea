"""Backends of the PILoT step.

Every backend module exposes ``pilot_step(xs, grads, ms, ws, momentum_ms, momentum_ws,
firsts, *, lr, momentum, dampening, nesterov, alpha, weight_decay, maximize,
grad_scale, found_inf, l1_accum, l1_clear, workspace)`` with the semantics documented in
:func:`pilot_kernels.kernels.reference.pilot_step`, for tensors that share one device,
one dtype and one param group.  ``workspace`` is a dict the caller keeps between calls
for one bucket of tensors; a backend caches what it likes in it.  The optimizer puts
``"xs_fixed": True`` in its own: its word that every ``x`` of a call is at the address
it had in every earlier call with that workspace (its write check has just compared
them), which the Triton backend uses to skip reading those addresses.

* ``reference`` — plain torch; the CPU path and the oracle.
* ``triton``    — one fused Triton launch per call (``fused_triton``).
* ``cuda``      — the CUDA C++ twin in ``csrc/`` (``fused_cuda``), built ahead of time or
  on first use.
* ``cpu``       — the fused, vectorized, multithreaded C++ step for CPU tensors in
  ``csrc/cpu/`` (``fused_cpu``), built on first use.

``backend="auto"`` picks ``triton`` for CUDA tensors, ``cpu`` for CPU tensors and
``reference`` otherwise.  Where the ``cpu`` module cannot be built (no compiler, no
ninja, a failed compile) ``auto`` falls back to ``reference`` with one warning per
process.  The environment variable ``PILOT_BACKEND`` overrides ``auto`` (not an explicit
choice).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Optional, Union

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")
ENV_VAR = "PILOT_BACKEND"

_MODULES = {
    "reference": "pilot_kernels.kernels.reference",
    "triton": "pilot_kernels.kernels.fused_triton",
    "cuda": "pilot_kernels.kernels.fused_cuda",
    "cpu": "pilot_kernels.kernels.fused_cpu",
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
            if device.type == "cuda":
                return "triton"
            return "cpu" if device.type == "cpu" and _cpu_available() else "reference"
    if name in ("triton", "cuda") and device.type != "cuda":
        if name == "triton" and triton_interpreting():
            return name
        hint = " (or set TRITON_INTERPRET=1 to run the Triton kernel on the CPU)" if name == "triton" else ""
        raise ValueError(
            f"backend={name!r} needs CUDA tensors but got a {device.type} tensor; "
            f"use backend='auto' or 'reference'{hint}"
        )
    if name == "cpu" and device.type != "cpu":
        raise ValueError(
            f"backend='cpu' needs CPU tensors but got a {device.type} tensor; use backend='auto'"
        )
    return name


def _cpu_available() -> bool:
    """Whether ``auto`` may take the cpu backend now: never waits for its build (see
    :func:`pilot_kernels.kernels.fused_cpu.ready`)."""
    from . import fused_cpu

    return fused_cpu.ready()


def split_scalar(v: Union[float, torch.Tensor]) -> tuple[float, Optional[torch.Tensor]]:
    """A hyperparameter (``lr``, ``alpha``) as a ``(float, tensor)`` pair: a tensor
    (capturable mode) is passed on and read by the kernel itself, never with ``.item()``."""
    return (0.0, v) if isinstance(v, torch.Tensor) else (float(v), None)


_LOADED: dict = {}  # backend name -> its module, imported once (get_step_fn)


def get_step_fn(name: str) -> Callable[..., None]:
    """The ``pilot_step`` function of a concrete backend (imported on first use).

    Looked up in the module at every call, so a patched ``pilot_step`` is the one
    called; the module itself is kept (``importlib.import_module`` costs ~1.5 µs of a
    step's host time even for a loaded module)."""
    module = _LOADED.get(name)
    if module is None:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module.pilot_step
