"""The fused CPU backend of the HAM step (C++ in ``csrc/cpu/ham_step_cpu.cpp``, built just
in time by a :class:`.cpu_build.JitExtension` like the PILoT module: in the background on
first use, ``backend="auto"`` stepping with the reference meanwhile; cached afterwards).

Per element, fp32 parameters: HAM-AdamW reads ``g, θ, m, v`` and writes ``θ, m, v`` (28
bytes, what a fused AdamW moves), HAM-SGD with momentum reads ``g, θ, b`` and writes
``θ, b`` (20 bytes), the mirror step alone 12 bytes; no temporaries.  Results are bitwise
equal to :func:`pilot_kernels.kernels.ham_reference.step`.

Layout: constants → kernel (the C++ file, :func:`load_extension`) → launcher
(:func:`_launch`) → public wrapper (:func:`step`, the backend interface).
"""
from __future__ import annotations

import torch

from . import cpu_build, ham_reference
from .ham_api import HamExtras, HamHparams, HamTensors, kernel_groups

__all__ = ["step", "ready", "load_extension", "available", "build_error"]

# ----------------------------------------------------------------------- constants
_BASE_CODE = {"none": 0, "adamw": 1, "sgd": 2}

# ----------------------------------------------------------------------- kernel
EXTENSION = cpu_build.JitExtension("pilot_kernels_ham_cpu", ("cpu/ham_step_cpu.cpp",), "HAM cpu")

ready = EXTENSION.ready                  # loaded yet? never waits (backend="auto")
load_extension = EXTENSION.load          # the module, waiting for its build
available = EXTENSION.available          # can it run here? waits for the build
build_error = EXTENSION.build_error      # why it could not be built, or None


# ----------------------------------------------------------------------- launcher
def _f(v) -> float:
    """A scalar as a double for the kernel; a CPU tensor is read without a device sync."""
    return float(v)


def _launch(ext, t: HamTensors, h: HamHparams, e: HamExtras, momentum: bool) -> None:
    state1 = t.exp_avgs if h.base == "adamw" else (t.momentum_bufs if momentum else [])
    state2 = t.exp_avg_sqs if h.base == "adamw" else []
    ext.ham_step(
        t.params, t.grads, state1 or [], state2 or [],
        list(t.firsts) if t.firsts is not None else [False] * len(t.params),
        _BASE_CODE[h.base], momentum, _f(h.lr), float(h.alpha), float(h.beta), bool(h.maximize),
        e.grad_scale is not None, _f(e.grad_scale) if e.grad_scale is not None else 1.0,
        float(h.weight_decay), _f(h.decay), float(h.beta1), float(h.beta2), float(h.eps),
        _f(h.step_size), _f(h.bias_correction2_sqrt), float(h.momentum), float(h.dampening),
        bool(h.nesterov))
    torch.autograd.graph.increment_version(list(t.params) + list(state1 or []) + list(state2 or []))


# ----------------------------------------------------------------------- public
def step(t: HamTensors, h: HamHparams, e: HamExtras = HamExtras(), workspace: dict = None) -> None:
    """Fused HAM step; same contract as :func:`pilot_kernels.kernels.ham_reference.step`.

    Tensors the kernel cannot walk linearly together with their parameter (other strides,
    non-fp32 state, an unsupported dtype) go to the reference, so results never depend on
    memory layout; the rest run in one kernel call per gradient dtype."""
    if not t.params:
        return
    if e.found_inf is not None and float(e.found_inf) != 0:
        return                                  # AMP: the step changes nothing
    momentum = h.base == "sgd" and h.momentum != 0
    groups, rest = kernel_groups(t, h, device_type="cpu")
    ext = load_extension()
    e_kernel = e._replace(found_inf=None)
    for sub in groups:
        _launch(ext, sub, h, e_kernel, momentum)
    if rest is not None:
        ham_reference.step(rest, h, e_kernel)
