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
from typing import Optional, Sequence

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


def pilot_step(
    xs: Sequence[Tensor],
    grads: Sequence[Tensor],
    ms: Sequence[Tensor],
    ws: Sequence[Tensor],
    momentum_ms: Optional[Sequence[Tensor]],
    momentum_ws: Optional[Sequence[Tensor]],
    firsts: Sequence[bool],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    alpha: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    l1_accum: Optional[Tensor] = None,
    l1_clear: Optional[Tensor] = None,
) -> None:
    """One fused PILoT step; see :func:`pilot_kernels.kernels.reference.pilot_step`.

    Every tensor of a call must be on one CUDA device; ``x`` and its gradient share one
    dtype (float32, bfloat16 or float16) and ``m``, ``w`` and the momentum buffers are
    float32, all with ``x``'s shape and memory layout.  The momentum lists are given
    exactly when ``momentum != 0``.  ``grad_scale``/``found_inf``/``l1_*`` are 1-element
    float32 tensors on that device; they are read and written only by the kernel.
    """
    ext = load_extension()
    ext.pilot_step(
        list(xs),
        list(grads),
        list(ms),
        list(ws),
        None if momentum_ms is None else list(momentum_ms),
        None if momentum_ws is None else list(momentum_ws),
        [bool(f) for f in firsts],
        float(lr),
        float(momentum),
        float(dampening),
        bool(nesterov),
        float(alpha),
        float(weight_decay),
        bool(maximize),
        grad_scale,
        found_inf,
        l1_accum,
        l1_clear,
    )
