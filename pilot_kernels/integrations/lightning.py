"""PyTorch Lightning: a callback that steps an α schedule and logs α, L1 and sparsity.

Example (docs/frameworks.md's; ``tests/test_integrations.py`` runs it)::

    import lightning.pytorch as pl
    from pilot_kernels import AdaptiveAlpha, PILoT, param_groups
    from pilot_kernels.integrations.lightning import AlphaSchedule

    class Net(pl.LightningModule):
        ...
        def training_step(self, batch, batch_idx):
            ...
            self.log("train_acc", acc, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self):
            # fused_unscale=False: Lightning clips gradients under mixed precision
            # only for optimizers that let the GradScaler unscale them.
            return PILoT(param_groups(self), lr=0.1, alpha=1e-4, fused_unscale=False)

    schedule = AlphaSchedule(lambda opt: AdaptiveAlpha(opt, total_epochs=90), monitor="train_acc")
    trainer = pl.Trainer(max_epochs=90, precision="bf16-mixed", gradient_clip_val=1.0,
                         callbacks=[schedule])
    trainer.fit(Net(), ckpt_path="last.ckpt")   # a resume continues the schedule exactly

The scheduler is built in ``on_fit_start``, after Lightning has restored the optimizer
from ``ckpt_path``, so it takes its saved progress from the optimizer's state (see
:mod:`pilot_kernels.schedules`); the callback itself holds nothing to checkpoint.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from torch.optim import Optimizer

from ..schedules import AdaptiveAlpha, AlphaScheduler
from ..sparsity import sparsity_report

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone ``pytorch_lightning`` package
    from pytorch_lightning.callbacks import Callback

__all__ = ["AlphaSchedule"]


class AlphaSchedule(Callback):
    """Step an α schedule from the Lightning loop; log α, L1 and sparsity.

    Args:
        scheduler (Callable[[Optimizer], AlphaScheduler]): builds the schedule on the
            PILoT optimizer, e.g. ``lambda opt: HarmonicAlpha(opt)``.
        interval ("epoch" | "step"): when to step it: at the end of every training
            epoch (default; :class:`~pilot_kernels.AdaptiveAlpha` needs this), or after
            every optimizer step (skipped steps under gradient accumulation do not count).
        monitor (str | None): for :class:`~pilot_kernels.AdaptiveAlpha`, the key in
            ``trainer.callback_metrics`` that holds the epoch's training accuracy, logged
            with ``self.log(monitor, acc, on_epoch=True)``.
        sparsity_thresholds (Sequence[float]): at every epoch end, log the fraction of
            the split tensors' entries with ``|x| <= t`` as ``pilot/sparsity_{t}`` (one
            pass over the weights and one host sync per threshold); ``()`` logs none.
        log (bool): log ``pilot/alpha`` (the first group's α) and ``pilot/l1`` at every
            epoch end with ``pl_module.log`` (default True).

    Attributes:
        scheduler (AlphaScheduler | None): the schedule, built in ``on_fit_start``.
    """

    def __init__(
        self,
        scheduler: Callable[[Optimizer], AlphaScheduler],
        *,
        interval: str = "epoch",
        monitor: Optional[str] = None,
        sparsity_thresholds: Sequence[float] = (1e-3,),
        log: bool = True,
    ) -> None:
        if not callable(scheduler):
            raise TypeError(
                "scheduler must build the schedule from the optimizer, e.g. "
                "lambda opt: HarmonicAlpha(opt); got " + repr(scheduler)
            )
        if interval not in ("epoch", "step"):
            raise ValueError(f"interval must be 'epoch' or 'step', got {interval!r}")
        self.make_scheduler = scheduler
        self.interval = interval
        self.monitor = monitor
        self.sparsity_thresholds = tuple(float(t) for t in sparsity_thresholds)
        self.log = log
        self.scheduler: Optional[AlphaScheduler] = None
        self._seen_step = 0

    @staticmethod
    def _optimizer(trainer: Any) -> Optimizer:
        found = [opt for opt in trainer.optimizers if all("alpha" in g for g in opt.param_groups)]
        if len(found) != 1:
            raise ValueError(
                f"AlphaSchedule needs exactly one PILoT optimizer in configure_optimizers(), "
                f"found {len(found)} among {[type(o).__name__ for o in trainer.optimizers]}"
            )
        return found[0]

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = self._optimizer(trainer)
        self._seen_step = trainer.global_step
        if self.scheduler is not None and self.scheduler.optimizer is optimizer:
            return  # fit() again on the same optimizer: its schedule goes on (and was restored)
        scheduler = self.make_scheduler(optimizer)
        if not isinstance(scheduler, AlphaScheduler):
            raise TypeError(f"scheduler(optimizer) must return an AlphaScheduler, got {type(scheduler).__name__}")
        adaptive = isinstance(scheduler, AdaptiveAlpha)
        if adaptive and (self.interval != "epoch" or self.monitor is None):
            raise ValueError(
                "AdaptiveAlpha steps once per epoch with the epoch's training accuracy: use "
                "interval='epoch' and monitor='<the key you self.log the accuracy under>'"
            )
        self.scheduler = scheduler

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.interval == "step" and trainer.global_step > self._seen_step:
            self._seen_step = trainer.global_step
            self.scheduler.step()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.interval == "epoch":
            if isinstance(self.scheduler, AdaptiveAlpha):
                metrics = trainer.callback_metrics
                if self.monitor not in metrics:
                    raise KeyError(
                        f"AlphaSchedule(monitor={self.monitor!r}) found no such metric at the end of "
                        f"the epoch; log it with self.log({self.monitor!r}, acc, on_epoch=True) "
                        f"(logged: {sorted(metrics)})"
                    )
                self.scheduler.step(metrics[self.monitor])
            else:
                self.scheduler.step()
        if self.log or self.sparsity_thresholds:
            self._log(trainer, pl_module)

    def _log(self, trainer: Any, pl_module: Any) -> None:
        opt = self.scheduler.optimizer
        values = {}
        if self.log:
            values["pilot/alpha"] = float(opt.param_groups[0]["alpha"])
            if callable(getattr(opt, "l1_norm", None)):
                values["pilot/l1"] = float(opt.l1_norm())
        for t in self.sparsity_thresholds:
            values[f"pilot/sparsity_{t:g}"] = sparsity_report(pl_module, opt, threshold=t).sparsity
        for name, value in values.items():
            pl_module.log(name, value, on_step=False, on_epoch=True)
