"""One-pass HAM step in Triton: base step (AdamW, SGD or none) and the hyperbolic mirror
step for every tensor of a (device, dtype, param group) in one launch (one per gradient
dtype).

Bytes per element, fp32 parameters: HAM-AdamW reads ``g, θ, m, v`` and writes ``θ, m, v``
(28 B, what torch's fused AdamW moves); HAM-SGD with momentum reads ``g, θ, b`` and writes
``θ, b`` (20 B); the mirror step alone reads ``g, θ`` and writes ``θ`` (12 B).  No
temporary the size of a tensor; the per-tensor table is 56 bytes per tensor.

Exactness.  Launched with FP contraction off (``enable_fp_fusion=False``), IEEE division
and square root (``div_rn``, ``sqrt_rn``), every value is one fp32 op of
:mod:`pilot_kernels.kernels.ham_reference` in the same order; ``tl.fma`` stands exactly
where torch's own kernels fuse (``lerp``, ``addcmul``, ``add(alpha=)``).  Triton's CPU
interpreter (the tests' ``TRITON_INTERPRET=1``) evaluates ``tl.fma`` as a multiply and an
add, so there :func:`_fma` emulates it in fp64 with round-to-odd, which is exact.  ``exp``
is the reference's ``det_exp``, never ``tl.exp`` (approximate on GPUs).

Layout follows Liger-Kernel's ops: constants → ``@triton.jit`` kernels → launcher →
public wrapper (:func:`step`, the backend interface of :mod:`.ham_backends`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import ham_reference, triton_interpreting
from .fused_triton import _round_to_bf16_rne
from .ham_api import HamExtras, HamHparams, HamTensors, kernel_groups

# ----------------------------------------------------------------------- constants
# Elements per program: 1024 fp32 elements with 4 warps give each thread 8 per stream.
# Not yet tuned on a GPU.
BLOCK_SIZE = 1024
NUM_WARPS = 4
# No @triton.autotune: it replays the launch, and the kernel updates its inputs in place.
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)

# Per-tensor table (int64 rows): element offsets from each stream's base pointer, size,
# first program, momentum first-step flag.
COLUMNS = ("p", "g", "s1", "s2", "numel", "block_begin", "first")
ROW = tl.constexpr(len(COLUMNS))
_P, _G, _S1, _S2, _NUMEL, _BLOCK_BEGIN, _FIRST = (tl.constexpr(i) for i in range(len(COLUMNS)))

_BASE_CODE = {"none": 0, "adamw": 1, "sgd": 2}

_C = ham_reference.EXP_CONSTANTS
LOG2E = tl.constexpr(_C["log2e"])
LN2_HI = tl.constexpr(_C["ln2_hi"])
LN2_LO = tl.constexpr(_C["ln2_lo"])
ROUND = tl.constexpr(_C["round"])
C6, C5, C4, C3, C2, C1, C0 = (tl.constexpr(c) for c in _C["poly"])
CLAMP = tl.constexpr(ham_reference.EXP_CLAMP)


# ----------------------------------------------------------------------- kernels
@triton.jit
def _fma(a, b, c, EMULATE: tl.constexpr):
    """``a·b + c`` rounded once.  EMULATE (the CPU interpreter): the product is exact in
    fp64, the sum is rounded to odd (TwoSum error, then the last bit forced to 1 when
    inexact), and rounding that to fp32 is the correctly rounded fma."""
    if EMULATE:
        ones = tl.zeros_like(c) + 1.0          # a scalar argument as a block (exact, -0 kept)
        p = (a * ones).to(tl.float64) * (b * ones).to(tl.float64)
        c64 = c.to(tl.float64)
        s = p + c64
        bb = s - p
        err = (p - (s - bb)) + (c64 - bb)
        bits = s.to(tl.int64, bitcast=True)
        even = (bits & 1) == 0
        away = (err > 0) == (s > 0)
        bits = tl.where((err != 0) & even, tl.where(away, bits + 1, bits - 1), bits)
        return bits.to(tl.float64, bitcast=True).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _det_exp(z):
    """The reference's det_exp, op for op."""
    k = (z * LOG2E + ROUND) - ROUND
    r = z - k * LN2_HI
    r = r - k * LN2_LO
    p = r * C6 + C5      # C6·r == r·C6: one rounding either way
    p = p * r + C4
    p = p * r + C3
    p = p * r + C2
    p = p * r + C1
    p = p * r + C0
    ki = tl.where(k == k, k, 0.0).to(tl.int32)
    scale = ((ki + 127) << 23).to(tl.float32, bitcast=True)
    return p * scale


@triton.jit
def _dev(v, ON_DEVICE: tl.constexpr):
    if ON_DEVICE:
        return tl.load(v)
    else:
        return v


@triton.jit
def _ham_kernel(
    table_ptr, blocks_ptr,            # int64 [n, ROW]; int32 [n_blocks]: tensor of each program
    p_base, g_base, s1_base, s2_base,  # base pointers of the streams (s1/s2: any when unused)
    grad_scale_ptr, found_inf_ptr,
    lr, alpha, beta, weight_decay,
    decay, step_size, bc2_sqrt,        # adamw's step scalars: floats, or pointers (ON_DEVICE)
    lerp_w, beta2, one_minus_beta2, eps,
    momentum, one_minus_dampening,
    BASE: tl.constexpr, LR_ON_DEVICE: tl.constexpr, ON_DEVICE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    MIRROR: tl.constexpr, LERP_SMALL: tl.constexpr, EMULATE_FMA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + tl.load(blocks_ptr + pid).to(tl.int64) * ROW
    start = (pid - tl.load(row + _BLOCK_BEGIN)) * BLOCK      # 64-bit offsets
    offs = start + tl.arange(0, BLOCK)
    mask = offs < tl.load(row + _NUMEL)
    if HAS_FOUND_INF:
        # AMP: inf/NaN gradients → no writes (NaN != 0 skips, as the reference's ne(0))
        mask = mask & ((tl.zeros((BLOCK,), tl.float32) + tl.load(found_inf_ptr)) == 0)
    p_ptrs = p_base + tl.load(row + _P) + offs
    g = tl.load(g_base + tl.load(row + _G) + offs, mask=mask, other=0.0).to(tl.float32)
    theta = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    lr = _dev(lr, LR_ON_DEVICE)
    neg_lr = -lr
    if HAS_GRAD_SCALE:
        g = tl.math.div_rn(g, tl.load(grad_scale_ptr))
    if MAXIMIZE:
        g = -g
    if BASE == 1:   # AdamW: reads m, v (8 B), writes them (8 B)
        m_ptrs = s1_base + tl.load(row + _S1) + offs
        v_ptrs = s2_base + tl.load(row + _S2) + offs
        m = tl.load(m_ptrs, mask=mask, other=0.0)
        v = tl.load(v_ptrs, mask=mask, other=0.0)
        if HAS_WD:
            theta = theta * _dev(decay, ON_DEVICE)
        diff = g - m
        if LERP_SMALL:   # torch.lerp's two forms
            m = _fma(lerp_w, diff, m, EMULATE_FMA)
        else:
            m = _fma(lerp_w - 1.0, diff, g, EMULATE_FMA)
        v = _fma(g * one_minus_beta2, g, v * beta2, EMULATE_FMA)
        denom = tl.math.div_rn(tl.sqrt_rn(v), _dev(bc2_sqrt, ON_DEVICE)) + eps
        theta = theta + tl.math.div_rn(m * -_dev(step_size, ON_DEVICE), denom)
        tl.store(m_ptrs, m, mask=mask)
        tl.store(v_ptrs, v, mask=mask)
    elif BASE == 2:  # SGD: with momentum reads b (4 B), writes it (4 B)
        d = g
        if HAS_WD:
            d = _fma(theta, weight_decay, g, EMULATE_FMA)
        if HAS_MOMENTUM:
            b_ptrs = s1_base + tl.load(row + _S1) + offs
            b = tl.load(b_ptrs, mask=mask, other=0.0)
            b = tl.where(tl.load(row + _FIRST) != 0, d,
                         _fma(d, one_minus_dampening, b * momentum, EMULATE_FMA))
            tl.store(b_ptrs, b, mask=mask)
            if NESTEROV:
                d = _fma(b, momentum, d, EMULATE_FMA)
            else:
                d = b
        theta = _fma(d, neg_lr, theta, EMULATE_FMA)
    if MIRROR:
        sg = tl.where(theta < 0, -g, g)
        z = (sg * alpha + beta) * neg_lr
        z = tl.where(z < -CLAMP, -CLAMP, tl.where(z > CLAMP, CLAMP, z))   # NaN stays NaN
        theta = theta * _det_exp(z)
    if p_ptrs.dtype.element_ty == tl.bfloat16:
        out = _round_to_bf16_rne(theta)
    else:
        out = theta.to(p_ptrs.dtype.element_ty)
    tl.store(p_ptrs, out, mask=mask)


# ----------------------------------------------------------------------- launcher
def _offsets(tensors):
    """Base tensor and int64 element offsets of every tensor from it (one dtype)."""
    base = tensors[0]
    size = base.element_size()
    return base, [(t.data_ptr() - base.data_ptr()) // size for t in tensors]


def _launch(t: HamTensors, h: HamHparams, e: HamExtras, momentum: bool) -> None:
    n = len(t.params)
    device = t.params[0].device
    s1 = t.exp_avgs if h.base == "adamw" else (t.momentum_bufs if momentum else None)
    s2 = t.exp_avg_sqs if h.base == "adamw" else None
    p_base, p_off = _offsets(t.params)
    g_base, g_off = _offsets(t.grads)
    s1_base, s1_off = _offsets(s1) if s1 else (p_base, [0] * n)
    s2_base, s2_off = _offsets(s2) if s2 else (p_base, [0] * n)
    rows, blocks, begin = [], [], 0
    firsts = t.firsts if t.firsts is not None else [False] * n
    for i, p in enumerate(t.params):
        nb = triton.cdiv(p.numel(), BLOCK_SIZE)
        rows.append([p_off[i], g_off[i], s1_off[i], s2_off[i], p.numel(), begin, int(bool(firsts[i]))])
        blocks += [i] * nb
        begin += nb
    if not blocks:
        return
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    block_map = torch.tensor(blocks, dtype=torch.int32).to(device, non_blocking=True)
    on_device = isinstance(h.step_size, Tensor)
    dummy = table
    w = float(1 - h.beta1)
    _ham_kernel[(len(blocks),)](
        table, block_map, p_base, g_base, s1_base, s2_base,
        e.grad_scale if e.grad_scale is not None else dummy,
        e.found_inf if e.found_inf is not None else dummy,
        h.lr, float(h.alpha), float(h.beta), float(h.weight_decay),
        h.decay if on_device else float(h.decay), h.step_size if on_device else float(h.step_size),
        h.bias_correction2_sqrt if on_device else float(h.bias_correction2_sqrt),
        w, float(h.beta2), float(1 - h.beta2), float(h.eps),
        float(h.momentum), float(1 - h.dampening),
        BASE=_BASE_CODE[h.base], LR_ON_DEVICE=isinstance(h.lr, Tensor), ON_DEVICE=on_device,
        HAS_MOMENTUM=momentum, NESTEROV=bool(h.nesterov), MAXIMIZE=bool(h.maximize),
        HAS_WD=h.weight_decay != 0, HAS_GRAD_SCALE=e.grad_scale is not None,
        HAS_FOUND_INF=e.found_inf is not None, MIRROR=h.alpha != 0 or h.beta != 0,
        LERP_SMALL=abs(w) < 0.5, EMULATE_FMA=triton_interpreting(), BLOCK=BLOCK_SIZE,
        **LAUNCH_OPTIONS,
    )
    state = (s1 or []) + (s2 or [])
    torch.autograd.graph.increment_version(list(t.params) + list(state))


# ----------------------------------------------------------------------- public
def step(t: HamTensors, h: HamHparams, e: HamExtras = HamExtras(), workspace: dict = None) -> None:
    """Fused HAM step; same contract as :func:`pilot_kernels.kernels.ham_reference.step`.

    Tensors the kernel cannot walk linearly with their parameter go to the reference;
    the rest run in one launch per gradient dtype.  Never syncs with the host."""
    if not t.params:
        return
    momentum = h.base == "sgd" and h.momentum != 0
    groups, rest = kernel_groups(t, h)
    for sub in groups:
        _launch(sub, h, e, momentum)
    if rest is not None:
        ham_reference.step(rest, h, e)
