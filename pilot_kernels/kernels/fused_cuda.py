"""The CUDA C++ backend: the fused PILoT step of ``csrc/`` (one launch per call).

Same signature and semantics as :func:`pilot_kernels.kernels.reference.pilot_step`, for
CUDA tensors of one device and one parameter dtype (float32, bfloat16 or float16; the
state is fp32).  The extension is loaded on the first call:

1. the ahead-of-time module ``pilot_kernels._C`` (``PILOT_BUILD_CUDA=1 pip install -e .
   --no-build-isolation``), if importable;
2. otherwise a just-in-time ninja build of ``csrc/`` (:func:`cuda_build.jit_load`),
   cached in torch's extensions directory (``TORCH_EXTENSIONS_DIR``), so only the very
   first call on a machine pays for the compile.

Importing this module never fails for lack of CUDA; calling :func:`pilot_step` without a
CUDA build of torch or a CUDA toolkit raises a RuntimeError that names the fix.

Tensors the kernel cannot walk (a layout outside :mod:`pilot_kernels.kernels.layout`'s
contract, or a gradient whose dtype differs from its parameter's) are stepped by the
reference backend in the same call, as the Triton backend does: results never depend on
memory layout, only speed does.
"""
from __future__ import annotations

import importlib
import threading
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import cuda_build, reference

__all__ = ["pilot_step", "load_extension"]

_LOCK = threading.Lock()
_EXT = None


def _import_aot():
    try:
        return importlib.import_module(cuda_build.AOT_MODULE)
    except ModuleNotFoundError as e:
        if e.name != cuda_build.AOT_MODULE:  # the module exists but a dependency is missing
            warnings.warn(f"{cuda_build.AOT_MODULE} failed to import ({e}); building the cuda backend just in time")
        return None
    except (ImportError, OSError) as e:  # e.g. built against another torch: undefined symbols
        warnings.warn(
            f"{cuda_build.AOT_MODULE} failed to import ({e}); it was probably built against "
            "another torch. Building the cuda backend just in time; rebuild it with "
            "PILOT_BUILD_CUDA=1 pip install -e . --no-build-isolation"
        )
        return None


def load_extension():
    """The compiled module (ahead of time if installed, else built just in time)."""
    global _EXT
    if _EXT is None:
        with _LOCK:
            if _EXT is None:
                _EXT = _import_aot() or cuda_build.jit_load()
    return _EXT


def _scalar_arg(v: Union[float, Tensor]) -> tuple[float, Optional[Tensor]]:
    """A hyperparameter as (value, device tensor): a device tensor is read by the kernel
    (as fp32, like the reference's fp32 ops do); a CPU tensor is a host scalar (no sync)."""
    if not isinstance(v, Tensor):
        return float(v), None
    if v.device.type == "cpu":
        return float(v), None
    return 0.0, v if v.dtype == torch.float32 else v.to(torch.float32)


def pilot_step(
    xs: Sequence[Tensor],
    grads: Sequence[Tensor],
    ms: Sequence[Tensor],
    ws: Sequence[Tensor],
    momentum_ms: Optional[Sequence[Tensor]],
    momentum_ws: Optional[Sequence[Tensor]],
    firsts: Sequence[bool],
    *,
    lr: Union[float, Tensor],
    momentum: float,
    dampening: float,
    nesterov: bool,
    alpha: Union[float, Tensor],
    weight_decay: float,
    maximize: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    l1_accum: Optional[Tensor] = None,
    l1_clear: Optional[Tensor] = None,
    workspace: Optional[dict] = None,
) -> None:
    """One fused PILoT step; see :func:`pilot_kernels.kernels.reference.pilot_step`.

    Every tensor of a call must be on one CUDA device; ``x`` is float32, bfloat16 or
    float16 (one dtype per call), its gradient any of those, and ``m``, ``w`` and the
    momentum buffers are float32, all with ``x``'s shape.  Entries the kernel cannot walk
    (another layout than ``x``'s, or a gradient dtype other than ``x``'s) are stepped by
    the reference in the same call.  The momentum lists are given exactly when
    ``momentum != 0``.  ``grad_scale``/``found_inf``/``l1_*`` and a tensor
    ``lr``/``alpha`` are 1-element float32 tensors on that device, read and written only
    by the kernel.  ``workspace`` (a dict kept between calls) caches the kernel's table
    on the device, so an unchanged set of tensors costs no upload and the step can be
    captured in a CUDA graph after a warm-up step.
    """
    ext = load_extension()
    lr_value, lr_tensor = _scalar_arg(lr)
    alpha_value, alpha_tensor = _scalar_arg(alpha)
    slow = ext.pilot_step(
        list(xs),
        list(grads),
        list(ms),
        list(ws),
        None if momentum_ms is None else list(momentum_ms),
        None if momentum_ws is None else list(momentum_ws),
        [bool(f) for f in firsts],
        lr_value,
        lr_tensor,
        float(momentum),
        float(dampening),
        bool(nesterov),
        alpha_value,
        alpha_tensor,
        float(weight_decay),
        bool(maximize),
        grad_scale,
        found_inf,
        l1_accum,
        l1_clear,
        workspace,
    )
    if slow:
        def pick(seq):
            return None if seq is None else [seq[i] for i in slow]

        # Same stream, after the kernel: the reference adds its part of Σ|m·w| to
        # l1_accum; l1_clear has been cleared by the extension already.
        reference.pilot_step(
            pick(xs), pick(grads), pick(ms), pick(ws), pick(momentum_ms), pick(momentum_ws),
            pick(firsts), lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
            alpha=alpha, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
            found_inf=found_inf, l1_accum=l1_accum, l1_clear=None,
        )
