"""Hugging Face ``Trainer``: PILoT through ``optimizer_cls_and_kwargs``, and a callback
that steps a static α schedule.

Example (docs/frameworks.md's; ``tests/test_integrations.py`` runs it)::

    from transformers import Trainer, TrainingArguments
    from pilot_kernels import HarmonicAlpha, PILoT, param_groups
    from pilot_kernels.integrations.hf import AlphaScheduleCallback

    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir="out", learning_rate=0.05, weight_decay=0.0, report_to=[]),
        train_dataset=train_dataset,
        # The Trainer calls PILoT(groups, **kwargs); a "params" entry replaces its own
        # groups (decay / no decay), so param_groups decides what is split.
        optimizer_cls_and_kwargs=(PILoT, {"params": param_groups(model), "lr": 0.05, "alpha": 1e-4}),
        callbacks=[AlphaScheduleCallback(lambda opt: HarmonicAlpha(opt), interval="epoch")],
    )
    trainer.train()   # trainer.train(resume_from_checkpoint=True) continues exactly

Without ``"params"`` the ``Trainer`` groups the parameters itself (no weight decay on
biases and LayerNorm weights) and PILoT splits every ``ndim >= 2`` tensor of them,
embeddings included.  The ``Trainer`` pops ``"params"`` from the dict it is given, so
build the dict for each ``Trainer``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch.optim import Optimizer
from transformers import TrainerCallback

from ..schedules import AdaptiveAlpha, AlphaScheduler

__all__ = ["AlphaScheduleCallback"]


class AlphaScheduleCallback(TrainerCallback):
    """Step a static α schedule (harmonic, quadratic, geometric, constant) from the
    ``Trainer``'s loop, after every optimizer step (``interval="step"``, default) or at
    every epoch end (``interval="epoch"``).

    The scheduler is built in ``on_train_begin``, after the ``Trainer`` has loaded the
    optimizer from ``resume_from_checkpoint``, so it continues from the progress saved
    in the optimizer's state (see :mod:`pilot_kernels.schedules`).
    :class:`~pilot_kernels.AdaptiveAlpha` needs each epoch's training accuracy, which the
    ``Trainer`` does not compute: step it from your own callback.

    Args:
        scheduler (Callable[[Optimizer], AlphaScheduler]): builds the schedule on the
            PILoT optimizer, e.g. ``lambda opt: GeometricAlpha(opt, p=0.99)``.
        interval ("step" | "epoch"): when to step it.
    """

    def __init__(self, scheduler: Callable[[Optimizer], AlphaScheduler], *, interval: str = "step") -> None:
        if not callable(scheduler):
            raise TypeError(f"scheduler must build the schedule from the optimizer, got {scheduler!r}")
        if interval not in ("step", "epoch"):
            raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
        self.make_scheduler = scheduler
        self.interval = interval
        self.scheduler: Optional[AlphaScheduler] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        # Accelerate wraps the optimizer; the schedule drives (and is saved with) the inner one.
        inner = getattr(optimizer, "optimizer", optimizer)
        if self.scheduler is not None and self.scheduler.optimizer is inner:
            return  # train() again on the same optimizer: its schedule goes on (and was restored)
        scheduler = self.make_scheduler(inner)
        if not isinstance(scheduler, AlphaScheduler) or isinstance(scheduler, AdaptiveAlpha):
            raise TypeError(
                f"AlphaScheduleCallback steps static α schedules; got {type(scheduler).__name__} "
                "(AdaptiveAlpha needs the epoch's training accuracy: call its step(acc) yourself)"
            )
        self.scheduler = scheduler

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.interval == "step":
            self.scheduler.step()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.interval == "epoch":
            self.scheduler.step()
