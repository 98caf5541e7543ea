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

The module is compiled on first use (:class:`.cpu_build.JitExtension`; tens of seconds,
cached in ``TORCH_EXTENSIONS_DIR`` for every later process).  :func:`ready` never waits
for that: its first call starts the build in a background thread and says so in one
line, and ``backend="auto"`` steps with the (bitwise equal) reference until the module
is loaded.  A failed build is remembered, so a process never retries it; ``auto`` then
stays on the reference with one warning, while an explicit ``backend="cpu"`` waits for
the build (:func:`load_extension`) and raises its error, which names the fix.
"""
from __future__ import annotations

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
EXTENSION = cpu_build.JitExtension("pilot_kernels_cpu", ("cpu/pilot_step_cpu.cpp",), "fused cpu")
BUILDING_NOTICE = EXTENSION.notice

ready = EXTENSION.ready                  # loaded yet? never waits (backend="auto")
load_extension = EXTENSION.load          # the module, waiting for its build
available = EXTENSION.available          # can it run here? waits for the build
build_error = EXTENSION.build_error      # why it could not be built, or None


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
