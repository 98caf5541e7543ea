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
"""
from __future__ import annotations

import importlib
import threading
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import cuda_build

__all__ = ["pilot_step", "load_extension", "loaded_from"]

_LOCK = threading.Lock()
_EXT = None
_LOADED_FROM: Optional[str] = None  # "aot" or "jit"


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
    global _EXT, _LOADED_FROM
    if _EXT is None:
        with _LOCK:
            if _EXT is None:
                ext = _import_aot()
                source = "aot"
                if ext is None:
                    ext = cuda_build.jit_load()
                    source = "jit"
                _EXT, _LOADED_FROM = ext, source
    return _EXT


def loaded_from() -> Optional[str]:
    """``"aot"``, ``"jit"``, or ``None`` before the first call."""
    return _LOADED_FROM


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

    Every tensor of a call must be on one CUDA device; ``x`` and its gradient share one
    dtype (float32, bfloat16 or float16) and ``m``, ``w`` and the momentum buffers are
    float32, all with ``x``'s shape and memory layout.  The momentum lists are given
    exactly when ``momentum != 0``.  ``grad_scale``/``found_inf``/``l1_*`` and a tensor
    ``lr``/``alpha`` are 1-element float32 tensors on that device, read and written only
    by the kernel.  ``workspace`` (a dict kept between calls) caches the kernel's table
    on the device, so an unchanged set of tensors costs no upload and the step can be
    captured in a CUDA graph after a warm-up step.
    """
    ext = load_extension()
    lr, lr_tensor = _scalar_arg(lr)
    alpha, alpha_tensor = _scalar_arg(alpha)
    ext.pilot_step(
        list(xs),
        list(grads),
        list(ms),
        list(ws),
        None if momentum_ms is None else list(momentum_ms),
        None if momentum_ws is None else list(momentum_ws),
        [bool(f) for f in firsts],
        lr,
        lr_tensor,
        float(momentum),
        float(dampening),
        bool(nesterov),
        alpha,
        alpha_tensor,
        float(weight_decay),
        bool(maximize),
        grad_scale,
        found_inf,
        l1_accum,
        l1_clear,
        workspace,
    )
