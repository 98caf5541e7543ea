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

Per element the kernel reads ``x, g, m, w, b_m, b_w`` and writes ``m, w, b_m, b_w, x``
(44 bytes for fp32 with momentum; 40 with ``adopt_writes=False``, which does not read
``x``), bit for bit the Triton kernel's and the reference's results.
"""
from __future__ import annotations

import importlib
import threading
import warnings
from typing import Optional

from . import cuda_build, split_scalar
from .api import StepExtras, StepHparams, StepTensors

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


def pilot_step(t: StepTensors, h: StepHparams, e: StepExtras = StepExtras(),
               workspace: Optional[dict] = None) -> None:
    """One fused PILoT step of exactly ``t``; semantics:
    :func:`pilot_kernels.kernels.reference.pilot_step`.

    Takes what :func:`pilot_kernels.kernels.run_step` hands a kernel: CUDA tensors of one
    device and one parameter dtype (float32, bfloat16 or float16), gradients of one dtype
    (the parameters' or float32), ``m``, ``w`` and the momentum buffers float32, every
    entry walkable (:mod:`pilot_kernels.kernels.layout`), and ``grad_scale``/``found_inf``/
    ``l1_*`` and a tensor ``lr``/``alpha`` as 1-element float32 tensors on that device,
    read and written only by the kernel.  The binding checks each of these
    (``TORCH_CHECK``) before anything is written.  ``workspace`` (a dict kept between
    calls) caches the kernel's table on the device, so an unchanged set of tensors costs
    no upload and the step can be captured in a CUDA graph after a warm-up step.
    """
    ext = load_extension()
    lr_value, lr_tensor = split_scalar(h.lr)
    alpha_value, alpha_tensor = split_scalar(h.alpha)
    has_momentum = h.momentum != 0
    ext.pilot_step(
        list(t.xs), list(t.grads), list(t.ms), list(t.ws),
        list(t.momentum_ms) if has_momentum else None,
        list(t.momentum_ws) if has_momentum else None,
        [bool(f) for f in t.firsts],
        lr_value, lr_tensor, float(h.momentum), float(h.dampening), bool(h.nesterov),
        alpha_value, alpha_tensor, float(h.weight_decay), bool(h.maximize),
        float(h.beta), bool(h.adopt_writes),
        e.grad_scale, e.found_inf, e.l1_accum, e.l1_clear, workspace,
    )
