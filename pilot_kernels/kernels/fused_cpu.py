"""The fused CPU backend: every reparameterized tensor of a call in one vectorized,
multithreaded pass (C++ in ``csrc/cpu/``, built just in time).

Per element the kernel reads ``x, g, m, w, b_m, b_w`` and writes ``m, w, b_m, b_w, x``:
44 bytes for fp32 parameters with momentum (40 with ``adopt_writes=False``, which leaves
``x`` unread), against ~256 for the reference's separate torch ops, and no temporary the
size of a tensor.  ``Σ|m·w|`` is summed in the same pass.  An element of ``x`` that is
not, bit for bit, the ``m·w`` the last step wrote was written by someone else since; it
is re-split from its value in the same pass and its momentum restarts.  m, w, both
momentum buffers and x are bitwise equal to
:func:`pilot_kernels.kernels.reference.pilot_step`: the C++ repeats its fp32 operations
(and :func:`pilot_kernels.init.split`'s) in the same order with no multiply-add
contraction.  Only ``Σ|m·w|`` differs in the last bits (another summation order).
Measurements: ``docs/cpu_backend.md``.

The module is compiled on first use (:mod:`.cpu_build`; tens of seconds, cached in
``TORCH_EXTENSIONS_DIR`` for every later process).  :func:`ready` never waits for that:
its first call starts the build in a background thread and says so in one line, and
``backend="auto"`` steps with the (bitwise equal) reference until the module is loaded.
A failed build is remembered, so a process never retries it; ``auto`` then stays on the
reference with one warning, while an explicit ``backend="cpu"`` waits for the build
(:func:`load_extension`) and raises its error, which names the fix.
"""
from __future__ import annotations

import atexit
import sys
import threading
import warnings
from typing import Optional

from . import cpu_build
from .api import StepExtras, StepHparams, StepTensors

__all__ = ["pilot_step", "ready", "load_extension", "available", "build_error"]

# The kernel's constants live beside the code that uses them (csrc/cpu/pilot_step_cpu.cpp):
#   kGrain = 32768    elements per thread at least: smaller calls (2,000 tensors of ~100
#                     elements still make two tasks) run on the caller, where a parallel
#                     region would cost more than it saves;
#   kL1Block = 1024   |x| is summed in fp32 lanes per 1,024 elements, then in double, so
#                     Σ|m·w| stays as accurate as torch's cascade sum.
# Vector width: torch's runtime CPU capability (cpu_build.capability()).

# ----------------------------------------------------------------------- the module
_LOCK = threading.Lock()
_EXT = None
_ERROR: Optional[BaseException] = None  # a failed build, kept so it is never retried
_BUILDER: Optional[threading.Thread] = None  # the background build, once started
_WARNED = False  # the failed-build notice is given once per process

BUILDING_NOTICE = (
    "pilot_kernels: compiling the fused cpu step in the background (first use on this "
    "machine, cached afterwards); the reference backend, bitwise equal, steps meanwhile"
)


def _build() -> None:
    global _EXT, _ERROR
    try:
        _EXT = cpu_build.jit_load()
    except Exception as e:  # no compiler, no ninja, a compile error, ...
        _ERROR = e


def _join_build() -> None:
    if _BUILDER is not None:
        _BUILDER.join()


def _finish_build_at_exit() -> None:
    # Older torch versions lock a build with a file whose mere existence blocks (FileBaton):
    # a build cut off at exit would leave it behind and every later process waiting on
    # it, so the interpreter finishes the build (which then is cached) and says so.
    if _BUILDER is not None and _BUILDER.is_alive():
        print("pilot_kernels: finishing the cpu build before exiting, so that later "
              "processes find it cached", file=sys.stderr, flush=True)
        _BUILDER.join()


def ready() -> bool:
    """Whether the kernel is loaded, never waiting for a compile (``backend="auto"``).

    The first call loads a cached build at once, or starts the build in a background
    thread and prints one line to stderr saying so; until the build is done (and for
    good after a failed one, which is announced by one warning) this returns False.
    """
    global _BUILDER, _WARNED
    if _EXT is not None:
        return True
    if _ERROR is None and _BUILDER is None:
        with _LOCK:
            if _EXT is None and _ERROR is None and _BUILDER is None:
                if cpu_build.is_built():
                    _build()  # only a load
                else:
                    _BUILDER = threading.Thread(target=_build, name="pilot_kernels-cpu-build",
                                                daemon=True)
                    atexit.register(_finish_build_at_exit)
                    print(BUILDING_NOTICE, file=sys.stderr, flush=True)
                    _BUILDER.start()
    if _ERROR is not None and not _WARNED:
        _WARNED = True
        reason = (str(_ERROR).strip().splitlines() or ["unknown error"])[0]
        warnings.warn(
            f"pilot_kernels: the fused cpu backend is unavailable, using the reference "
            f"backend instead ({reason})",
            RuntimeWarning,
            stacklevel=3,
        )
    return _EXT is not None


def load_extension():
    """The compiled module, built or loaded on the first call (waiting for a background
    build that :func:`ready` started); raises the build's RuntimeError (the same one on
    every later call) when it cannot be built."""
    if _EXT is None:
        _join_build()
        with _LOCK:
            if _EXT is None and _ERROR is None:
                _build()
        if _EXT is None:
            raise _ERROR
    return _EXT


def available() -> bool:
    """Whether the kernel can run here (waits for the build on the first call)."""
    try:
        load_extension()
    except Exception:
        return False
    return True


def build_error() -> Optional[BaseException]:
    """Why the module could not be built, or None."""
    return _ERROR


# ----------------------------------------------------------------------- the step
def pilot_step(t: StepTensors, h: StepHparams, e: StepExtras = StepExtras(),
               workspace: Optional[dict] = None) -> None:
    """Fused PILoT step; same contract as :func:`pilot_kernels.kernels.reference.pilot_step`.

    Steps exactly what it is given: CPU tensors, parameters of one dtype (float32,
    bfloat16 or float16) with gradients of that dtype or float32, and ``m``, ``w`` and
    the momentum buffers float32 laid out like ``x`` (dense); anything else raises
    before a tensor is written, naming the fix (:func:`pilot_kernels.kernels.run_step`
    routes such tensors to the reference).  Version counters are left to the caller.
    ``workspace`` is unused: the kernel needs no table between calls.
    """
    momentum = float(h.momentum)
    load_extension().pilot_step(
        t.xs, t.grads, t.ms, t.ws,
        t.momentum_ms if momentum != 0 else None, t.momentum_ws if momentum != 0 else None,
        t.firsts, h.lr, momentum, float(h.dampening), bool(h.nesterov), h.alpha,
        float(h.beta), float(h.weight_decay), bool(h.maximize), bool(h.adopt_writes),
        e.grad_scale, e.found_inf, e.l1_accum, e.l1_clear,
    )
