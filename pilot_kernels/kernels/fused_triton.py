"""One-pass PILoT step in Triton: the reparameterized tensors of a (device, dtype, param
group, gradient dtype) in one launch (two only when some views are unaligned).

Per element the kernel reads ``x, g, m, w, b_m, b_w`` and writes ``m, w, b_m, b_w, x``:
44 bytes for fp32 parameters with momentum (paper §3's update on both factors), against
20 for fused dense SGD.  ``x`` is read to adopt what was written into it since the last
step (``adopt_writes``): an element whose bits differ from the ``fl(m·w)`` the last step
wrote (recomputed from the old ``m``, ``w``, in x's dtype) is re-split from its current
value exactly as :func:`pilot_kernels.init.split` does, and its momentum restarts
(``b = d`` for that element).  With ``adopt_writes=False`` ``x`` is not read (40 bytes)
and is recomputed as ``m·w``.  ``Σ|m·w|`` is reduced per program and added with one
atomic per program, so the L1 norm the α schedule needs costs no extra pass over memory.

Addressing.  Each stream (x, g, m, w, b_m, b_w) has a base pointer passed as a kernel
argument, and the per-tensor table holds int64 *element offsets* from those bases.
Triton specializes a pointer argument on 16-byte alignment, and the offsets of a launch
whose tensors are all 16-byte aligned are hinted as multiples of 4 elements
(``tl.multiple_of``), so full blocks compile to 4-element vector accesses: 128-bit for
fp32, 64-bit for bf16/fp16.  (Hinting 8 elements for the 16-bit streams gives them
128-bit accesses, but then they and the fp32 streams want different register layouts
and Triton converts between the two through 8 KiB of shared memory: 77 registers
instead of 60 for bf16 with momentum on sm_90.)  Tensors with a less aligned pointer
(a view at an odd storage offset) go to a second launch without the hint: scalar
accesses, same results.  Full blocks take an unmasked path; only a
tensor's last, partial block is masked.  ``benchmarks/inspect_kernels.py`` shows the
resulting SASS; ``tests/test_sass.py`` keeps it vectorized.

Exactness.  Launched with FP contraction off (``enable_fp_fusion=False``) and IEEE
division and square root (``div_rn``, ``sqrt_rn``), every value is one fp32 torch op of
the reference, rounded once, in the reference's order, so a GPU must agree with the
reference bit for bit, as the CPU interpreter does (the ``gpu``-marked tests compare exactly; ``tests/test_sass.py``
checks the PTX for ``fma`` and approximate division).

Layout follows Liger-Kernel's ops: constants → ``@triton.jit`` kernels → launcher →
public wrapper (``pilot_step``, the backend interface of :mod:`pilot_kernels.kernels`).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .api import StepExtras, StepHparams, StepTensors
from .layout import ALIGNMENT, walkable

# ----------------------------------------------------------------------- constants
# Elements per program.  The step is memory bound (44 B/element); 512 fp32 elements
# with 4 warps give each thread 4 elements per stream: one 16-byte vector access.  The
# in-pass re-split keeps every lane's values live, so larger programs spill: 2048 with 8
# warps took 138–169 registers on sm_90 with Triton 3.6, 1024 a stack frame in one
# variant; 512 takes 72–96 with both Triton 3.6 and 3.8 (docs/kernels.md).
# Not yet tuned by measurement on a GPU.
BLOCK_SIZE = 512
NUM_WARPS = 4

# No @triton.autotune: autotuning replays the launch while benchmarking configs, and
# this kernel updates its inputs in place, so a replay would apply the step twice.

# Columns of the per-tensor table (int64 rows): element offsets from each stream's base
# pointer, the size, the tensor's first program, and its first-step flag.
COLUMNS = ("x", "g", "m", "w", "bm", "bw", "numel", "block_begin", "first")
ROW = tl.constexpr(len(COLUMNS))
_X, _G, _M, _W, _BM, _BW, _NUMEL, _BLOCK_BEGIN, _FIRST = (tl.constexpr(i) for i in range(len(COLUMNS)))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# init.split's constants: above HUGE, 4x² would overflow and m comes from hypot(β/2, x);
# FLT_MAX bounds the finite m the nudges move.
HUGE = tl.constexpr(2.0**60)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
# For β/2 below 2^-13·HUGE, hypot(β/2, x) rounds to |x| for every |x| > HUGE, so the
# kernel uses |x| there; a larger β (never a PILoT setting) is refused.
MAX_BETA = 2.0**47

# Launch options: no FMA contraction, so each multiply and add rounds like torch's.
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)


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
def _scalar(ptr):
    """A table entry or hyperparameter: read by every program, so kept in L2.  (The
    hint also tells these loads apart from the data streams in the SASS.)"""
    return tl.load(ptr, eviction_policy="evict_last")


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _store(ptrs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


@triton.jit
def _rounded(v, dtype: tl.constexpr):
    """fp32 → the parameter dtype, rounded to nearest even as torch's ``.to`` does."""
    if dtype == tl.bfloat16:
        return _round_to_bf16_rne(v)
    else:
        return v.to(dtype)


@triton.jit
def _bits(v):
    """The bit pattern of ``v`` as an integer of its width (for exact comparison)."""
    if v.dtype == tl.float32:
        return v.to(tl.int32, bitcast=True)
    else:
        return v.to(tl.int16, bitcast=True)


@triton.jit
def _w_of(x, m, beta_zero: tl.constexpr):
    """:func:`pilot_kernels.init._w_from_m`: ``sign(x)·m`` for β = 0, else ``x / m``."""
    if beta_zero:
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)) * m   # torch.sign (NaN → 0)
    else:
        return tl.math.div_rn(x, m)


@triton.jit
def _nudged(m, mw_exact, m_best, w_best, x, k: tl.constexpr, beta_zero: tl.constexpr):
    """One nudge of :func:`pilot_kernels.init.split`: ``m`` moved by ``k`` fp32 ulps,
    taken where no earlier candidate multiplied back to ``x`` and this one does."""
    moved = (m.to(tl.int32, bitcast=True) + k).to(tl.float32, bitcast=True)
    mk = tl.where((m > 0) & (m <= FLT_MAX), moved, m)
    wk = _w_of(x, mk, beta_zero)
    take = (mw_exact == 0) & (mk * wk == x)
    return tl.where(take, mk, m_best), tl.where(take, wk, w_best), mw_exact | take


@triton.jit
def _split(x, beta, beta_sq, half_beta, BETA_ZERO: tl.constexpr):
    """:func:`pilot_kernels.init.split` of fp32 ``x``, the same fp32 ops in its order:
    the closed form (β = 0: ``m = sqrt|x|``; |x| > 2^60: ``sqrt(β/2 + hypot(β/2, x))``,
    where hypot is |x| exactly for the β the launcher admits), then the nudges of m by
    +1, −1, +2, −2 ulps."""
    if BETA_ZERO:
        m = tl.math.sqrt_rn(tl.abs(x))
    else:
        root = tl.math.sqrt_rn(beta_sq + 4.0 * x * x)
        m = tl.math.sqrt_rn((beta + root) * 0.5)
        m = tl.where(tl.abs(x) > HUGE, tl.math.sqrt_rn(half_beta + tl.abs(x)), m)
    w = _w_of(x, m, BETA_ZERO)
    exact = m * w == x
    m_best, w_best = m, w
    m_best, w_best, exact = _nudged(m, exact, m_best, w_best, x, 1, BETA_ZERO)
    m_best, w_best, exact = _nudged(m, exact, m_best, w_best, x, -1, BETA_ZERO)
    m_best, w_best, exact = _nudged(m, exact, m_best, w_best, x, 2, BETA_ZERO)
    m_best, w_best, exact = _nudged(m, exact, m_best, w_best, x, -2, BETA_ZERO)
    return m_best, w_best


@triton.jit
def _update_block(x_ptrs, g_ptrs, m_ptrs, w_ptrs, bm_ptrs, bw_ptrs, mask, skip, first, scale,
                  lr, momentum, one_minus_dampening, two_alpha, weight_decay,
                  beta, beta_sq, half_beta,
                  HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                  HAS_WEIGHT_DECAY: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  ADOPT_WRITES: tl.constexpr, BETA_ZERO: tl.constexpr, MASKED: tl.constexpr):
    """One block of the update; returns its ``Σ|m·w|``.  Each line is one fp32 op of
    :func:`pilot_kernels.kernels.reference.pilot_step`, in the same order.  With
    ``MASKED``, only lanes in ``mask`` are read and written, and none when ``skip``
    (AMP found inf/NaN: the sum is then over the unchanged ``m·w``)."""
    read = mask
    if MASKED:
        mask = mask & (skip == 0)   # lanes written
    m = _load(m_ptrs, read, MASKED)
    w = _load(w_ptrs, read, MASKED)
    m0 = m
    w0 = w
    if ADOPT_WRITES:                       # (0) keep what was written into x since
        x_dtype: tl.constexpr = x_ptrs.dtype.element_ty
        x_in = _load(x_ptrs, read, MASKED)
        fresh = _bits(x_in) != _bits(_rounded(m * w, x_dtype))
        first = first | fresh              # a written element's momentum restarts
        # Branch-free, before g and the buffers are loaded: a branch on "any lane
        # written" costs more registers than the re-split (docs/kernels.md).
        m_split, w_split = _split(x_in.to(tl.float32), beta, beta_sq, half_beta, BETA_ZERO)
        m = tl.where(fresh, m_split, m)
        w = tl.where(fresh, w_split, w)
    g = _load(g_ptrs, read, MASKED).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.math.div_rn(g, scale)        # IEEE division; `/` is approximate on GPUs
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * (m * w)
    d_m = g * w + two_alpha * m            # both from the old m, w
    d_w = g * m + two_alpha * w
    if HAS_MOMENTUM:
        b_m = _load(bm_ptrs, read, MASKED)
        b_w = _load(bw_ptrs, read, MASKED)
        b_m = tl.where(first, d_m, momentum * b_m + one_minus_dampening * d_m)
        b_w = tl.where(first, d_w, momentum * b_w + one_minus_dampening * d_w)
        _store(bm_ptrs, b_m, mask, MASKED)
        _store(bw_ptrs, b_w, mask, MASKED)
        if NESTEROV:
            d_m = d_m + momentum * b_m
            d_w = d_w + momentum * b_w
        else:
            d_m = b_m
            d_w = b_w
    new_m = m - lr * d_m
    new_w = w - lr * d_w
    _store(m_ptrs, new_m, mask, MASKED)
    _store(w_ptrs, new_w, mask, MASKED)
    x = new_m * new_w
    _store(x_ptrs, _rounded(x, x_ptrs.dtype.element_ty), mask, MASKED)
    if MASKED:
        # Skipped: the unchanged m·w; lanes past the end (computed from zeros): nothing.
        l1 = tl.where(read, tl.abs(tl.where(skip, m0 * w0, x)), 0.0)
    else:
        l1 = tl.abs(x)
    return tl.sum(l1, axis=0)


@triton.jit
def _pilot_step_kernel(
    table_ptr,            # int64 [n_tensors, ROW]
    n_tensors,
    x_base,               # base pointers of the six streams; the table holds offsets
    g_base,
    m_base,
    w_base,
    bm_base,              # any pointer without momentum
    bw_base,
    grad_scale_ptr,       # fp32 [1] (AMP) or any pointer
    found_inf_ptr,        # fp32 [1] (AMP) or any pointer
    l1_accum_ptr,         # fp32 scalar: Σ|m·w| is added here
    l1_clear_ptr,         # fp32 scalar: zeroed by program 0 when CLEAR_L1
    lr,                   # float, or a pointer to it when LR_ON_DEVICE
    momentum,
    one_minus_dampening,
    alpha,                # float, or a pointer to it when ALPHA_ON_DEVICE
    weight_decay,
    beta,                 # the re-split's β, β² and β/2, each rounded to fp32 once
    beta_sq,
    half_beta,
    LR_ON_DEVICE: tl.constexpr,
    ALPHA_ON_DEVICE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    CLEAR_L1: tl.constexpr,
    ADOPT_WRITES: tl.constexpr,   # read x; re-split the elements written since the last step
    BETA_ZERO: tl.constexpr,
    ALIGNED: tl.constexpr,        # every pointer of every tensor is 16-byte aligned
    SEARCH_STEPS: tl.constexpr,   # ≥ ceil(log2(n_tensors)) + 1
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # Capturable mode: lr and alpha live in device memory so a replayed CUDA graph
    # sees their current values.
    if LR_ON_DEVICE:
        lr = _scalar(lr)
    if ALPHA_ON_DEVICE:
        alpha = _scalar(alpha)
    two_alpha = 2.0 * alpha

    # Which tensor does this program work on?  Binary search for the last row whose
    # first block is <= pid: ~log2(n) scalar loads that hit L2, instead of a
    # per-block table that would grow with the element count.
    lo = tl.zeros((), dtype=tl.int64)
    hi = lo + n_tensors - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        go_right = _scalar(table_ptr + mid * ROW + _BLOCK_BEGIN) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    row = table_ptr + lo * ROW

    # 64-bit offsets: a single tensor may exceed 2^31 elements.
    start = (pid - _scalar(row + _BLOCK_BEGIN)) * BLOCK
    n_left = _scalar(row + _NUMEL) - start
    x_off = _scalar(row + _X) + start
    g_off = _scalar(row + _G) + start
    m_off = _scalar(row + _M) + start
    w_off = _scalar(row + _W) + start
    if ALIGNED:
        # True by construction (the launcher puts only 16-byte aligned tensors in an
        # ALIGNED launch, and BLOCK is a multiple of 4): the facts that let the
        # compiler emit vector accesses of 4 elements, 128-bit for fp32.
        x_off = tl.multiple_of(x_off, 4)
        g_off = tl.multiple_of(g_off, 4)
        m_off = tl.multiple_of(m_off, 4)
        w_off = tl.multiple_of(w_off, 4)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_left
    x_ptrs = x_base + x_off + offs
    g_ptrs = g_base + g_off + offs
    m_ptrs = m_base + m_off + offs
    w_ptrs = w_base + w_off + offs
    bm_ptrs = m_ptrs
    bw_ptrs = w_ptrs
    first = False
    if HAS_MOMENTUM:
        bm_off = _scalar(row + _BM) + start
        bw_off = _scalar(row + _BW) + start
        if ALIGNED:
            bm_off = tl.multiple_of(bm_off, 4)
            bw_off = tl.multiple_of(bw_off, 4)
        bm_ptrs = bm_base + bm_off + offs
        bw_ptrs = bw_base + bw_off + offs
        first = _scalar(row + _FIRST) != 0
    scale = 1.0
    if HAS_GRAD_SCALE:
        scale = _scalar(grad_scale_ptr)

    full = n_left >= BLOCK
    skip = False
    if HAS_FOUND_INF:
        # AMP: with inf/NaN gradients nothing is written (NaN != 0 skips, as the
        # reference's found_inf.ne(0)), but Σ|m·w| of the unchanged factors is still
        # accumulated so the L1 norm stays "as of the last step".  A skipped step takes
        # the masked path with every write masked off (a third copy of the block that
        # loads only m and w took 128 registers instead of 80 on sm_90, fp32 with
        # momentum).
        skip = _scalar(found_inf_ptr) != 0
        full = full & (skip == 0)
    if full:   # a full block: no masks, so the accesses can be vectors
        l1 = _update_block(x_ptrs, g_ptrs, m_ptrs, w_ptrs, bm_ptrs, bw_ptrs, mask, skip, first,
                           scale, lr, momentum, one_minus_dampening, two_alpha, weight_decay,
                           beta, beta_sq, half_beta,
                           HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WEIGHT_DECAY, HAS_GRAD_SCALE,
                           ADOPT_WRITES, BETA_ZERO,
                           MASKED=False)
    else:      # the tensor's last, partial block, or a skipped step
        l1 = _update_block(x_ptrs, g_ptrs, m_ptrs, w_ptrs, bm_ptrs, bw_ptrs, mask, skip, first,
                           scale, lr, momentum, one_minus_dampening, two_alpha, weight_decay,
                           beta, beta_sq, half_beta,
                           HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WEIGHT_DECAY, HAS_GRAD_SCALE,
                           ADOPT_WRITES, BETA_ZERO,
                           MASKED=True)
    tl.atomic_add(l1_accum_ptr, l1, sem="relaxed")
    if CLEAR_L1:
        if pid == 0:
            tl.store(l1_clear_ptr, 0.0, eviction_policy="evict_last")


# ----------------------------------------------------------------------- launcher
@dataclass
class _Launch:
    """One launch of the kernel: the tensors of one alignment."""

    bases: tuple[int, ...]   # per stream, the index of the tensor whose pointer is the base
    aligned: bool
    n_rows: int
    n_blocks: int
    table: Tensor            # int64 [n_rows, ROW] on the device
    host: Tensor             # its pinned source, alive while an async copy may read it


_data_ptr = Tensor.data_ptr
_numel = Tensor.numel


def _streams(t: StepTensors) -> tuple:
    return (t.xs, t.grads, t.ms, t.ws) + ((t.momentum_ms, t.momentum_ws) if t.momentum_ms is not None else ())


def _pointers(streams) -> tuple:
    return tuple(map(_data_ptr, chain.from_iterable(streams)))


@dataclass(eq=False)
class _Plan:
    """The launches of one call (tables on the device, grids), kept in the caller's
    workspace and reused while :meth:`reusable` holds."""

    launches: list[_Launch]
    momentum: bool
    firsts: tuple
    pointers: tuple           # data_ptr of every tensor of every stream
    numels: tuple

    def reusable(self, t: StepTensors) -> bool:
        """True when everything the tables hold is still so: every tensor of every stream
        at the same address (``p.data = other`` moves x's), every size, momentum on/off
        and the first-step flags.  The kernel reads nothing else from the tables (dtypes
        and base pointers are launch arguments)."""
        streams = _streams(t)
        return (
            self.momentum == (len(streams) == 6)
            and self.firsts == tuple(t.firsts)
            and self.numels == tuple(map(_numel, t.xs))
            and self.pointers == _pointers(streams)
        )

    def __reduce__(self):
        # A copied or pickled workspace holds no plan: the next call builds one.
        return (_no_plan, ())


def _no_plan() -> None:
    return None


def _check(t: StepTensors, h: StepHparams) -> None:
    """Refuse, naming the fix, what this kernel cannot step; nothing is written yet."""
    dtype = t.xs[0].dtype
    if dtype not in DTYPES:
        raise TypeError(f"the Triton backend takes float32, bfloat16 or float16 parameters, got {dtype}")
    if h.adopt_writes and not 0 <= h.beta <= MAX_BETA:
        raise ValueError(f"beta must be in [0, {MAX_BETA:g}] for the Triton backend's re-split, got "
                         f"{h.beta}; use backend='reference' for a larger one")
    g_dtype = t.grads[0].dtype
    for i, (x, g) in enumerate(zip(t.xs, t.grads)):
        if x.dtype != dtype or g.dtype != g_dtype or g_dtype not in (dtype, torch.float32):
            raise TypeError(f"xs[{i}]/grads[{i}] are {x.dtype}/{g.dtype} but xs[0]/grads[0] are "
                            f"{dtype}/{g_dtype}; call through pilot_kernels.kernels.run_step, which "
                            "hands each kernel call one parameter and one gradient dtype")
    for name, seq in (("ms", t.ms), ("ws", t.ws), ("momentum_ms", t.momentum_ms), ("momentum_ws", t.momentum_ws)):
        for i, u in enumerate(seq or ()):
            if u.dtype != torch.float32:
                raise TypeError(f"{name}[{i}] is {u.dtype}; PILoT state must be float32")
    for i, tensors in enumerate(zip(*_streams(t))):
        if not walkable(*tensors):
            raise ValueError(f"entry {i} has a layout the kernel cannot walk (see "
                             "pilot_kernels.kernels.layout); call through "
                             "pilot_kernels.kernels.run_step, which steps it with the reference")


def _make_plan(t: StepTensors) -> _Plan:
    streams = _streams(t)
    has_momentum = len(streams) == 6
    groups: dict[bool, list[int]] = {}
    for i, x in enumerate(t.xs):
        if x.numel() == 0:
            continue
        aligned = all(s[i].data_ptr() % ALIGNMENT == 0 for s in streams)
        groups.setdefault(aligned, []).append(i)

    device = t.xs[0].device
    if groups and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "PILoT cannot upload its kernel table while a CUDA graph is being captured: run a "
            "warm-up step with the same gradient tensors before capturing, and keep gradients "
            "allocated across steps (opt.zero_grad(set_to_none=False))"
        )
    launches = []
    for aligned, idx in groups.items():
        # The base of a stream is its lowest address, so every offset is >= 0; the
        # difference of two pointers of one dtype is a whole number of elements.
        bases = tuple(min(idx, key=lambda i: s[i].data_ptr()) for s in streams)
        rows, n_blocks = [], 0
        for i in idx:
            offsets = [(s[i].data_ptr() - s[b].data_ptr()) // s[i].element_size()
                       for s, b in zip(streams, bases)]
            if not has_momentum:
                offsets += [0, 0]
            numel = t.xs[i].numel()
            rows.append((*offsets, numel, n_blocks, int(t.firsts[i])))
            n_blocks += triton.cdiv(numel, BLOCK_SIZE)
        host = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
        table = host.to(device, non_blocking=True)
        launches.append(_Launch(bases, aligned, len(rows), n_blocks, table, host))
    return _Plan(launches, has_momentum, tuple(t.firsts), _pointers(streams), tuple(map(_numel, t.xs)))


def _scalar_arg(v) -> tuple:
    """A hyperparameter as the kernel takes it: a float, or a 0-dim fp32 tensor on the
    parameters' device (the dispatcher put it there) that the kernel reads."""
    return (v, True) if isinstance(v, Tensor) else (float(v), False)


def _launch(plan: _Plan, t: StepTensors, h: StepHparams, e: StepExtras) -> None:
    lr, lr_on_device = _scalar_arg(h.lr)
    alpha, alpha_on_device = _scalar_arg(h.alpha)
    l1_accum, l1_clear = e.l1_accum, e.l1_clear
    if l1_accum is None:  # the kernel always reduces; give it somewhere to write
        l1_accum = torch.zeros((), dtype=torch.float32, device=t.xs[0].device)
    elif l1_clear is not None and l1_clear.data_ptr() == l1_accum.data_ptr():
        l1_clear.zero_()  # one slot for both: clear first, then add (as the reference)
        l1_clear = None
    streams = _streams(t)
    beta = float(h.beta)
    for k, launch in enumerate(plan.launches):
        bases = [s[b] for s, b in zip(streams, launch.bases)]
        if not plan.momentum:
            bases += bases[2:4]  # unused pointers
        clear = l1_clear if k == 0 else None
        _pilot_step_kernel[(launch.n_blocks,)](
            launch.table,
            launch.n_rows,
            *bases,
            e.grad_scale if e.grad_scale is not None else l1_accum,   # any pointer when unused
            e.found_inf if e.found_inf is not None else l1_accum,
            l1_accum,
            clear if clear is not None else l1_accum,
            lr,
            float(h.momentum),
            1.0 - float(h.dampening),
            alpha,
            float(h.weight_decay),
            beta,
            beta * beta,
            beta * 0.5,
            LR_ON_DEVICE=lr_on_device,
            ALPHA_ON_DEVICE=alpha_on_device,
            HAS_MOMENTUM=plan.momentum,
            NESTEROV=bool(h.nesterov),
            MAXIMIZE=bool(h.maximize),
            HAS_WEIGHT_DECAY=h.weight_decay != 0,
            HAS_GRAD_SCALE=e.grad_scale is not None,
            HAS_FOUND_INF=e.found_inf is not None,
            CLEAR_L1=clear is not None,
            ADOPT_WRITES=bool(h.adopt_writes),
            BETA_ZERO=beta == 0,
            ALIGNED=launch.aligned,
            SEARCH_STEPS=max(1, launch.n_rows.bit_length()),
            BLOCK=BLOCK_SIZE,
            **LAUNCH_OPTIONS,
        )
    if not plan.launches and l1_clear is not None:
        l1_clear.zero_()


# ----------------------------------------------------------------------- public
def pilot_step(t: StepTensors, h: StepHparams, e: StepExtras = StepExtras(),
               workspace: Optional[dict] = None) -> None:
    """Fused PILoT step of exactly ``t`` (the backend interface of
    :mod:`pilot_kernels.kernels`; semantics: :func:`pilot_kernels.kernels.reference.pilot_step`).

    Takes what :func:`pilot_kernels.kernels.run_step` hands a kernel: tensors of one
    device, one parameter dtype and one gradient dtype (x's or float32), every entry
    walkable (:mod:`pilot_kernels.kernels.layout`), scalar tensors on the device.  With a
    ``workspace`` the launch plan (kernel tables, grids) is kept and reused while
    :meth:`_Plan.reusable` holds; the version counters are the dispatcher's to bump.
    """
    if not t.xs:
        if e.l1_clear is not None:
            e.l1_clear.zero_()
        return
    if h.momentum == 0:
        t = t._replace(momentum_ms=None, momentum_ws=None)
    plan = workspace.get("plan") if workspace is not None else None
    if plan is None or not plan.reusable(t):
        _check(t, h)
        plan = _make_plan(t)
        if workspace is not None:
            workspace["plan"] = plan
    elif h.adopt_writes and not 0 <= h.beta <= MAX_BETA:
        _check(t, h)
    _launch(plan, t, h, e)
