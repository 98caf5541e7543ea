"""One-pass PILoT step in Triton: the reparameterized tensors of a (device, dtype, param
group) in one launch (two or more only for unaligned views or mixed gradient dtypes).

Per element the kernel reads ``g, m, w, b_m, b_w`` and writes ``m, w, b_m, b_w, x``:
40 bytes for fp32 parameters with momentum (paper §3's update on both factors), against
20 for fused dense SGD.  ``x`` is never read; it is recomputed as ``m·w``.  ``Σ|m·w|``
is reduced per program and added with one atomic per program, so the L1 norm the α
schedule needs costs no extra pass over memory.

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
division (``div_rn``), every value is one fp32 torch op of the reference, rounded once,
in the reference's order, so a GPU must agree with the reference bit for bit, as the
CPU interpreter does (the ``gpu``-marked tests compare exactly; ``tests/test_sass.py``
checks the PTX for ``fma`` and approximate division).

Layout follows Liger-Kernel's ops: constants → ``@triton.jit`` kernels → launcher →
public wrapper (``pilot_step``, the backend interface of :mod:`pilot_kernels.kernels`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from .layout import ALIGNMENT, LayoutGuard, walkable

# ----------------------------------------------------------------------- constants
# Elements per program.  The step is memory bound (40 B/element); 2048 fp32 elements
# with 8 warps give each thread 8 elements per stream: two 4-element vector accesses
# (16 bytes each for fp32).
# These values have not yet been tuned by measurement on a GPU.
BLOCK_SIZE = 2048
NUM_WARPS = 8

# No @triton.autotune: autotuning replays the launch while benchmarking configs, and
# this kernel updates its inputs in place, so a replay would apply the step twice.

# Columns of the per-tensor table (int64 rows): element offsets from each stream's base
# pointer, the size, the tensor's first program, and its first-step flag.
COLUMNS = ("x", "g", "m", "w", "bm", "bw", "numel", "block_begin", "first")
ROW = tl.constexpr(len(COLUMNS))
_X, _G, _M, _W, _BM, _BW, _NUMEL, _BLOCK_BEGIN, _FIRST = (tl.constexpr(i) for i in range(len(COLUMNS)))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

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
def _update_block(x_ptrs, g_ptrs, m_ptrs, w_ptrs, bm_ptrs, bw_ptrs, mask, skip, first, scale,
                  lr, momentum, one_minus_dampening, two_alpha, weight_decay,
                  HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                  HAS_WEIGHT_DECAY: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  MASKED: tl.constexpr):
    """One block of the update; returns its ``Σ|m·w|``.  Each line is one fp32 op of
    :func:`pilot_kernels.kernels.reference.pilot_step`, in the same order.  With
    ``MASKED``, only lanes in ``mask`` are read and written, and none when ``skip``
    (AMP found inf/NaN: the sum is then over the unchanged ``m·w``)."""
    read = mask
    if MASKED:
        mask = mask & (skip == 0)   # lanes written
    g = _load(g_ptrs, read, MASKED).to(tl.float32)
    m = _load(m_ptrs, read, MASKED)
    w = _load(w_ptrs, read, MASKED)
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
    if x_ptrs.dtype.element_ty == tl.bfloat16:
        x_out = _round_to_bf16_rne(x)
    else:
        x_out = x.to(x_ptrs.dtype.element_ty)
    _store(x_ptrs, x_out, mask, MASKED)
    if MASKED:
        # Skipped: the unchanged m·w; lanes past the end (computed from zeros): nothing.
        l1 = tl.where(read, tl.abs(tl.where(skip, m * w, x)), 0.0)
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
    LR_ON_DEVICE: tl.constexpr,
    ALPHA_ON_DEVICE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    CLEAR_L1: tl.constexpr,
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
                           HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WEIGHT_DECAY, HAS_GRAD_SCALE,
                           MASKED=False)
    else:      # the tensor's last, partial block, or a skipped step
        l1 = _update_block(x_ptrs, g_ptrs, m_ptrs, w_ptrs, bm_ptrs, bw_ptrs, mask, skip, first,
                           scale, lr, momentum, one_minus_dampening, two_alpha, weight_decay,
                           HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WEIGHT_DECAY, HAS_GRAD_SCALE,
                           MASKED=True)
    tl.atomic_add(l1_accum_ptr, l1, sem="relaxed")
    if CLEAR_L1:
        if pid == 0:
            tl.store(l1_clear_ptr, 0.0, eviction_policy="evict_last")


# ----------------------------------------------------------------------- launcher
@dataclass
class _Launch:
    """One launch of the kernel: tensors sharing a gradient dtype and an alignment."""

    bases: tuple[int, ...]   # per stream, the index of the tensor whose pointer is the base
    aligned: bool
    n_rows: int
    n_blocks: int
    table: Tensor            # int64 [n_rows, ROW] on the device
    host: Tensor             # its pinned source, alive while an async copy may read it


_data_ptr = Tensor.data_ptr


@dataclass(eq=False)
class _Plan:
    """What one call needs besides the hyperparameters: the launches, and the tensors
    the reference steps instead (layouts the kernel cannot walk).  Kept in the caller's
    workspace and reused while :meth:`reusable` holds."""

    launches: list[_Launch]
    slow: list[int]
    momentum: bool
    firsts: list[bool]
    xs: tuple                 # the tensors themselves (identity is part of the key)
    state: tuple              # (ms, ws[, bms, bws]) likewise
    x_ptrs: tuple             # data_ptr of every x
    g_ptrs: tuple             # data_ptr of every gradient
    layout: LayoutGuard       # shapes, strides, dtypes of every x and gradient

    def reusable(self, xs, grads, ms, ws, bms, bws, firsts, xs_fixed: bool = False) -> bool:
        """True when everything the kernel reads is where and what it was: the same
        x and state tensors (the plan holds them, so a replaced one can never reuse
        an address), every x and gradient at the same address with the same shape,
        strides and dtype, momentum on/off and the first-step flags.

        Two shortcuts, both exact: ``xs`` passed as the very tuple the plan was built
        from (a tuple cannot change, and the plan keeps it alive) is not compared
        tensor by tensor; with ``xs_fixed`` (the caller's word that no x moved since
        the last call, see :func:`pilot_step`) the addresses of the x are not read.
        Their shapes and strides are always compared: a ``.data`` swap to a view at the
        same address moves neither address nor version counter.  ~0.3 µs per tensor on
        a cache hit (ResNet-50's 54 split tensors: see docs/kernels.md)."""
        n = len(self.xs)
        if xs is not self.xs and (len(xs) != n or not all(map(operator.is_, xs, self.xs))):
            return False
        if self.momentum != (bms is not None) or len(grads) != n or self.firsts != list(firsts):
            return False
        for s, t in zip((ms, ws, bms, bws) if bms is not None else (ms, ws), self.state):
            if len(s) != n or not all(map(operator.is_, s, t)):
                return False
        return (
            (xs_fixed or self.x_ptrs == tuple(map(_data_ptr, xs)))
            and self.g_ptrs == tuple(map(_data_ptr, grads))
            and self.layout.check((*xs, *grads))
        )

    def __reduce__(self):
        # A copied or pickled workspace holds no plan: the next call builds one.
        return (_no_plan, ())


def _no_plan() -> None:
    return None


def _check_dtypes(dtype, xs, grads, ms, ws, bms, bws) -> None:
    """Refuse, naming the fix, what no kernel (and no reference) may misread."""
    for i, (x, g) in enumerate(zip(xs, grads)):
        if x.dtype != dtype:
            raise TypeError(f"xs[{i}] has dtype {x.dtype} but xs[0] has {dtype}; call the Triton "
                            "backend once per parameter dtype (the optimizer groups tensors so)")
        if g.dtype not in DTYPES:
            raise TypeError(f"grads[{i}] has dtype {g.dtype}; the Triton backend reads float32, "
                            "bfloat16 or float16 gradients")
        if g.shape != x.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but xs[{i}] has "
                             f"{tuple(x.shape)}; a gradient must have its parameter's shape")
    for name, seq in (("ms", ms), ("ws", ws), ("momentum_ms", bms), ("momentum_ws", bws)):
        for i, t in enumerate(seq or ()):
            if t.dtype != torch.float32 or t.shape != xs[i].shape:
                raise TypeError(f"{name}[{i}] is {t.dtype} {tuple(t.shape)}; PILoT state must be "
                                f"float32 with the parameter's shape {tuple(xs[i].shape)}")


def _make_plan(xs, grads, ms, ws, bms, bws, firsts) -> _Plan:
    has_momentum = bms is not None
    streams = (xs, grads, ms, ws) + ((bms, bws) if has_momentum else ())
    groups: dict[tuple, list[int]] = {}
    slow = []
    for i, x in enumerate(xs):
        if x.numel() == 0:
            continue
        tensors = [s[i] for s in streams]
        if not walkable(*tensors):
            slow.append(i)
            continue
        aligned = all(t.data_ptr() % ALIGNMENT == 0 for t in tensors)
        groups.setdefault((grads[i].dtype, aligned), []).append(i)

    device = xs[0].device
    if groups and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "PILoT cannot upload its kernel table while a CUDA graph is being captured: run a "
            "warm-up step with the same gradient tensors before capturing, and keep gradients "
            "allocated across steps (opt.zero_grad(set_to_none=False))"
        )
    launches = []
    for (_, aligned), idx in groups.items():
        # The base of a stream is its lowest address, so every offset is >= 0; the
        # difference of two pointers of one dtype is a whole number of elements.
        bases = tuple(min(idx, key=lambda i: s[i].data_ptr()) for s in streams)
        rows, n_blocks = [], 0
        for i in idx:
            offsets = [(s[i].data_ptr() - s[b].data_ptr()) // s[i].element_size()
                       for s, b in zip(streams, bases)]
            if not has_momentum:
                offsets += [0, 0]
            numel = xs[i].numel()
            rows.append((*offsets, numel, n_blocks, int(firsts[i])))
            n_blocks += triton.cdiv(numel, BLOCK_SIZE)
        host = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
        table = host.to(device, non_blocking=True)
        launches.append(_Launch(bases, aligned, len(rows), n_blocks, table, host))
    return _Plan(launches, slow, has_momentum, list(firsts), tuple(xs), tuple(tuple(s) for s in streams[2:]),
                 tuple(map(_data_ptr, xs)), tuple(map(_data_ptr, grads)), LayoutGuard((*xs, *grads)))


def _scalar_arg(v, device: torch.device):
    """A hyperparameter as the kernel takes it: a float, or an fp32 tensor on the
    parameters' device that the kernel reads (capturable mode; no host sync).  A tensor
    elsewhere (a CPU scalar) is read on the host, as torch reads a CPU scalar tensor."""
    if not isinstance(v, Tensor):
        return float(v), False
    if v.device != device:
        return float(v), False
    return (v if v.dtype == torch.float32 else v.to(torch.float32)), True


def _launch(plan: _Plan, xs, grads, ms, ws, bms, bws, *, lr, momentum, dampening, nesterov,
            alpha, weight_decay, maximize, grad_scale, found_inf, l1_accum, l1_clear) -> None:
    device = xs[0].device
    lr, lr_on_device = _scalar_arg(lr, device)
    alpha, alpha_on_device = _scalar_arg(alpha, device)
    has_momentum = bms is not None
    if l1_clear is not None and l1_clear.data_ptr() == l1_accum.data_ptr():
        l1_clear.zero_()  # one slot for both: clear first, then add (as the reference)
        l1_clear = None
    streams = (xs, grads, ms, ws) + ((bms, bws) if has_momentum else ())
    for k, launch in enumerate(plan.launches):
        bases = [s[b] for s, b in zip(streams, launch.bases)]
        if not has_momentum:
            bases += bases[2:4]  # unused pointers
        clear = l1_clear if k == 0 else None
        _pilot_step_kernel[(launch.n_blocks,)](
            launch.table,
            launch.n_rows,
            *bases,
            grad_scale if grad_scale is not None else l1_accum,   # any pointer when unused
            found_inf if found_inf is not None else l1_accum,
            l1_accum,
            clear if clear is not None else l1_accum,
            lr,
            float(momentum),
            1.0 - float(dampening),
            alpha,
            float(weight_decay),
            LR_ON_DEVICE=lr_on_device,
            ALPHA_ON_DEVICE=alpha_on_device,
            HAS_MOMENTUM=has_momentum,
            NESTEROV=bool(nesterov),
            MAXIMIZE=bool(maximize),
            HAS_WEIGHT_DECAY=weight_decay != 0,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            CLEAR_L1=clear is not None,
            ALIGNED=launch.aligned,
            SEARCH_STEPS=max(1, launch.n_rows.bit_length()),
            BLOCK=BLOCK_SIZE,
            **LAUNCH_OPTIONS,
        )


def _bump_versions(tensors: Sequence[Tensor]) -> None:
    try:
        torch._C._increment_version(tensors if isinstance(tensors, (list, tuple)) else list(tensors))
    except TypeError:  # an older torch takes one tensor at a time
        for t in tensors:
            torch._C._increment_version(t)


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

    A gradient may have another float dtype than its parameter (torch's ``grad_dtype``,
    e.g. fp32 gradients of bf16 weights); it is read in its own dtype.  Tensors whose
    storage the kernel cannot walk (see :mod:`pilot_kernels.kernels.layout`) take the
    reference path instead, so results never depend on memory layout.  With a
    ``workspace`` the launch plan (layout checks, kernel tables, grids) is kept and
    reused while nothing it depends on changes (:meth:`_Plan.reusable`).
    ``workspace["xs_fixed"] = True`` is the caller's word that every ``x`` it passes
    with that workspace is at the address it had in every earlier call (the optimizer
    checks this for its own workspaces before each call): the plan then does not read
    the addresses of the ``x`` again.
    """
    if not xs:
        if l1_clear is not None:
            l1_clear.zero_()
        return
    dtype = xs[0].dtype
    if dtype not in DTYPES:
        raise TypeError(f"the Triton backend takes float32, bfloat16 or float16 parameters, got {dtype}")
    if momentum == 0:
        momentum_ms = momentum_ws = None
    plan = workspace.get("plan") if workspace is not None else None
    if plan is None or not plan.reusable(xs, grads, ms, ws, momentum_ms, momentum_ws, firsts,
                                         workspace.get("xs_fixed", False)):
        _check_dtypes(dtype, xs, grads, ms, ws, momentum_ms, momentum_ws)
        plan = _make_plan(xs, grads, ms, ws, momentum_ms, momentum_ws, firsts)
        if workspace is not None:
            workspace["plan"] = plan

    if l1_accum is None:  # the kernel always reduces; give it somewhere to write
        l1_accum = torch.zeros((), dtype=torch.float32, device=xs[0].device)
    if plan.launches:
        _launch(plan, xs, grads, ms, ws, momentum_ms, momentum_ws, lr=lr, momentum=momentum,
                dampening=dampening, nesterov=nesterov, alpha=alpha, weight_decay=weight_decay,
                maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, l1_accum=l1_accum,
                l1_clear=l1_clear)
        # Autograd's view of the kernel's writes to x, as the reference's copy_ and
        # torch's fused optimizers give it: a graph that saved x raises at backward
        # instead of using the new values.  (m, w and the momentum buffers are the
        # optimizer's own.)  ~55 ns per tensor.
        _bump_versions(xs)
    if plan.slow or not plan.launches:
        def pick(seq):
            return [seq[i] for i in plan.slow] if seq is not None else None

        reference.pilot_step(pick(xs), pick(grads), pick(ms), pick(ws), pick(momentum_ms),
                             pick(momentum_ws), pick(firsts), lr=lr, momentum=momentum,
                             dampening=dampening, nesterov=nesterov, alpha=alpha,
                             weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
                             found_inf=found_inf, l1_accum=l1_accum,
                             l1_clear=None if plan.launches else l1_clear)
