"""``import torchvision`` that survives a torchvision wheel whose compiled ops cannot load.

Some environments pair a CPU-only torch with a torchvision wheel built for CUDA.  Its
extension (``torchvision/_C.so``) then fails to load, which torchvision tolerates, but
``import torchvision`` still fails while registering fake kernels for
``torchvision::nms``/``qnms`` ("operator torchvision::nms does not exist").  Models,
datasets and transforms are pure Python and need none of the compiled ops, so in that
one case the two schemas are declared (without kernels) and the import is retried.
Any other import error is raised unchanged.  (``benchmarks/_env.py`` carries the same
workaround for the benchmarks.)
"""
from __future__ import annotations

import re
import sys
from types import ModuleType
from typing import Optional

import torch

_SHIM: Optional[torch.library.Library] = None


def import_torchvision() -> ModuleType:
    """The ``torchvision`` module, with ``datasets``, ``transforms`` and ``models`` loaded."""
    global _SHIM
    try:
        import torchvision

        return torchvision
    except RuntimeError as e:
        if not re.search(r"operator torchvision::q?nms does not exist", str(e)):
            raise
    if _SHIM is None:
        _SHIM = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            _SHIM.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torchvision

    return torchvision
