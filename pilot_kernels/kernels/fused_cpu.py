"""The fused CPU backend: every reparameterized tensor of a call in one vectorized,
multithreaded pass (C++ in ``csrc/cpu/``, built just in time).

Per element the kernel reads ``g, m, w, b_m, b_w`` and writes ``m, w, b_m, b_w, x``:
40 bytes for fp32 parameters with momentum, against ~256 for the reference's separate
torch ops (about 64 tensor-sized passes per tensor), and no temporary the size of a
tensor.  ``Σ|m·w|`` is summed in the same pass.  m, w, both momentum buffers and x are
bitwise equal to :func:`pilot_kernels.kernels.reference.pilot_step`: the C++ repeats its
fp32 operations in the same order with no multiply-add contraction.  Only ``Σ|m·w|``
differs in the last bits (another summation order).  Measured on two shared, loaded
cores (``bench_step.py --device cpu --threads 2``, min of 15 interleaved rounds):
ResNet-50's 161 tensors in 110 ms, against 273 ms for ``SGD(foreach=True)``, 4.2 s for
the reference and 50 ms for a ``copy_`` of the same 25.6 M elements.

Layout: constants → kernel (``csrc/cpu/pilot_step_cpu.cpp``, loaded by
:func:`load_extension`) → launcher (``_launch``) → public wrapper (:func:`pilot_step`,
the backend interface of :mod:`pilot_kernels.kernels`).

The module is compiled on the first call (:mod:`.cpu_build`; tens of seconds, cached in
``TORCH_EXTENSIONS_DIR`` for every later process).  A failed build is remembered, so a
process never retries it; ``backend="auto"`` then falls back to the reference with one
warning, while an explicit ``backend="cpu"`` raises the build's error, which names the fix.
"""
from __future__ import annotations

import threading
from typing import Optional, Sequence, Union

from torch import Tensor

from . import cpu_build, reference, split_scalar

__all__ = ["pilot_step", "load_extension", "available"]

# ----------------------------------------------------------------------- constants
# The kernel's constants live beside the code that uses them (csrc/cpu/pilot_step_cpu.cpp):
#   kGrain = 32768    elements per thread at least: smaller calls (2,000 tensors of ~100
#                     elements still make two tasks) run on the caller, where a parallel
#                     region would cost more than it saves;
#   kL1Block = 1024   |x| is summed in fp32 lanes per 1,024 elements, then in double, so
#                     Σ|m·w| stays as accurate as torch's cascade sum.
# Vector width: torch's runtime CPU capability (cpu_build.capability()).

# ----------------------------------------------------------------------- kernel
_LOCK = threading.Lock()
_EXT = None
_ERROR: Optional[BaseException] = None  # a failed build, kept so it is never retried


def load_extension():
    """The compiled module, built or loaded from the cache on the first call; raises the
    build's RuntimeError (the same one on every later call) when it cannot be built."""
    global _EXT, _ERROR
    if _EXT is None:
        with _LOCK:
            if _EXT is None and _ERROR is None:
                try:
                    _EXT = cpu_build.jit_load()
                except Exception as e:  # no compiler, no ninja, a compile error, ...
                    _ERROR = e
            if _EXT is None:
                raise _ERROR
    return _EXT


def available() -> bool:
    """Whether the kernel can run here (builds it on the first call)."""
    try:
        load_extension()
    except Exception:
        return False
    return True


def build_error() -> Optional[BaseException]:
    """Why :func:`available` is False, or None."""
    return _ERROR


# ----------------------------------------------------------------------- launcher
def _launch(ext, xs, grads, ms, ws, momentum_ms, momentum_ws, firsts, *, lr, momentum, dampening,
            nesterov, alpha, weight_decay, maximize, grad_scale, found_inf, l1_accum,
            l1_clear) -> list[int]:
    """One call of the kernel; returns the indices it left to the reference."""
    lr, lr_tensor = split_scalar(lr)
    alpha, alpha_tensor = split_scalar(alpha)
    return ext.pilot_step(
        xs, grads, ms, ws, momentum_ms, momentum_ws, firsts,
        lr, lr_tensor, float(momentum), float(dampening), bool(nesterov),
        alpha, alpha_tensor, float(weight_decay), bool(maximize),
        grad_scale, found_inf, l1_accum, l1_clear,
    )


# ----------------------------------------------------------------------- public
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
    """Fused PILoT step; same contract as :func:`pilot_kernels.kernels.reference.pilot_step`.

    Every tensor is on the CPU; parameters share one dtype (float32, bfloat16 or
    float16), and ``m``, ``w`` and the momentum buffers are float32 with ``x``'s shape.
    A tensor whose storage the kernel cannot walk linearly together with ``x``'s (a state
    or gradient with other strides, a non-dense ``x``, a gradient dtype differing from
    the call's first) is updated by the reference instead, so results never depend on
    memory layout.  ``workspace`` is unused: the kernel needs no table between calls.
    """
    if not xs:
        return
    if momentum == 0:
        momentum_ms = momentum_ws = None
    hparams = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, alpha=alpha,
                   weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
                   found_inf=found_inf)
    slow = _launch(load_extension(), xs, grads, ms, ws, momentum_ms, momentum_ws, firsts,
                   l1_accum=l1_accum, l1_clear=l1_clear, **hparams)
    if slow:
        def pick(seq):
            return [seq[i] for i in slow] if seq is not None else None

        # The kernel already cleared l1_clear.
        reference.pilot_step(pick(xs), pick(grads), pick(ms), pick(ws), pick(momentum_ms),
                             pick(momentum_ws), pick(firsts), l1_accum=l1_accum, **hparams)
