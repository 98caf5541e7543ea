"""pilot_kernels: PILoT (Mask in the Mirror, ICLR 2025) as a fused, drop-in PyTorch optimizer."""
__version__ = "0.1.0"

from .grouping import param_groups
from .ham import HAM, HAMSGD, HAMAdamW, ham_step
from .init import split, split_
from .optimizer import PILoT, pilot
from .schedules import (
    AdaptiveAlpha,
    AlphaScheduler,
    ConstantAlpha,
    GeometricAlpha,
    HarmonicAlpha,
    QuadraticAlpha,
    TargetSparsity,
    prunable_share,
)
from .sparsity import (
    SparsityReport,
    add_l1_subgradient_,
    apply_keep_masks_,
    export_state_dict,
    prune_,
    sparsity_report,
    spred_sparsities,
    sweep,
)

__all__ = [
    "PILoT",
    "pilot",
    "HAM",
    "HAMAdamW",
    "HAMSGD",
    "ham_step",
    "param_groups",
    "split",
    "split_",
    "AlphaScheduler",
    "ConstantAlpha",
    "HarmonicAlpha",
    "QuadraticAlpha",
    "GeometricAlpha",
    "AdaptiveAlpha",
    "TargetSparsity",
    "prunable_share",
    "SparsityReport",
    "sparsity_report",
    "prune_",
    "apply_keep_masks_",
    "add_l1_subgradient_",
    "sweep",
    "spred_sparsities",
    "export_state_dict",
    "__version__",
]
