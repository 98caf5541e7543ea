"""Environment compatibility helpers.

``import_torchvision`` exists because PyPI's torchvision wheels are built against CUDA
torch: next to a CPU-only torch build their compiled ops (``torchvision._C``) cannot load,
and torchvision 0.28's import then fails while registering fake kernels for
``torchvision::nms``/``qnms``.  The classification models this package uses are pure
Python, so we declare those two op schemas (without kernels) and import again.  Detection
ops stay unavailable in that setup, and a warning says so once.
"""
from __future__ import annotations

import importlib
import re
import warnings

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_shim_library = None  # kept alive: a torch.library.Library unregisters when collected


def import_torchvision():
    """``import torchvision``, working around a missing compiled-ops library."""
    global _shim_library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        # Only this one failure is worked around; any other import error stays as it is.
        if not re.search(r"operator torchvision::q?nms does not exist", str(err)):
            raise
    import sys

    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _shim_library is None:
        _shim_library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS.values():
            try:
                _shim_library.define(schema)
            except RuntimeError:  # already defined by a real torchvision._C
                pass
    warnings.warn(
        "torchvision's compiled ops could not be loaded (a CUDA torchvision wheel next to a "
        "CPU-only torch?); its models work, detection ops such as nms do not. Install the "
        "torchvision build that matches your torch to silence this.",
        RuntimeWarning,
        stacklevel=2,
    )
    return importlib.import_module("torchvision")
