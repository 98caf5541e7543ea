"""Thin, optional glue for the frameworks people train with.

Nothing here is imported by ``import pilot_kernels``, and no framework is a dependency
of the core: import the module of the framework you use.

* :mod:`pilot_kernels.integrations.lightning`: :class:`~.lightning.AlphaSchedule`, a
  PyTorch Lightning callback that steps an α schedule and logs α, L1 and sparsity;
* :mod:`pilot_kernels.integrations.timm`: :func:`~.timm.register`, which makes
  ``timm.optim.create_optimizer_v2(model, opt="pilot")`` build PILoT with
  :func:`pilot_kernels.param_groups`;
* Hugging Face ``Trainer`` needs no glue:
  ``Trainer(..., optimizer_cls_and_kwargs=(PILoT, {"params": param_groups(model), ...}))``
  (the ``Trainer`` takes ``params`` from the kwargs as the parameter groups);
  :class:`pilot_kernels.integrations.hf.AlphaScheduleCallback` steps an α schedule.

α schedules need no integration to be checkpointed: their progress travels in the
optimizer's ``state_dict`` (see :mod:`pilot_kernels.schedules`), which every framework
saves and restores.
"""
