"""Which tensors the fused kernels can walk: one contract for the Triton and CUDA backends.

Both kernels treat every tensor of an entry (``x``, its gradient, ``m``, ``w`` and the
momentum buffers) as a flat run of ``numel`` elements starting at its data pointer, and
pair up element ``k`` of each run.  That is right exactly when every tensor is dense (no
gaps, no overlap: contiguous, channels_last or any other order of dimensions) and all
of them share ``x``'s shape and, on every dimension of size > 1, its strides.  Tensors
that fail the test are stepped by the reference backend instead, so results never
depend on memory layout.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

__all__ = ["ALIGNMENT", "LayoutGuard", "is_dense", "same_layout", "walkable"]

#: Bytes every pointer of an entry must be a multiple of for the kernels' 16-byte
#: vector accesses; entries with a less aligned pointer take an unvectorized path.
ALIGNMENT = 16


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``[data_ptr, data_ptr + numel)``."""
    expected = 1
    # From the smallest stride up, each dimension must start where the previous end.
    # Size-1 dimensions take no room, whatever their stride.
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: Tensor, x: Tensor) -> bool:
    """``a`` has ``x``'s shape and, on every dimension of size > 1, its strides."""
    if a.shape != x.shape:
        return False
    return all(s == 1 or sa == sx for s, sa, sx in zip(x.shape, a.stride(), x.stride()))


def walkable(x: Tensor, *others: Optional[Tensor]) -> bool:
    """True when a fused kernel may walk ``x`` and ``others`` (``None`` entries are
    ignored) as flat runs of ``x.numel()`` elements in the same order."""
    if not is_dense(x):
        return False
    return all(t is None or same_layout(t, x) for t in others)


try:  # the C++ check torch.compile runs before reusing a graph
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every supported torch has it
    _TensorGuards = None


def _layout(tensors) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors)


class LayoutGuard:
    """Shapes, strides, dtypes and devices of a list of tensors, checked in one call:
    with torch's ``TensorGuards`` (C++), ~3x cheaper than reading them in Python.  Used
    by the Triton launch plan and by the optimizer's check that its unsplit tensors
    still form one (device, dtype) group."""

    def __init__(self, tensors: Sequence[Tensor]):
        self._n = len(tensors)
        self._cpp = _TensorGuards is not None
        if self._cpp:
            self._guard = _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        else:
            self._layout = _layout(tensors)

    def check(self, tensors: Sequence[Tensor]) -> bool:
        if len(tensors) != self._n:
            return False
        if self._cpp:
            return self._guard.check(*tensors)
        return self._layout == _layout(tensors)
