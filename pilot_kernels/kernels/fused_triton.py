"""One-pass PILoT step in Triton: every reparameterized tensor of a (device, dtype,
param group) in a single launch.

Per element the kernel reads ``g, m, w, b_m, b_w`` and writes ``m, w, b_m, b_w, x``:
40 bytes for fp32 parameters with momentum (spec §3), against 20 for fused dense SGD.
``x`` is never read; it is recomputed as ``m·w``.  ``Σ|m·w|`` is reduced per program
and added with one atomic per program, so the L1 norm the α schedule needs costs no
extra pass over memory.

Layout follows Liger-Kernel's ops: constants → ``@triton.jit`` kernels → launcher →
public wrapper (``pilot_step``, the backend interface of
:mod:`pilot_kernels.kernels`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference

# ----------------------------------------------------------------------- constants
# Elements per program.  The step is memory bound (40 B/element); 2048 fp32 elements
# with 8 warps gives each thread 8 elements per stream, i.e. two 16-byte vector
# accesses, enough bytes in flight per SM to approach copy bandwidth on Hopper.
# Tuning on a GPU is still owed (no GPU was available when this was written).
BLOCK_SIZE = 2048
NUM_WARPS = 8

# No @triton.autotune: autotuning replays the launch while benchmarking configs, and
# this kernel updates its inputs in place, so a replay would apply the step twice.

# Columns of the per-tensor table (int64 rows): addresses, sizes and flags.
_X, _G, _M, _W, _BM, _BW, _NUMEL, _BLOCK_BEGIN, _FIRST = range(9)
ROW = 9

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ----------------------------------------------------------------------- kernels
@triton.jit
def _round_to_bf16_rne(y):
    """fp32 → bf16, round to nearest even, in integer arithmetic.

    Triton's interpreter (TRITON_INTERPRET=1, used by the CPU tests) truncates on
    ``.to(tl.bfloat16)`` and ignores ``fp_downcast_rounding``; torch rounds to nearest
    even.  Rounding the fp32 bits first makes both paths bitwise equal to torch, for
    four integer ops per element on a memory-bound kernel.  NaNs are passed through.
    """
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    rounded = bits.to(tl.float32, bitcast=True)
    return tl.where(y != y, y, rounded).to(tl.bfloat16)


@triton.jit
def _pilot_step_kernel(
    table_ptr,            # int64 [n_tensors, ROW]
    n_tensors,
    grad_scale_ptr,       # fp32 [1] (AMP) or dummy
    found_inf_ptr,        # fp32 [1] (AMP) or dummy
    l1_accum_ptr,         # fp32 scalar: Σ|m·w| is added here
    l1_clear_ptr,         # fp32 scalar: zeroed by program 0 when CLEAR_L1
    lr,                   # float, or a pointer to it when LR_ON_DEVICE
    momentum,
    one_minus_dampening,
    alpha,                # float, or a pointer to it when ALPHA_ON_DEVICE
    weight_decay,
    X_DTYPE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    ALPHA_ON_DEVICE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    CLEAR_L1: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,   # ≥ ceil(log2(n_tensors)) + 1
    BLOCK: tl.constexpr,
    ROW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # Capturable mode: lr and alpha live in device memory so a replayed CUDA graph
    # sees their current values.
    if LR_ON_DEVICE:
        lr = tl.load(lr)
    if ALPHA_ON_DEVICE:
        alpha = tl.load(alpha)
    two_alpha = 2.0 * alpha

    # Which tensor does this program work on?  Binary search for the last row whose
    # first block is <= pid: ~log2(n) scalar loads that hit L2, instead of a
    # per-block table that would grow with the element count.
    lo = tl.zeros((), dtype=tl.int64)
    hi = lo + n_tensors - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        go_right = tl.load(table_ptr + mid * ROW + 7) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    row = table_ptr + lo * ROW

    x_ptr = tl.load(row + 0).to(tl.pointer_type(X_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(X_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    w_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 6)
    block_begin = tl.load(row + 7)

    # 64-bit offsets: a single tensor may exceed 2^31 elements.
    offs = (pid - block_begin) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_bounds = offs < numel

    g = tl.load(g_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=in_bounds, other=0.0)
    w = tl.load(w_ptr + offs, mask=in_bounds, other=0.0)

    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * (m * w)
    d_m = g * w + two_alpha * m
    d_w = g * m + two_alpha * w

    # AMP: with inf/NaN gradients nothing is written, but Σ|m·w| of the unchanged
    # factors is still accumulated so the L1 norm stays "as of the last step".
    write = in_bounds
    if HAS_FOUND_INF:
        write = write & (tl.zeros([BLOCK], dtype=tl.float32) + tl.load(found_inf_ptr) == 0)

    if HAS_MOMENTUM:
        bm_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        bw_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        first = tl.load(row + 8) != 0
        b_m = tl.load(bm_ptr + offs, mask=in_bounds, other=0.0)
        b_w = tl.load(bw_ptr + offs, mask=in_bounds, other=0.0)
        b_m = tl.where(first, d_m, momentum * b_m + one_minus_dampening * d_m)
        b_w = tl.where(first, d_w, momentum * b_w + one_minus_dampening * d_w)
        tl.store(bm_ptr + offs, b_m, mask=write)
        tl.store(bw_ptr + offs, b_w, mask=write)
        if NESTEROV:
            d_m = d_m + momentum * b_m
            d_w = d_w + momentum * b_w
        else:
            d_m = b_m
            d_w = b_w

    new_m = m - lr * d_m
    new_w = w - lr * d_w
    tl.store(m_ptr + offs, new_m, mask=write)
    tl.store(w_ptr + offs, new_w, mask=write)
    x = new_m * new_w
    if X_DTYPE == tl.bfloat16:
        x_out = _round_to_bf16_rne(x)
    else:
        x_out = x.to(X_DTYPE)
    tl.store(x_ptr + offs, x_out, mask=write)

    if HAS_FOUND_INF:
        x = tl.where(write, x, m * w)
    tl.atomic_add(l1_accum_ptr, tl.sum(tl.abs(x), axis=0))
    if CLEAR_L1:
        if pid == 0:
            tl.store(l1_clear_ptr, 0.0)


# ----------------------------------------------------------------------- launcher
def _fusable(x: Tensor, *others: Optional[Tensor]) -> bool:
    """The kernel walks raw storage, so every tensor must be dense with x's strides
    (channels_last weights are fine as long as their state shares the layout)."""
    dense = (
        x.is_contiguous()
        or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))
        or (x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))
    )
    if not dense:
        return False
    stride = x.stride()
    return all(t is None or t.stride() == stride for t in others)


@dataclass
class _Plan:
    """What one call needs besides the hyperparameters: which tensors the kernel takes,
    their table on the device, and the grid.  Cached in the optimizer's workspace and
    reused while the parameters, gradients and first-step flags stay where they were."""

    key: tuple
    fused: list[int]          # indices the kernel updates
    slow: list[int]           # indices the reference updates (layout the kernel can't walk)
    table: Optional[Tensor]   # int64 [len(fused), ROW] on the device
    host: Optional[Tensor]    # its pinned source, alive while an async copy may read it
    n_blocks: int


def _plan_key(xs, grads, firsts) -> tuple:
    # Two data_ptr() calls per tensor (~65 ns each): the per-step cost of a cache hit.
    # m, w and the momentum buffers belong to the optimizer; it drops the workspace
    # whenever it replaces them (load_state_dict).
    return (tuple([x.data_ptr() for x in xs]), tuple([g.data_ptr() for g in grads]), tuple(firsts))


def _make_plan(key, xs, grads, ms, ws, bms, bws, firsts) -> _Plan:
    has_momentum = bms is not None
    fused, slow, rows, n_blocks = [], [], [], 0
    for i, (x, g, m, w) in enumerate(zip(xs, grads, ms, ws)):
        numel = x.numel()
        if numel == 0:
            continue
        bm, bw = (bms[i], bws[i]) if has_momentum else (None, None)
        if not _fusable(x, g, m, w, bm, bw):
            slow.append(i)
            continue
        fused.append(i)
        rows.append((
            x.data_ptr(), g.data_ptr(), m.data_ptr(), w.data_ptr(),
            bm.data_ptr() if has_momentum else 0, bw.data_ptr() if has_momentum else 0,
            numel, n_blocks, int(firsts[i]),
        ))
        n_blocks += triton.cdiv(numel, BLOCK_SIZE)
    table = host = None
    if rows:
        device = xs[0].device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "PILoT cannot upload its kernel table while a CUDA graph is being captured: run a "
                "warm-up step with the same gradient tensors before capturing, and keep gradients "
                "allocated across steps (opt.zero_grad(set_to_none=False))"
            )
        host = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
        table = host.to(device, non_blocking=True)
    return _Plan(key, fused, slow, table, host, n_blocks)


def _launch(plan: _Plan, dtype, *, lr, momentum, dampening, nesterov, alpha, weight_decay,
            maximize, grad_scale, found_inf, l1_accum, l1_clear) -> None:
    lr_on_device, alpha_on_device = isinstance(lr, Tensor), isinstance(alpha, Tensor)
    n_rows = len(plan.fused)
    _pilot_step_kernel[(plan.n_blocks,)](
        plan.table,
        n_rows,
        grad_scale if grad_scale is not None else l1_accum,   # any pointer when unused
        found_inf if found_inf is not None else l1_accum,
        l1_accum,
        l1_clear if l1_clear is not None else l1_accum,
        lr if lr_on_device else float(lr),
        float(momentum),
        1.0 - float(dampening),
        alpha if alpha_on_device else float(alpha),
        float(weight_decay),
        X_DTYPE=_TL_DTYPE[dtype],
        LR_ON_DEVICE=lr_on_device,
        ALPHA_ON_DEVICE=alpha_on_device,
        HAS_MOMENTUM=momentum != 0,
        NESTEROV=bool(nesterov),
        MAXIMIZE=bool(maximize),
        HAS_WEIGHT_DECAY=weight_decay != 0,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        CLEAR_L1=l1_clear is not None,
        SEARCH_STEPS=max(1, n_rows.bit_length()),
        BLOCK=BLOCK_SIZE,
        ROW=ROW,
        num_warps=NUM_WARPS,
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
    workspace: Optional[dict] = None,
) -> None:
    """Fused PILoT step; same contract as :func:`pilot_kernels.kernels.reference.pilot_step`.

    Tensors whose storage the kernel cannot walk linearly (a state tensor laid out
    differently from its parameter) take the reference path instead, so results
    never depend on memory layout.  With a ``workspace`` the launch plan (layout checks,
    kernel table, grid) is kept and reused while no address or first-step flag changes.
    """
    if not xs:
        return
    dtype = xs[0].dtype
    if dtype not in _TL_DTYPE:
        raise TypeError(f"the Triton backend takes float32, bfloat16 or float16 parameters, got {dtype}")
    if momentum == 0:
        momentum_ms = momentum_ws = None
    key = _plan_key(xs, grads, firsts)
    plan = workspace.get("plan") if workspace is not None else None
    if plan is None or plan.key != key:
        plan = _make_plan(key, xs, grads, ms, ws, momentum_ms, momentum_ws, firsts)
        if workspace is not None:
            workspace["plan"] = plan

    if l1_accum is None:  # the kernel always reduces; give it somewhere to write
        l1_accum = torch.zeros((), dtype=torch.float32, device=xs[0].device)
    hparams = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, alpha=alpha,
                   weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
                   found_inf=found_inf)
    if plan.fused:
        _launch(plan, dtype, l1_accum=l1_accum, l1_clear=l1_clear, **hparams)
    if plan.slow:
        def pick(seq):
            return [seq[i] for i in plan.slow] if seq is not None else None

        reference.pilot_step(pick(xs), pick(grads), pick(ms), pick(ws), pick(momentum_ms),
                             pick(momentum_ws), pick(firsts), l1_accum=l1_accum,
                             l1_clear=None if plan.fused else l1_clear, **hparams)
