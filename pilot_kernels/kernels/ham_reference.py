"""Plain-torch HAM step: the oracle every HAM backend is tested against.

HAM (Hyperbolic Aware Minimization, Jacobs, Gadhikar, Rubio-Madrigal & Burkholz, ICLR
2026) follows a base optimizer's step with a hyperbolic mirror step on the weights::

    θ½      = base_step(θ_k)                              (AdamW, SGD, ... or none)
    θ_{k+1} = θ½ · exp(clamp(−η · (α · sign(θ½) · g + β), −5, 5)),   g = ∇f(θ_k)

Every line below is one torch op, in fp32, per tensor.  The fused backends repeat the
same operations in the same order with one rounding each, and use a fused multiply-add
exactly where torch's own kernels do (``lerp``, ``addcmul``: see :func:`fma`), so they
agree with this file bit for bit; with α = β = 0 the SGD part is torch.optim.SGD (``foreach=False``) bit for bit for fp32
parameters, and so is the AdamW part wherever torch's ``sqrt`` is correctly rounded (CUDA;
CPU builds without MKL; on MKL builds it differs in the last bit of ``θ`` where MKL's
``sqrt`` does, see :func:`sqrt_rn`).

``exp`` is :func:`det_exp`, built from IEEE basic operations only, so that torch, Triton
and C++ produce the same bits (``torch.exp``, Triton's ``tl.exp`` and libm's ``expf``
differ from each other in the last bit).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .ham_api import HamExtras, HamHparams, HamTensors

__all__ = ["step", "det_exp", "sqrt_rn", "mirror", "fma", "EXP_CLAMP", "EXP_CONSTANTS"]

#: The exponent of the mirror step is clamped to [−EXP_CLAMP, EXP_CLAMP] (the paper's).
EXP_CLAMP = 5.0

# det_exp's constants, all exact fp32 values (the kernels use the same hex literals).
_LOG2E = float.fromhex("0x1.715476p+0")       # 1/ln 2 rounded to fp32
_LN2_HI = float.fromhex("0x1.62e4p-1")        # ln 2's first 16 bits: k·_LN2_HI is exact
_LN2_LO = float.fromhex("0x1.7f7d1cp-20")     # ln 2 − _LN2_HI
_ROUND = 12582912.0                           # 1.5·2^23: (t + _ROUND) − _ROUND = rint(t)
# e^r ≈ 1 + r + c2 r² + ... + c6 r⁶ on |r| ≤ ln2/2: a least-squares fit in relative error
# on Chebyshev nodes, rounded to fp32 (≤ 1.2 ulp from e^z over [−5, 5], tests/test_ham_exp.py).
_POLY = tuple(float.fromhex(h) for h in (
    "0x1.6a0ff4p-10", "0x1.121254p-7", "0x1.55581ap-5", "0x1.5554d8p-3", "0x1.fffffep-2",
    "0x1p+0", "0x1p+0"))                      # c6, c5, ..., c1, c0 (Horner order)
EXP_CONSTANTS = dict(log2e=_LOG2E, ln2_hi=_LN2_HI, ln2_lo=_LN2_LO, round=_ROUND, poly=_POLY)


def fma(a: Tensor, b, c: Tensor) -> Tensor:
    """``a·b + c`` rounded once: torch's ``addcmul`` (value 1) is a fused multiply-add on
    CPU and CUDA, as are ``lerp`` and ``add(alpha=)``, the ops torch's AdamW and SGD use."""
    return torch.addcmul(c, a, b) if isinstance(b, Tensor) else torch.add(c, a, alpha=b)


def sqrt_rn(v: Tensor) -> Tensor:
    """IEEE ``sqrt`` of fp32 ``v``, correctly rounded (what CUDA, ``std::sqrt`` and Triton's
    ``sqrt_rn`` compute).  torch's CPU ``sqrt`` goes through MKL's vsSqrt where torch is
    built with MKL, which is off by one ulp for about a fifth of the inputs; its result is
    moved to the neighbour the midpoint test asks for (squares of 25-bit midpoints are
    exact in fp64, and a square root never lies exactly on a midpoint)."""
    s = v.sqrt()
    up, down = torch.nextafter(s, s.new_tensor(float("inf"))), torch.nextafter(s, s.new_tensor(0.0))
    vd, sd = v.double(), s.double()
    hi, lo = (sd + up.double()) * 0.5, (sd + down.double()) * 0.5
    s = torch.where(vd > hi * hi, up, s)
    return torch.where(vd < lo * lo, down, s)


def det_exp(z: Tensor) -> Tensor:
    """``e^z`` for fp32 ``z`` in [−5, 5] (NaN propagates) from IEEE-exact basic ops.

    ``z = k·ln2 + r`` with ``k = rint(z/ln2)``; ``k·ln2`` is subtracted in two parts
    (Cody–Waite) so ``r`` carries one rounding; ``e^r`` is a degree-6 polynomial by
    Horner with a separate multiply and add per term; ``2^k`` is built from its exponent
    bits, so the final scaling is exact."""
    k = (z * _LOG2E + _ROUND) - _ROUND
    r = z - k * _LN2_HI                 # exact (Sterbenz)
    r = r - k * _LN2_LO
    p = torch.full_like(r, _POLY[0])
    for c in _POLY[1:]:
        p = p * r + c
    k = torch.nan_to_num(k).to(torch.int32)   # NaN z: p is NaN already
    return p * ((k + 127) << 23).view(torch.float32)


def mirror(theta: Tensor, g: Tensor, lr, alpha: float, beta: float) -> Tensor:
    """The mirror step on fp32 ``θ½`` with fp32 ``g``: ``θ½ · exp(clamp(−lr·(α·sign(θ½)·g + β)))``.

    ``sign(0)`` is irrelevant: an exact zero is multiplied by a finite factor, so zeros
    stay zeros (their sign included); a NaN in ``g`` makes that element NaN, as it would
    under the base step."""
    sg = torch.where(theta < 0, -g, g)          # sign(θ½)·g (θ½ = 0: anything finite)
    z = (sg * alpha + beta) * (-lr)
    z = z.clamp(-EXP_CLAMP, EXP_CLAMP)          # NaN stays NaN
    return theta * det_exp(z)


def _adamw(theta, g, exp_avg, exp_avg_sq, h: HamHparams):
    """torch.optim.AdamW's ``_single_tensor_adam`` (decoupled decay), out of place."""
    if h.weight_decay != 0:
        theta = theta * h.decay
    exp_avg = torch.lerp(exp_avg, g, 1 - h.beta1)
    exp_avg_sq = fma(g * (1 - h.beta2), g, exp_avg_sq * h.beta2)
    denom = sqrt_rn(exp_avg_sq) / h.bias_correction2_sqrt + h.eps
    theta = theta + (exp_avg * (-h.step_size)) / denom   # addcdiv_(value=−step_size)
    return theta, exp_avg, exp_avg_sq


def _sgd(theta, g, buf, first, h: HamHparams):
    """torch.optim.SGD's ``_single_tensor_sgd``, out of place (``buf`` None: no momentum)."""
    d = fma(theta, h.weight_decay, g) if h.weight_decay != 0 else g
    if buf is not None:
        buf = d if first else fma(d, 1 - h.dampening, buf * h.momentum)
        d = fma(buf, h.momentum, d) if h.nesterov else buf
    return fma(d, -h.lr, theta), buf


def step(t: HamTensors, h: HamHparams, e: HamExtras = HamExtras(), workspace: dict = None) -> None:
    """One HAM step, in place, for tensors of one (device, dtype, param group).

    ``t.params`` are read (any float dtype, computed on in fp32) and overwritten with
    θ_{k+1}; the base's fp32 state in ``t`` is updated in place.  ``e.found_inf`` nonzero:
    nothing changes.  Nothing is read on the host (no sync).  ``workspace`` is unused."""
    skip = None if e.found_inf is None else e.found_inf.reshape(()).ne(0)
    momentum = h.base == "sgd" and h.momentum != 0
    for i, (p, g) in enumerate(zip(t.params, t.grads)):
        g = g.float()
        if e.grad_scale is not None:                    # AMP unscale
            g = g / e.grad_scale.reshape(())
        if h.maximize:
            g = -g
        theta = p.float()
        new = {}
        if h.base == "adamw":
            theta, new["exp_avg"], new["exp_avg_sq"] = _adamw(
                theta, g, t.exp_avgs[i], t.exp_avg_sqs[i], h)
            olds = {"exp_avg": t.exp_avgs[i], "exp_avg_sq": t.exp_avg_sqs[i]}
        elif h.base == "sgd":
            buf = t.momentum_bufs[i] if momentum else None
            theta, new_buf = _sgd(theta, g, buf, momentum and t.firsts[i], h)
            olds = {"buf": buf} if momentum else {}
            if momentum:
                new["buf"] = new_buf
        else:
            olds = {}
        if h.alpha != 0 or h.beta != 0:                 # α = β = 0: the base step alone
            theta = mirror(theta, g, h.lr, h.alpha, h.beta)
        theta = theta.to(p.dtype)
        if skip is not None:                            # AMP: an inf/NaN step changes nothing
            theta = torch.where(skip, p, theta)
            new = {k: torch.where(skip, olds[k], v) for k, v in new.items()}
        for k, v in new.items():
            olds[k].copy_(v)
        p.copy_(theta)
