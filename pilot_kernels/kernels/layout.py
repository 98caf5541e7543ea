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

import torch
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


# torch's C++ guard (what torch.compile runs before reusing a graph) is a private API:
# used only on the torch releases it was tested with, the public Python check elsewhere.
_NATIVE_TESTED = ((2, 4), (2, 14))


def _native_guards():
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if not _NATIVE_TESTED[0] <= version <= _NATIVE_TESTED[1]:
        return None
    try:
        from torch._C._dynamo.guards import TensorGuards
    except ImportError:
        return None
    return TensorGuards


_TensorGuards = _native_guards()


def _layout(tensors) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in tensors)


class LayoutGuard:
    """Shapes, strides, dtypes and devices of a list of tensors, checked in one call.
    With torch's ``TensorGuards`` (C++, on the torch releases in ``_NATIVE_TESTED``)
    ~3x cheaper than the public Python check used otherwise (``native=False`` forces
    it).  Used by the dispatcher's partition and by the optimizer's check that its
    unsplit tensors still form one (device, dtype) group."""

    def __init__(self, tensors: Sequence[Tensor], native: Optional[bool] = None):
        self._n = len(tensors)
        self._cpp = _TensorGuards is not None if native is None else native
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
