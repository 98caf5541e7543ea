r"""Schedules for PILoT's decay strength α (spec §5).

These follow the habits of :mod:`torch.optim.lr_scheduler`, but drive every param
group's ``group["alpha"]`` instead of its ``lr``:

* constructing a scheduler records each group's starting value as
  ``group["initial_alpha"]`` (``setdefault``, like ``initial_lr``) and performs an
  initial step, after which ``last_epoch == 0``;
* :meth:`AlphaScheduler.step` advances ``last_epoch`` by one and writes the new α into
  every group; :meth:`~AlphaScheduler.get_last_alpha` returns what was written last;
* :meth:`~AlphaScheduler.state_dict` holds everything except the optimizer.  To resume,
  load the optimizer's state_dict (it carries ``alpha`` and ``initial_alpha``) and the
  scheduler's.

Static schedules (paper appendix C.1).  ``step()`` may be called once per optimizer
step or once per epoch: the caller's choice.  With ``k = last_epoch + 1`` the 1-based
period (``k = 1`` right after construction, ``k = n + 1`` after ``n`` calls of
``step()``):

.. math::
    \begin{aligned}
    \text{ConstantAlpha:}  \quad α_k &= α_0                      && \text{(spred)} \\
    \text{HarmonicAlpha:}  \quad α_k &= α_0 / k \\
    \text{QuadraticAlpha:} \quad α_k &= α_0 / k^2 \\
    \text{GeometricAlpha:} \quad α_k &= α_0 \, p^{\,k-1}
    \end{aligned}

Indexing decision (ours; the paper only gives ``1/k``, ``1/k²``, ``p^k``): periods are
counted from ``k = 1`` and the geometric exponent is ``k − 1``, so **every schedule
starts at exactly the α0 the optimizer was built with** and ``α0`` is the value used
for the first period.  The geometric schedule after ``n`` calls of ``step()`` is
``α0 · p^n``, i.e. the paper's ``α0 · p^k`` with ``α0`` re-based by one factor ``p``.

Adaptive schedule (paper Algorithm 1): :class:`AdaptiveAlpha`, stepped once per epoch
with the epoch's training accuracy.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Union

from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "AlphaScheduler",
    "ConstantAlpha",
    "HarmonicAlpha",
    "QuadraticAlpha",
    "GeometricAlpha",
    "AdaptiveAlpha",
]


def _check_alpha_optimizer(optimizer: Any) -> None:
    """Raise unless ``optimizer`` is an Optimizer whose every group has an ``alpha``."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{type(optimizer).__name__} is not an Optimizer; pass the PILoT optimizer")
    for i, group in enumerate(optimizer.param_groups):
        if "alpha" not in group:
            raise ValueError(
                f"param_groups[{i}] of {type(optimizer).__name__} has no 'alpha'; alpha "
                "schedulers drive PILoT's decay strength, so pass a pilot_kernels.PILoT "
                "optimizer (for the learning rate use torch.optim.lr_scheduler)"
            )


class AlphaScheduler:
    r"""Base class of the α schedulers: the ``lr_scheduler.LRScheduler`` of ``alpha``.

    Subclasses either define :meth:`_factor` (closed form
    :math:`α_k = α_0 · \text{factor}(k)` with ``k = last_epoch + 1``) or override
    :meth:`_compute_alphas`.

    Args:
        optimizer (Optimizer): the optimizer whose groups' ``alpha`` this drives
            (a :class:`pilot_kernels.PILoT`).
        last_epoch (int): index of the last period seen.  Use ``-1`` (default) to start;
            use another value only to resume, with ``initial_alpha`` already in every
            group (as after loading the optimizer's state_dict).

    Attributes:
        base_alphas (list[float]): every group's ``initial_alpha``, the α0 of the schedule.
        last_epoch (int): number of :meth:`step` calls since construction (0 right after).
    """

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        _check_alpha_optimizer(optimizer)
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_alpha", float(group["alpha"]))
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_alpha" not in group:
                    raise KeyError(
                        f"param 'initial_alpha' is not specified in param_groups[{i}] when "
                        f"resuming a scheduler with last_epoch={last_epoch}; load the "
                        "optimizer's state_dict first, or construct with last_epoch=-1"
                    )
        self.optimizer = optimizer
        self.base_alphas: list[float] = [float(g["initial_alpha"]) for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._last_alpha: list[float] = []
        self._advance()

    # ------------------------------------------------------------------ schedule
    def _factor(self, k: int) -> float:
        """``α_k / α_0`` for the 1-based period ``k``; closed-form schedules define it."""
        raise NotImplementedError(
            f"{type(self).__name__} must define _factor(k) or override _compute_alphas()"
        )

    def _compute_alphas(self) -> list[float]:
        """Every group's α for the current period ``k = last_epoch + 1``."""
        factor = self._factor(self.last_epoch + 1)
        return [a0 * factor for a0 in self.base_alphas]

    def _advance(self) -> None:
        self.last_epoch += 1
        alphas = self._compute_alphas()
        for group, alpha in zip(self.optimizer.param_groups, alphas):
            if isinstance(group["alpha"], Tensor):
                # Capturable PILoT: a replayed CUDA graph reads alpha in place.
                group["alpha"].fill_(alpha)
            else:
                group["alpha"] = alpha
        self._last_alpha = list(alphas)

    def step(self) -> None:
        """Advance one period (a step or an epoch, the caller's choice) and set every
        group's ``alpha``."""
        self._advance()

    def get_last_alpha(self) -> list[float]:
        """The α of every param group as last set by this scheduler (a copy)."""
        return list(self._last_alpha)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: every attribute except the optimizer."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state returned by :meth:`state_dict`.

        Like ``lr_scheduler``, this does not touch the optimizer: load the optimizer's
        own state_dict too (it holds the current ``alpha`` of every group).
        """
        saved = state_dict.get("base_alphas", self.base_alphas)
        if len(saved) != len(self.optimizer.param_groups):
            raise ValueError(
                f"state_dict is for {len(saved)} param groups but the optimizer has "
                f"{len(self.optimizer.param_groups)}; build the optimizer with the same groups"
            )
        self.__dict__.update(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, alpha={self._last_alpha})"


class ConstantAlpha(AlphaScheduler):
    """``α_k = α0``: spred's constant decay.  Exists so that code can always hold a
    scheduler; ``step()`` restores α0 if something else changed ``alpha``."""

    def _factor(self, k: int) -> float:
        return 1.0


class HarmonicAlpha(AlphaScheduler):
    """``α_k = α0 / k`` with ``k = last_epoch + 1`` (α0 for the first period)."""

    def _factor(self, k: int) -> float:
        return 1.0 / k


class QuadraticAlpha(AlphaScheduler):
    """``α_k = α0 / k²`` with ``k = last_epoch + 1`` (α0 for the first period)."""

    def _factor(self, k: int) -> float:
        return 1.0 / (k * k)


class GeometricAlpha(AlphaScheduler):
    """``α_k = α0 · p^(k−1)`` with ``k = last_epoch + 1``: ``α0 · p^n`` after ``n`` steps.

    Args:
        optimizer (Optimizer): a :class:`pilot_kernels.PILoT`.
        p (float): the ratio, ``0 < p <= 1`` (default 0.95, the paper's).
        last_epoch (int): as for :class:`AlphaScheduler`.
    """

    def __init__(self, optimizer: Optimizer, p: float = 0.95, last_epoch: int = -1) -> None:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"Invalid p: {p}; a decaying geometric schedule needs 0 < p <= 1")
        self.p = float(p)
        super().__init__(optimizer, last_epoch)

    def _factor(self, k: int) -> float:
        return self.p ** (k - 1)


class AdaptiveAlpha(AlphaScheduler):
    r"""Algorithm 1 of the paper: grow α while training goes well, then decay it.

    Call :meth:`step` once at the end of every epoch ``k = 1, …, T`` with that epoch's
    training accuracy :math:`a_k`.  With :math:`L_1 = \sum |m ⊙ w|` over all
    reparameterized tensors (``optimizer.l1_norm()``) and :math:`a_0 = 0`:

    .. math::
        α \leftarrow
        \begin{cases}
            α \cdot δ & \text{if } a_k \ge a_{k-1} \text{ and } L_1 > K \text{ and } k \le T/2 \\
            α / δ     & \text{otherwise}
        \end{cases}

    Every group's α is multiplied by the same factor, so groups keep their ratios.
    After ``T/2`` α decays geometrically (the convergence theorem needs
    :math:`\int α_t\,dt < ∞`); calls beyond ``T`` keep dividing by δ.
    ``δ = 1`` keeps α constant (spred).  The schedule is multiplicative: it reads the
    groups' current ``alpha``, so when resuming load the optimizer's state_dict too.

    Args:
        optimizer (Optimizer): a :class:`pilot_kernels.PILoT` (needs ``l1_norm()``).
        total_epochs (int): ``T``, the number of training epochs.
        delta (float): ``δ >= 1`` (default 1.01, the paper's).
        l1_threshold (float): ``K >= 0``; α only grows while ``L1 > K``.  The paper uses
            8000 (CIFAR) and 2e4–6e4 (ImageNet); the default 0 disables the check.
        last_epoch (int): as for :class:`AlphaScheduler`.

    Attributes:
        previous_acc (float): :math:`a_{k-1}`, 0 before the first step.
        last_l1 (float | None): the :math:`L_1` read by the last step.

    Example::

        >>> sched = AdaptiveAlpha(opt, total_epochs=100, l1_threshold=8000)
        >>> for epoch in range(100):
        ...     train_acc = train_one_epoch(model, opt)
        ...     sched.step(train_acc)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_epochs: int,
        delta: float = 1.01,
        l1_threshold: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        _check_alpha_optimizer(optimizer)
        if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
            raise ValueError(
                f"Invalid total_epochs: {total_epochs!r}; pass the number of training epochs T, "
                "an int >= 1"
            )
        if not delta >= 1.0:
            raise ValueError(
                f"Invalid delta: {delta}; delta must be >= 1 (α grows by ·δ and decays by /δ; "
                "delta=1 keeps α constant as in spred)"
            )
        if not l1_threshold >= 0.0:
            raise ValueError(
                f"Invalid l1_threshold: {l1_threshold}; K must be >= 0 (0 disables the L1 check)"
            )
        if not callable(getattr(optimizer, "l1_norm", None)):
            raise TypeError(
                f"AdaptiveAlpha reads optimizer.l1_norm(), which {type(optimizer).__name__} "
                "does not have; pass a pilot_kernels.PILoT optimizer"
            )
        self.total_epochs = total_epochs
        self.delta = float(delta)
        self.l1_threshold = float(l1_threshold)
        self.previous_acc = 0.0
        self.last_l1: Union[float, None] = None
        self._multiplier = 1.0  # set by step() for the duration of one _advance()
        super().__init__(optimizer, last_epoch)

    def _compute_alphas(self) -> list[float]:
        return [float(group["alpha"]) * self._multiplier for group in self.optimizer.param_groups]

    def step(self, train_acc: Union[float, Tensor]) -> None:  # type: ignore[override]
        """End epoch ``k = last_epoch + 1`` with its training accuracy ``train_acc``.

        Args:
            train_acc (float | Tensor): the epoch's training accuracy, a number or a
                one-element tensor (any scale, e.g. 0..1 or 0..100, used consistently).
        """
        acc = self._to_float(train_acc)
        l1 = float(self.optimizer.l1_norm())  # one host sync per epoch
        k = self.last_epoch + 1
        grow = acc >= self.previous_acc and l1 > self.l1_threshold and 2 * k <= self.total_epochs
        self._multiplier = self.delta if grow else 1.0 / self.delta
        try:
            self._advance()
        finally:
            self._multiplier = 1.0
        self.previous_acc = acc
        self.last_l1 = l1

    @staticmethod
    def _to_float(train_acc: Union[float, Tensor]) -> float:
        if isinstance(train_acc, Tensor):
            if train_acc.numel() != 1:
                raise ValueError(
                    f"train_acc must be a number or a one-element tensor, got shape "
                    f"{tuple(train_acc.shape)}; reduce it first (e.g. correct.float().mean())"
                )
            acc = float(train_acc.item())
        elif isinstance(train_acc, Real):
            acc = float(train_acc)
        else:
            raise TypeError(f"train_acc must be a float or a tensor, got {type(train_acc).__name__}")
        if not math.isfinite(acc):
            raise ValueError(f"train_acc must be finite, got {acc}; check the accuracy computation")
        return acc
