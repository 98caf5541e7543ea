"""Helpers of ``python/train.py``, the PILoT training script (data, models, distributed
setup, FSDP2 sharding, checkpoints, the train/eval loops, iterative pruning and the sweep
report).

Sparsity and α schedules come from :mod:`pilot_kernels.sparsity` and
:mod:`pilot_kernels.schedules`; nothing here re-implements them.
"""
