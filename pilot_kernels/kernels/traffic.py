"""The memory traffic one optimizer step must cause: the yardstick of every GB/s we report.

Each input is read once and each output written once; nothing else counts.  Per element:

* ``"pilot"`` (a reparameterized tensor, paper §3): read ``x``, ``g``, ``m``, ``w`` and,
  with momentum, ``b_m``, ``b_w``; write ``m``, ``w``, ``b_m``, ``b_w`` and ``x``.  ``x``
  is read to adopt what was written into it since the last step (``adopt_writes``; with
  ``adopt_writes=False`` it is not read: 4 B less).  ``g`` and ``x`` are in the
  parameter's dtype, the rest fp32: 4 + 4 + 2·16 + 4 = **44 B** for fp32 with momentum
  (40 without adoption), 38 for bf16/fp16.
* ``"sgd"`` (``torch.optim.SGD``, fused or foreach): read ``g``; read and write ``p``
  and, with momentum, its buffer, all in the parameter's dtype: **20 B** for fp32.
* ``"copy"`` (``dst.copy_(src)``): read and write one element: **8 B** for fp32.

A PILoT step moves 2.2x SGD's bytes (2x without adoption), so on a memory-bound device
it cannot take less than that multiple of SGD's time; the benchmarks report achieved bytes per second against these
counts and against a ``copy_`` measured in the same run.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

__all__ = ["ALGORITHMS", "bytes_per_element", "is_reparameterized", "step_bytes"]

ALGORITHMS = ("pilot", "sgd", "copy")

# m, w, b_m and b_w are fp32 whatever the parameter's dtype.
_STATE_ITEMSIZE = 4


def bytes_per_element(algorithm: str, dtype: torch.dtype = torch.float32, momentum: bool = True,
                      adopt_writes: bool = True) -> int:
    """Fewest bytes one step of ``algorithm`` moves per element of a ``dtype`` parameter."""
    s = dtype.itemsize
    if algorithm == "pilot":
        n_state = 4 if momentum else 2
        return (s if adopt_writes else 0) + s + 2 * n_state * _STATE_ITEMSIZE + s
    if algorithm == "sgd":
        return s + 2 * s + (2 * s if momentum else 0)
    if algorithm == "copy":
        return 2 * s
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


def is_reparameterized(shape: Sequence[int]) -> bool:
    """PILoT's default rule (``reparam="auto"``): tensors with ``ndim >= 2`` are split."""
    return len(shape) >= 2


def step_bytes(
    shapes: Iterable[Sequence[int]],
    algorithm: str,
    dtype: torch.dtype = torch.float32,
    momentum: bool = True,
) -> int:
    """Bytes of one step over tensors of ``shapes``.

    For ``"pilot"`` the reparameterized tensors (``ndim >= 2``) move PILoT's bytes and
    the rest (biases, norms) dense SGD's, as :class:`pilot_kernels.PILoT` treats them.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    own = bytes_per_element(algorithm, dtype, momentum)
    dense = bytes_per_element("sgd", dtype, momentum)
    total = 0
    for shape in shapes:
        dense_here = algorithm == "pilot" and not is_reparameterized(shape)
        total += math.prod(shape) * (dense if dense_here else own)
    return total
