"""The fused CPU backend of the HAM step (C++ in ``csrc/cpu/ham_step_cpu.cpp``, built just
in time with :mod:`.cpu_build`'s flags, cached like the PILoT module).

Per element, fp32 parameters: HAM-AdamW reads ``g, θ, m, v`` and writes ``θ, m, v`` (28
bytes, what a fused AdamW moves), HAM-SGD with momentum reads ``g, θ, b`` and writes
``θ, b`` (20 bytes), the mirror step alone 12 bytes; no temporaries.  Results are bitwise
equal to :func:`pilot_kernels.kernels.ham_reference.step`.

Layout: constants → kernel (the C++ file, :func:`load_extension`) → launcher
(:func:`_launch`) → public wrapper (:func:`step`, the backend interface).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from . import cpu_build, ham_reference
from .ham_api import HamExtras, HamHparams, HamTensors
from .layout import walkable

__all__ = ["step", "load_extension", "available", "build_error"]

# ----------------------------------------------------------------------- constants
SOURCE = "cpu/ham_step_cpu.cpp"
_BASE_CODE = {"none": 0, "adamw": 1, "sgd": 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------- kernel
_LOCK = threading.Lock()
_EXT = None
_ERROR: Optional[BaseException] = None  # a failed build, kept so it is never retried


def _jit_load():
    """cpu_build's toolchain check and flags, for this one source (folds into cpu_build)."""
    from torch.utils import cpp_extension

    cpu_build.check_toolchain()
    cap = cpu_build.capability()
    d = cpu_build.csrc_dir()
    flags, ldflags = cpu_build.cxx_flags(cap), cpu_build.ld_flags()
    digest = cpu_build.source_digest(d, (SOURCE,), (flags, ldflags, torch.__version__))
    return cpp_extension.load(name=f"pilot_kernels_ham_cpu_{cap.lower()}_{digest}",
                              sources=[str(d / SOURCE)], extra_cflags=flags,
                              extra_ldflags=ldflags, verbose=False)


def load_extension():
    """The compiled module (built or loaded from the cache on the first call)."""
    global _EXT, _ERROR
    if _EXT is None:
        with _LOCK:
            if _EXT is None and _ERROR is None:
                try:
                    _EXT = _jit_load()
                except Exception as e:  # no compiler, no ninja, a compile error, ...
                    _ERROR = RuntimeError(f"building the HAM cpu extension failed ({e}); "
                                          f"use backend='reference'")
            if _EXT is None:
                raise _ERROR
    return _EXT


def available() -> bool:
    try:
        load_extension()
    except Exception:
        return False
    return True


def build_error() -> Optional[BaseException]:
    return _ERROR


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


def _pick(seq, idx):
    return None if seq is None else [seq[i] for i in idx]


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
    fused, slow = {}, []
    for i, (p, g) in enumerate(zip(t.params, t.grads)):
        state = []
        if h.base == "adamw":
            state = [t.exp_avgs[i], t.exp_avg_sqs[i]]
        elif momentum:
            state = [t.momentum_bufs[i]]
        ok = (p.device.type == "cpu" and p.dtype in _DTYPES and g.dtype in _DTYPES
              and all(s.dtype == torch.float32 for s in state) and walkable(p, g, *state))
        (fused.setdefault(g.dtype, []) if ok else slow).append(i)
    ext = load_extension()
    e_kernel = e._replace(found_inf=None)
    for idx in fused.values():
        sub = HamTensors(*(_pick(seq, idx) for seq in t))
        _launch(ext, sub, h, e_kernel, momentum)
    if slow:
        ham_reference.step(HamTensors(*(_pick(seq, slow) for seq in t)), h, e_kernel)
