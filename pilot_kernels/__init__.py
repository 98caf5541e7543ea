"""pilot_kernels: PILoT (Mask in the Mirror, ICLR 2025) as a fused, drop-in PyTorch optimizer."""
__version__ = "0.1.0"

from .init import split, split_
from .optimizer import PILoT, pilot

__all__ = ["PILoT", "pilot", "split", "split_", "__version__"]
