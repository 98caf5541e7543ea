"""Backends of the PILoT step, and the one dispatcher in front of them.

Every backend module exposes ``pilot_step(t: StepTensors, h: StepHparams, e: StepExtras,
workspace: dict) -> None`` (:mod:`.api`) with the semantics of
:func:`pilot_kernels.kernels.reference.pilot_step`, and steps exactly what it is given.
Callers go through :func:`run_step`, which does the glue once for all backends:

1. resolves the backend name for the tensors' device (:func:`resolve_backend`);
2. hands the kernel what it can walk (:func:`.layout.walkable`), one call per gradient
   dtype (x's, or float32), and the reference everything else;
3. puts tensor ``lr``/``alpha`` (as fp32), ``grad_scale`` and ``found_inf`` on the
   tensors' device with ``non_blocking`` (never ``.item()``: no host sync);
4. clears ``l1_clear`` in the first call it makes, whichever backend that is;
5. after a kernel returns, bumps the version counters of everything it wrote (x, m, w and
   both momentum buffers) once, as an in-place torch op does; the reference's ``copy_``
   bumps its own.

Backends:

* ``reference`` — plain torch; the oracle.
* ``triton``    — one fused Triton launch per call (``fused_triton``).
* ``cuda``      — the CUDA C++ twin in ``csrc/`` (``fused_cuda``), built ahead of time or
  on first use.
* ``cpu``       — the fused C++ step for CPU tensors in ``csrc/cpu/`` (``fused_cpu``).

``backend="auto"`` picks ``triton`` for CUDA tensors; for CPU tensors ``cpu`` once its
extension is loaded (``fused_cpu.ready()``, which starts a background build on its first
call) and ``reference`` until then (bitwise equal, so nothing changes when the build
lands); ``reference`` on any other device.  The environment variable ``PILOT_BACKEND``
overrides ``auto`` (not an explicit choice).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import reference
from .api import StepExtras, StepHparams, StepTensors
from .layout import LayoutGuard, walkable

__all__ = ["BACKENDS", "run_step", "resolve_backend", "check_backend_name", "triton_interpreting",
           "get_step_fn", "split_scalar", "StepTensors", "StepHparams", "StepExtras"]

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
            if device.type == "cpu":
                return "cpu" if _module("cpu").ready() else "reference"
            return "reference"
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


def split_scalar(v: Union[float, Tensor]) -> tuple[float, Optional[Tensor]]:
    """A hyperparameter (``lr``, ``alpha``) as a ``(float, tensor)`` pair, for flat
    signatures (the CUDA binding, the custom op of :mod:`pilot_kernels.ops`): a tensor is
    passed on, never read on the host."""
    return (0.0, v) if isinstance(v, Tensor) else (float(v), None)


_LOADED: dict = {}  # backend name -> its module, imported once


def _module(name: str):
    module = _LOADED.get(name)
    if module is None:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


def get_step_fn(name: str) -> Callable[..., None]:
    """The ``pilot_step`` of a concrete backend, looked up at every call (so a patched
    one is the one called).  It steps only what it is given: use :func:`run_step`."""
    return _module(name).pilot_step


# ----------------------------------------------------------------------- the glue
def _to_device(v, device: torch.device, fp32: bool):
    if not isinstance(v, Tensor) or (v.device == device and (not fp32 or v.dtype == torch.float32)):
        return v
    return v.to(device=device, dtype=torch.float32 if fp32 else v.dtype, non_blocking=True)


def _place_scalars(h: StepHparams, e: StepExtras, device: torch.device):
    """Scalar tensors on the step's device; floats stay floats (no ``.item()`` anywhere)."""
    if isinstance(h.lr, Tensor) or isinstance(h.alpha, Tensor):
        h = h._replace(lr=_to_device(h.lr, device, True), alpha=_to_device(h.alpha, device, True))
    if e.grad_scale is not None or e.found_inf is not None:
        e = e._replace(grad_scale=_to_device(e.grad_scale, device, False),
                       found_inf=_to_device(e.found_inf, device, False))
    return h, e


def _streams(t: StepTensors) -> tuple:
    return (t.xs, t.grads, t.ms, t.ws) + ((t.momentum_ms, t.momentum_ws) if t.momentum_ms is not None else ())


def _pick(t: StepTensors, idx: list) -> StepTensors:
    def pick(seq):
        return None if seq is None else [seq[i] for i in idx]

    return StepTensors(*(pick(s) for s in t[:6]), [t.firsts[i] for i in idx])


class _Partition:
    """Which entries go to the kernel (per gradient dtype) and which to the reference;
    kept in the workspace while the shapes, strides and dtypes of every tensor it looked
    at (:class:`LayoutGuard`) are unchanged."""

    def __init__(self, t: StepTensors):
        x_dtype = t.xs[0].dtype
        self.parts: dict = {}   # gradient dtype -> entry indices
        self.rest: list = []
        for i, tensors in enumerate(zip(*_streams(t))):
            g = tensors[1]
            if g.dtype in (x_dtype, torch.float32) and walkable(*tensors):
                self.parts.setdefault(g.dtype, []).append(i)
            else:
                self.rest.append(i)
        self.n = len(t.xs)
        self.guard = LayoutGuard([u for s in _streams(t) for u in s])

    def holds_for(self, t: StepTensors, flat: list) -> bool:
        """``flat``: every tensor of ``t``, stream by stream."""
        return len(t.xs) == self.n and self.guard.check(flat)

    def __reduce__(self):
        # A copied or pickled workspace holds no partition: the next call makes one.
        return (_nothing, ())


def _nothing() -> None:
    return None


def _bump_versions(tensors: list) -> None:
    """Autograd's view of a kernel's in-place writes: a graph that saved one of these
    tensors raises at backward instead of using the new values."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # a torch whose increment_version takes one tensor
        for u in tensors:
            torch.autograd.graph.increment_version(u)


def run_step(backend: str, t: StepTensors, h: StepHparams, e: StepExtras = StepExtras(),
             workspace: Optional[dict] = None) -> None:
    """One PILoT step of ``t`` (tensors of one device, one ``x`` dtype, one param group)
    with the backend ``backend`` (a name or ``"auto"``), in place.

    ``workspace`` is a dict the caller keeps for this set of tensors between calls (or
    None): the partition and the backends' launch tables are cached in it, each
    validated at every call against what it depends on.  See the module docstring for
    what is done here once for all backends.
    """
    if not t.xs:
        if e.l1_clear is not None:
            e.l1_clear.zero_()
        return
    device = t.xs[0].device
    name = resolve_backend(backend, device)
    if h.momentum == 0:
        t = t._replace(momentum_ms=None, momentum_ws=None)
    h, e = _place_scalars(h, e, device)
    if name == "reference":
        reference.pilot_step(t, h, e)
        return
    if workspace is None:
        workspace = {}
    flat = [u for s in _streams(t) for u in s]  # every tensor of the call, guarded and bumped
    part = workspace.get("partition")
    if part is None or not part.holds_for(t, flat):
        part = workspace["partition"] = _Partition(t)
    module = _module(name)
    clear = e.l1_clear
    for g_dtype, idx in part.parts.items():
        sub = t if len(idx) == part.n else _pick(t, idx)
        module.pilot_step(sub, h, e._replace(l1_clear=clear), workspace.setdefault((name, g_dtype), {}))
        clear = None
        _bump_versions(flat if sub is t else [u for s in _streams(sub) for u in s])
    if part.rest:
        reference.pilot_step(_pick(t, part.rest), h, e._replace(l1_clear=clear))
