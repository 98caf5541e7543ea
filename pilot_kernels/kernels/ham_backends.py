"""Backends of the HAM step and the one function that picks and calls them.

Every backend module exposes ``step(t: HamTensors, h: HamHparams, e: HamExtras,
workspace: dict) -> None`` with the semantics of
:func:`pilot_kernels.kernels.ham_reference.step`, for tensors of one device, one
parameter dtype and one param group; a fused backend hands the reference whatever it
cannot walk itself.

* ``reference`` — plain torch; the oracle (``ham_reference``).
* ``triton``    — one fused Triton launch per call (``ham_triton``).
* ``cpu``       — the fused, multithreaded C++ step in ``csrc/cpu/ham_step_cpu.cpp``
  (``ham_cpu``), built on first use.

``auto`` picks ``triton`` for CUDA tensors; for CPU tensors ``cpu`` once its module is
loaded (``ham_cpu.ready()``, which never waits: its first call starts a background build
and says so in one line), ``reference`` until then and, with one warning, for good when
the build fails; ``reference`` otherwise.  This mirrors :mod:`pilot_kernels.kernels`'
dispatcher for the PILoT step, which it is meant to fold into.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import triton_interpreting
from .ham_api import BASES, HamExtras, HamHparams, HamTensors

BACKENDS = ("reference", "triton", "cpu")

_MODULES = {
    "reference": "pilot_kernels.kernels.ham_reference",
    "triton": "pilot_kernels.kernels.ham_triton",
    "cpu": "pilot_kernels.kernels.ham_cpu",
}
_LOADED: dict = {}


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")


def _module(name: str):
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` on ``device`` (resolving ``auto``)."""
    check_backend_name(name)
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpu" if device.type == "cpu" and _module("cpu").ready() else "reference"
    if name == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors but got a {device.type} tensor; use "
                         f"backend='auto' or 'reference' (or set TRITON_INTERPRET=1 to run the "
                         f"Triton kernel on the CPU)")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors but got a {device.type} tensor; "
                         f"use backend='auto'")
    return name


def _on(device: torch.device, v):
    return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and v.device != device else v


def run_step(t: HamTensors, h: HamHparams, e: HamExtras = HamExtras(), backend: str = "auto",
             workspace: Optional[dict] = None) -> None:
    """Step one (device, dtype, param group) list with ``backend``: scalars and AMP
    tensors are moved to the tensors' device first (no sync)."""
    if not t.params:
        return
    if h.base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {h.base!r}")
    device = t.params[0].device
    name = resolve_backend(backend, device)
    h = h._replace(**{k: _on(device, getattr(h, k)) for k in ("lr", "decay", "step_size",
                                                              "bias_correction2_sqrt")})
    e = HamExtras(*(_on(device, v) for v in e))
    _module(name).step(t, h, e, {} if workspace is None else workspace)
