r"""Schedules for PILoT's decay strength α (paper appendix C.1 and Algorithm 1).

These follow the habits of :mod:`torch.optim.lr_scheduler`, but drive every param
group's ``group["alpha"]`` instead of its ``lr``:

* constructing a scheduler records each group's starting value as
  ``group["initial_alpha"]`` (``setdefault``, like ``initial_lr``) and performs an
  initial step, after which ``last_epoch == 0``;
* :meth:`AlphaScheduler.step` advances ``last_epoch`` by one and writes the new α into
  every group; :meth:`~AlphaScheduler.get_last_alpha` returns what was written last;
* :meth:`~AlphaScheduler.state_dict` holds everything except the optimizer.

Checkpoints: the schedule travels with the optimizer.  A scheduler attaches itself to
its optimizer, and ``optimizer.state_dict()`` carries the progress of every α scheduler
alive on it (in each param group, under ``"alpha_schedulers"``, the way ``initial_lr``
travels for lr schedulers), so whatever saves and restores the optimizer (a plain
``torch.save``, PyTorch Lightning, the Hugging Face ``Trainer``, timm,
``torch.distributed.checkpoint``) restores the schedule exactly, with no extra wiring:

* ``optimizer.load_state_dict(sd)`` restores the schedulers already attached, in the
  order they were built (the i-th built gets the i-th saved);
* a scheduler built *after* the load (a framework callback that builds it at the start
  of training) takes its saved progress at construction instead of starting over;
  ``resume=False`` starts the schedule afresh.

What is restored is the progress (``last_epoch``, the α0s, AdaptiveAlpha's previous
accuracy and L1, TargetSparsity's best accuracy and last share); the settings (``p``,
``total_epochs``, ``delta``, ``l1_threshold``, ``target``, ...) are the ones the scheduler
is built with.  A saved schedule of another class is not applied
(a warning says so).  :meth:`~AlphaScheduler.load_state_dict` still loads everything,
like ``lr_scheduler``'s.  With ``torch.distributed.checkpoint``, which loads only what the
template asks for, build the scheduler before taking the template.

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
with the epoch's training accuracy.  It scales α by δ or 1/δ, so it needs α0 > 0 (an α
of 0 could never grow) and a finite δ >= 1; it refuses anything else with a message
that says what to pass.

Target sparsity (ours, beyond the paper): :class:`TargetSparsity` steers α towards a
model that prunes well at a chosen sparsity, reading :func:`prunable_share`, the share
of ``Σ|x|`` held by the smallest ``target`` fraction of the reparameterized entries (a
measure that does not depend on the model's size or scale, unlike Algorithm 1's ``K``).

Other optimizers.  The schedulers only read and write ``group["alpha"]``: any
``torch.optim.Optimizer`` whose every param group carries an ``"alpha"`` entry can be
driven, e.g. the explicit-L1 baseline, SGD whose groups hold the α of the
``α·sign(x)`` term the training step adds (:func:`pilot_kernels.sparsity.add_l1_subgradient_`
with ``group["alpha"]``).  The entry travels with ``optimizer.state_dict()`` like any
group hyperparameter.  :class:`TargetSparsity` then needs ``measure=``, the tensors
whose prunability it reads (PILoT marks its reparameterized tensors itself);
:class:`AdaptiveAlpha` needs PILoT's ``l1_norm()``.
"""
from __future__ import annotations

import copy
import math
import warnings
import weakref
from numbers import Real
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .dtensor import all_reduce_over_shards_, local, shard_groups

__all__ = [
    "AlphaScheduler",
    "ConstantAlpha",
    "HarmonicAlpha",
    "QuadraticAlpha",
    "GeometricAlpha",
    "AdaptiveAlpha",
    "TargetSparsity",
    "prunable_share",
]


def _check_alpha_optimizer(optimizer: Any) -> None:
    """Raise unless ``optimizer`` is an Optimizer whose every group has an ``alpha``."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"{type(optimizer).__name__} is not an Optimizer; pass a pilot_kernels.PILoT optimizer, "
            "or a torch optimizer whose param groups carry an 'alpha' entry"
        )
    for i, group in enumerate(optimizer.param_groups):
        if "alpha" not in group:
            raise ValueError(
                f"param_groups[{i}] of {type(optimizer).__name__} has no 'alpha'; alpha "
                "schedulers drive each group's group['alpha']: pass a pilot_kernels.PILoT "
                "optimizer, or give every param group an 'alpha' entry that your training "
                "step reads (e.g. SGD groups whose α scales an explicit L1 term α·sign(x)); "
                "for the learning rate use torch.optim.lr_scheduler"
            )


#: Param-group key under which ``optimizer.state_dict()`` carries the α schedulers'
#: progress: a list with one ``{"type": class name, "state": {...}}`` per scheduler.
STATE_KEY = "alpha_schedulers"


class _Attached:
    """The α schedulers attached to one optimizer, and saved progress not yet claimed.

    Held in a WeakKeyDictionary keyed by the optimizer, with weak references to the
    schedulers: neither keeps the other alive, and nothing is stored on the optimizer
    except the published ``STATE_KEY`` entry of its param groups.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.schedulers: list[weakref.ref] = []
        # Saved entries beyond the attached schedulers: claimed, in order, by the next
        # schedulers built.  An optimizer that arrives with entries already in its groups
        # (a deepcopy or unpickled copy of one with schedulers) starts with them pending.
        groups = optimizer.param_groups
        self.pending: list[dict] = list(groups[0].get(STATE_KEY, [])) if groups else []
        self.incoming: Optional[list[dict]] = None  # seen by the load pre-hook
        optimizer.register_state_dict_pre_hook(_publish_hook)
        optimizer.register_load_state_dict_pre_hook(_load_pre_hook)
        optimizer.register_load_state_dict_post_hook(_load_post_hook)

    def alive(self) -> list["AlphaScheduler"]:
        live = [s for s in (r() for r in self.schedulers) if s is not None]
        if len(live) != len(self.schedulers):
            self.schedulers = [weakref.ref(s) for s in live]
        return live

    def publish(self, optimizer: Optimizer) -> None:
        """Write every scheduler's progress (and pending entries) into the live groups.

        Always a fresh list: a state_dict taken earlier (torch copies groups shallowly)
        keeps the snapshot it was taken with."""
        entries = [s._entry() for s in self.alive()] + copy.deepcopy(self.pending)
        for group in optimizer.param_groups:
            if entries:
                group[STATE_KEY] = copy.deepcopy(entries)
            else:
                group.pop(STATE_KEY, None)


_ATTACHED: "weakref.WeakKeyDictionary[Optimizer, _Attached]" = weakref.WeakKeyDictionary()


def _publish_hook(optimizer: Optimizer) -> None:
    _ATTACHED[optimizer].publish(optimizer)


def _load_pre_hook(optimizer: Optimizer, state_dict: dict) -> None:
    groups = state_dict.get("param_groups") or [{}]
    entries = next((g[STATE_KEY] for g in groups if STATE_KEY in g), None)
    _ATTACHED[optimizer].incoming = None if entries is None else copy.deepcopy(list(entries))


def _load_post_hook(optimizer: Optimizer) -> None:
    record = _ATTACHED[optimizer]
    entries, record.incoming = record.incoming, None
    if entries is not None:  # a state_dict without schedules leaves the schedulers alone
        live = record.alive()
        for scheduler, entry in zip(live, entries):
            scheduler._restore(entry)
        record.pending = entries[len(live):]
    record.publish(optimizer)


class AlphaScheduler:
    r"""Base class of the α schedulers: the ``lr_scheduler.LRScheduler`` of ``alpha``.

    Subclasses either define :meth:`_factor` (closed form
    :math:`α_k = α_0 · \text{factor}(k)` with ``k = last_epoch + 1``) or override
    :meth:`_compute_alphas`.

    Args:
        optimizer (Optimizer): the optimizer whose groups' ``alpha`` this drives
            (a :class:`pilot_kernels.PILoT`, or any optimizer whose every param group
            has an ``"alpha"`` entry).
        last_epoch (int): index of the last period seen.  Use ``-1`` (default) to start;
            use another value only to resume by hand, with ``initial_alpha`` already in
            every group (as after loading the optimizer's state_dict).
        resume (bool): when the optimizer carries the saved progress of a schedule of
            this class (its state_dict was loaded before this scheduler was built),
            continue it (default) instead of starting over.  Keyword only.

    Attributes:
        base_alphas (list[float]): every group's ``initial_alpha``, the α0 of the schedule.
        last_epoch (int): number of :meth:`step` calls since construction (0 right after).
    """

    #: Constructor arguments that are settings, not progress: a restore from the
    #: optimizer's state_dict keeps the values this scheduler was built with.
    _SETTINGS: tuple[str, ...] = ()

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1, *, resume: bool = True) -> None:
        _check_alpha_optimizer(optimizer)
        if not isinstance(resume, bool):
            raise TypeError(f"resume must be True or False, got {resume!r}")
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
        record = _ATTACHED.get(optimizer) or _ATTACHED.setdefault(optimizer, _Attached(optimizer))
        saved = record.pending[0] if record.pending else None
        if not (saved is not None and resume and last_epoch == -1 and self._restore(saved)):
            self._advance()
        # Attached only once built: a constructor that raised leaves no trace.  The
        # saved entry is consumed whether or not it was applied (slots stay in order).
        if saved is not None:
            record.pending.pop(0)
        record.alive()
        record.schedulers.append(weakref.ref(self))
        record.publish(optimizer)

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
        self._publish()

    def get_last_alpha(self) -> list[float]:
        """The α of every param group as last set by this scheduler (a copy)."""
        return list(self._last_alpha)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: every attribute except the optimizer."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state returned by :meth:`state_dict`: progress and settings.

        Like ``lr_scheduler``, this does not touch the optimizer: load the optimizer's
        own state_dict too (it holds the current ``alpha`` of every group, and usually
        this scheduler's progress already; see the module docstring).
        """
        self._check_groups(state_dict)
        self.__dict__.update(state_dict)
        self._publish()

    def _check_groups(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("base_alphas", self.base_alphas)
        if len(saved) != len(self.optimizer.param_groups):
            raise ValueError(
                f"state_dict is for {len(saved)} param groups but the optimizer has "
                f"{len(self.optimizer.param_groups)}; build the optimizer with the same groups"
            )

    # The optimizer-side record: progress saved with, and restored from, its state_dict.
    def _entry(self) -> dict[str, Any]:
        return {"type": type(self).__qualname__, "state": copy.deepcopy(self.state_dict())}

    def _restore(self, entry: dict[str, Any]) -> bool:
        """Take the progress of a saved entry; False (and a warning) if it is another class's."""
        if entry.get("type") != type(self).__qualname__:
            warnings.warn(
                f"the optimizer's state_dict holds the progress of a {entry.get('type')} α "
                f"schedule where this {type(self).__qualname__} was built; it is not applied "
                f"and {type(self).__qualname__} keeps its own state",
                stacklevel=3,
            )
            return False
        progress = {k: v for k, v in entry["state"].items() if k not in self._SETTINGS}
        self._check_groups(progress)
        self.__dict__.update(copy.deepcopy(progress))
        return True

    def _publish(self) -> None:
        record = _ATTACHED.get(self.optimizer)
        if record is not None:
            record.publish(self.optimizer)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A deepcopy or unpickled scheduler drives the copy of its optimizer: attach to
        # it, taking the place of its own published entry.
        self.__dict__.update(state)
        optimizer = self.optimizer
        record = _ATTACHED.get(optimizer) or _ATTACHED.setdefault(optimizer, _Attached(optimizer))
        if record.pending:
            record.pending.pop(0)
        record.alive()
        record.schedulers.append(weakref.ref(self))

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
        resume (bool): as for :class:`AlphaScheduler`.
    """

    _SETTINGS = ("p",)

    def __init__(
        self, optimizer: Optimizer, p: float = 0.95, last_epoch: int = -1, *, resume: bool = True
    ) -> None:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"Invalid p: {p}; a decaying geometric schedule needs 0 < p <= 1")
        self.p = float(p)
        super().__init__(optimizer, last_epoch, resume=resume)

    def _factor(self, k: int) -> float:
        return self.p ** (k - 1)


def _finite_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_total_epochs(total_epochs: Any) -> None:
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(
            f"Invalid total_epochs: {total_epochs!r}; pass the number of training epochs T "
            "(the number of periods step() will be called), an int >= 1"
        )


def _check_alpha0_positive(optimizer: Optimizer, who: str = "AdaptiveAlpha scales α by δ or 1/δ") -> None:
    """Raise if every group that holds reparameterized tensors (any optimizer other than
    PILoT: every group) has α = 0: ·δ keeps it 0."""
    is_split = getattr(optimizer, "is_reparameterized", None)
    groups = optimizer.param_groups
    if callable(is_split):
        split = [g for g in groups if any(is_split(optimizer.state[p]) for p in g["params"])]
        groups = split or groups
    if groups and all(float(g["alpha"]) == 0.0 for g in groups):
        which = "with reparameterized tensors" if callable(is_split) else f"of the {type(optimizer).__name__}"
        raise ValueError(
            f"{who}, and every group {which} has α = 0, which can never grow; start from "
            "alpha > 0 (the paper starts PILoT at 7e-6 to 7e-5 on ImageNet) or use a static schedule"
        )


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
    groups' current ``alpha`` (restored with the optimizer's state_dict), so α0 must be
    positive: the groups that hold reparameterized tensors may not all start at α = 0.

    Args:
        optimizer (Optimizer): a :class:`pilot_kernels.PILoT` (needs ``l1_norm()``).
        total_epochs (int): ``T``, the number of training epochs.
        delta (float): ``δ``, finite and ``>= 1`` (default 1.01, the paper's).
        l1_threshold (float): ``K``, finite and ``>= 0``; α only grows while ``L1 > K``.
            The paper uses 8000 (CIFAR) and 2e4–6e4 (ImageNet); the default 0 disables
            the check.
        last_epoch (int): as for :class:`AlphaScheduler`.
        resume (bool): as for :class:`AlphaScheduler`.

    Attributes:
        previous_acc (float): :math:`a_{k-1}`, 0 before the first step.
        last_l1 (float | None): the :math:`L_1` read by the last step.

    Example::

        >>> sched = AdaptiveAlpha(opt, total_epochs=100, l1_threshold=8000)
        >>> for epoch in range(100):
        ...     train_acc = train_one_epoch(model, opt)
        ...     sched.step(train_acc)
    """

    _SETTINGS = ("total_epochs", "delta", "l1_threshold")

    def __init__(
        self,
        optimizer: Optimizer,
        total_epochs: int,
        delta: float = 1.01,
        l1_threshold: float = 0.0,
        last_epoch: int = -1,
        *,
        resume: bool = True,
    ) -> None:
        _check_alpha_optimizer(optimizer)
        _check_total_epochs(total_epochs)
        if not _finite_real(delta) or not delta >= 1.0:
            raise ValueError(
                f"Invalid delta: {delta!r}; delta must be a finite number >= 1 (α grows by ·δ "
                "and decays by /δ; the paper uses 1.01, and delta=1 keeps α constant as in spred)"
            )
        if not _finite_real(l1_threshold) or not l1_threshold >= 0.0:
            raise ValueError(
                f"Invalid l1_threshold: {l1_threshold!r}; K must be a finite number >= 0 "
                "(0 disables the L1 check)"
            )
        _check_alpha0_positive(optimizer)
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
        super().__init__(optimizer, last_epoch, resume=resume)

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
        self._publish()

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


# ---------------------------------------------------------------------- target sparsity
# prunable_share bins |x| by the top bits of its fp32 bit pattern, which for a number
# >= 0 orders like its value: the 8 exponent bits and the first _SHARE_MANTISSA_BITS
# mantissa bits.  Every bin spans a relative width of at most 2^-7 whatever the scale of
# the weights, so the measure's error bound is scale free too.  Exponents outside
# [2^-64, 2^64) share the first or the last bin (their counts and sums stay exact).
_SHARE_MANTISSA_BITS = 7
_SHARE_EXP_LO, _SHARE_EXP_HI = -64, 64
_SHARE_BINS = (_SHARE_EXP_HI - _SHARE_EXP_LO) << _SHARE_MANTISSA_BITS  # 16384
#: One bin's relative width: :func:`prunable_share` is within ``(1 + this)^power - 1``
#: of the exact share, relatively.
SHARE_REL_ERROR = 2.0 ** -_SHARE_MANTISSA_BITS


def _share_tensors(source: Any) -> list[Tensor]:
    """The tensors :func:`prunable_share` measures: an optimizer's reparameterized ones
    (PILoT's ``is_reparameterized`` state), or the given tensors."""
    if isinstance(source, Optimizer):
        is_split = getattr(source, "is_reparameterized", None)
        if not callable(is_split):
            raise TypeError(
                f"{type(source).__name__} does not mark reparameterized tensors; pass a "
                "pilot_kernels.PILoT optimizer, or the tensors to measure (e.g. the model's weights)"
            )
        tensors = [p for g in source.param_groups for p in g["params"]
                   if is_split(source.state.get(p, {}))]  # .get: state is a defaultdict
        if not tensors:
            raise ValueError(
                f"the {type(source).__name__} reparameterizes no tensor (reparam=False, or no "
                "tensor with ndim >= 2), so there are no weights whose sparsity α drives"
            )
        return tensors
    if isinstance(source, Tensor):
        return [source]
    tensors = list(source)
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError("pass a PILoT optimizer, a tensor or a non-empty iterable of tensors")
    return tensors


def _check_fraction(name: str, value: Any, hint: str) -> float:
    if not _finite_real(value) or not 0.0 < value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r}; it must be a fraction strictly between 0 and 1 ({hint})")
    return float(value)


@torch.no_grad()
def _share_histogram(x: Tensor, power: int) -> Tensor:
    """``(2, B)`` float64 on ``x``'s device: the count and ``Σ|x|^power`` of ``x``'s
    entries in each magnitude bin.  Deterministic with ``torch.use_deterministic_algorithms``
    (integer bincount and a 1-D ``scatter_add_``); no host sync."""
    a = x.detach().abs().float().flatten().contiguous()
    # Bit pattern of a float >= 0: exponent field · 2^23 + mantissa, monotone in the value.
    # NaN has exponent 255 and lands in the last bin; its sum makes the total NaN.
    key = a.view(torch.int32) >> (23 - _SHARE_MANTISSA_BITS)
    key = (key - ((127 + _SHARE_EXP_LO) << _SHARE_MANTISSA_BITS)).clamp_(0, _SHARE_BINS - 1).long()
    hist = torch.zeros(2, _SHARE_BINS, dtype=torch.float64, device=a.device)
    hist[0] = torch.bincount(key, minlength=_SHARE_BINS)
    weight = a.double()
    hist[1].scatter_add_(0, key, weight if power == 1 else weight.square_())
    return hist


@torch.no_grad()
def prunable_share(source: Any, target: float, power: int = 1) -> Tensor:
    r"""Share of ``Σ|x|^power`` held by the smallest ``target`` fraction of the entries.

    With :math:`|x|_{(1)} \le \dots \le |x|_{(n)}` the magnitudes of all ``n`` entries of
    the measured tensors together (one global ranking, as :func:`pilot_kernels.prune_`
    with ``scope="global"``) and :math:`k = \operatorname{round}(\text{target} \cdot n)`:

    .. math::
        s = \frac{\sum_{i \le k} |x|_{(i)}^{\,q}}{\sum_{i \le n} |x|_{(i)}^{\,q}}
        \qquad (q = \text{power};\ s = 0 \text{ when every entry is } 0)

    ``s`` is what one-shot magnitude pruning to ``target`` removes, as a fraction of the
    weights' L1 norm (``power=1``) or squared L2 norm (``power=2``): 0 for a model that
    prunes losslessly, ``target`` for one whose entries are all equal.  It is a ratio of
    two sums over the same entries, so it does not change when the weights are scaled
    and does not grow with the number of parameters.

    Computed from a histogram of the magnitudes with bins of relative width
    ``SHARE_REL_ERROR = 2^-7`` (the fp32 exponent and 7 mantissa bits; 16,384 bins):
    counts and ``Σ|x|^q`` per bin, then the bin holding the ``k``-th entry, of whose
    ``j`` entries still needed the bin's mean is taken.  That mean is off by less than
    one bin width, so :math:`|\hat s - s| \le ((1 + 2^{-7})^q - 1)\, s`: :math:`2^{-7} s`
    for ``power=1``, :math:`(2^{-6} + 2^{-14})\, s` for ``power=2`` (for magnitudes in
    :math:`[2^{-64}, 2^{64})`); exact when the entries of that bin are equal.  Cost: a few elementwise passes over the entries (``abs``, the bin index,
    a bincount and a ``scatter_add_``, tensor by tensor, with about 24 bytes of
    temporaries per entry of the largest tensor), a few ops on the 16,384 bins, and no
    host sync (25M entries take 1.3 s on 2 busy CPU cores): the result is a 0-dim
    float64 tensor on the first tensor's device.  Under FSDP2 (DTensor parameters) each rank bins its local shards
    and the ``2 × 16,384`` histogram (256 KiB) is all-reduced over the shard dims, one
    collective: every rank gets the value a single process gets for the whole tensors
    (call it on every rank).  Under DDP the tensors are replicated and no collective runs.

    Args:
        source: a :class:`pilot_kernels.PILoT` (its reparameterized tensors, whose values
            ``x = m ⊙ w`` are the parameters), or a tensor or iterable of tensors.
        target: the sparsity, a fraction in ``(0, 1)``.
        power: 1 (share of the L1 norm, default) or 2 (of the squared L2 norm).

    Returns:
        ``s`` as a 0-dim float64 tensor; NaN when an entry is NaN or infinite.
    """
    target = _check_fraction("target", target, "0.9 measures the 90% smallest entries")
    if power not in (1, 2) or isinstance(power, bool):
        raise ValueError(f"Invalid power: {power!r}; pass 1 (share of Σ|x|) or 2 (share of Σx²)")
    tensors = _share_tensors(source)
    device = local(tensors[0]).device
    hist = torch.zeros(2, _SHARE_BINS, dtype=torch.float64, device=device)
    for t in tensors:
        hist += _share_histogram(local(t), power).to(device)
    counts, sums = all_reduce_over_shards_(hist, shard_groups(tensors))
    n = sum(t.numel() for t in tensors)  # a DTensor's numel is the whole tensor's
    k = round(target * n)
    cum = counts.cumsum(0)
    # The bin holding the k-th smallest entry: the first whose cumulative count reaches k.
    b = torch.searchsorted(cum, torch.full((1,), float(k), dtype=torch.float64, device=device))
    b = b.clamp_(max=_SHARE_BINS - 1)
    before = torch.arange(_SHARE_BINS, device=device) < b
    needed = k - torch.where(before, counts, 0).sum()
    in_bin = counts[b].clamp(min=1)  # needed == 0 where the bin is empty (k == 0)
    taken = torch.where(before, sums, 0).sum() + needed * sums[b].squeeze(0) / in_bin.squeeze(0)
    total = sums.sum()
    share = torch.where(total > 0, taken / torch.where(total > 0, total, 1.0), 0.0)
    return torch.where(torch.isfinite(total), share, math.nan)


class TargetSparsity(AlphaScheduler):
    r"""Steer α so that the model prunes well at a chosen sparsity (ours, beyond the paper).

    Call :meth:`step` once per period (an epoch, or every ``N`` optimizer steps: the
    caller's choice) with the period's training accuracy :math:`a_k`.  It reads
    :math:`s_k` = :func:`prunable_share` ``(measure, target)``, the share of
    :math:`\sum|x|` that pruning the smallest ``target`` fraction of the measured
    entries (by default PILoT's reparameterized tensors) would remove, and with :math:`\hat a_{k-1} = \max_{i<k} a_i`
    (:math:`\hat a_0 = 0`), :math:`T` = ``total_epochs`` periods and
    :math:`D = \lfloor \text{decay\_start} \cdot T \rfloor`:

    .. math::
        α \leftarrow
        \begin{cases}
            α \cdot g & \text{if } k \le D,\ s_k > τ \text{ and } a_k \ge (1 - ε)\, \hat a_{k-1}
                        \quad \text{(not prunable yet, accuracy holds: push)} \\
            α / h     & \text{if } k \le D \text{ otherwise}
                        \quad \text{(target met, or accuracy fell: ease off)} \\
            α \cdot d & \text{if } k > D \quad \text{(decay, whatever } s_k, a_k)
        \end{cases}

    with ``grow`` :math:`g > 1`, ``shrink`` :math:`h > 1`, ``decay``
    :math:`0 < d < 1`, ``tolerance`` :math:`τ` and ``acc_tolerance`` :math:`ε`.  Every
    group's α is multiplied by the same factor, so groups keep their ratios.  Like
    Algorithm 1, it grows α while training goes well and decays it geometrically at the
    end, so :math:`\sum_k α_k < ∞` as the convergence theorem needs (paper Theorem 2.2:
    :math:`\int_0^∞ α_t\,dt < ∞`); calls beyond ``T`` keep decaying.  In the control
    phase α settles where the smallest ``target`` fraction holds about ``τ`` of the L1
    norm while the accuracy stays within ``ε`` of the best seen.

    Why no tuning per model: Algorithm 1 grows α while :math:`\sum|x| > K`, and
    :math:`\sum|x| \approx n\, \mathbb{E}|x|` grows with the parameter count ``n`` and
    the weights' scale, so ``K`` must be chosen per model (the paper uses 8000 on CIFAR
    and 2e4–6e4 on ImageNet).  :math:`s_k` is a ratio of two sums over the same
    entries: it does not change when every weight is scaled by ``c`` or when the model
    has more entries drawn from the same distribution, and :math:`τ` reads directly as
    "one-shot pruning to ``target`` removes at most ``τ`` of the weights' L1 mass".  The
    factors are multiplicative, so α0 only needs to be positive: the controller finds
    the scale (a factor ``g`` per period).  It should be below the α at which weights
    collapse, though, since the rule reacts one period late: on the embedded-digits CNN
    (target 0.9) α0 = 2e-2 grew to 4.5e-2 in two epochs, the L1 norm fell from 2058 to
    34 and the model ended at 76.7% top-1; from α0 = 1e-3 it ended at 99.4%.  The accuracy test is
    relative too (:math:`ε = 0.01` allows a 1% relative drop, whether accuracies are
    given in 0..1 or 0..100).

    Cost per :meth:`step`: one :func:`prunable_share` (one pass over the
    measured entries, no host sync) and one host sync to read it; under FSDP2 one
    all-reduce of 256 KiB.  Under DDP pass the accuracy averaged over the ranks (the
    same number on every rank), so that every rank takes the same decision.

    Any optimizer whose param groups carry ``"alpha"`` (see the module docstring): with
    ``measure`` naming the weights α sparsifies, the same rule drives, e.g., the α of an
    explicit L1 term ``α·sign(x)`` added to SGD's gradients.  The measured tensors are
    not part of :meth:`state_dict` (nor of the optimizer's): a resumed run passes them
    again, as it passes the optimizer.

    Args:
        optimizer (Optimizer): a :class:`pilot_kernels.PILoT` with α > 0 in a group
            that holds reparameterized tensors (a multiplicative rule cannot leave 0),
            or another optimizer whose every group has an ``"alpha"`` (not all 0) when
            ``measure`` is given.
        target (float): the sparsity to aim at, in ``(0, 1)``, e.g. 0.9.
        total_epochs (int): ``T``, the number of periods :meth:`step` will be called.
        tolerance (float): ``τ`` in ``(0, 1)`` (default 0.02), the share of ``Σ|x|``
            the pruned entries may hold.  Not as conservative as the tiny MLP below
            suggests (lossless at 90% with shares 0.14–0.18): on the trainer's 61k-weight
            CNN on the embedded digits (seed 0) runs that ended with a share at 98% of
            0.077–0.094 lost 4–29 points of top-1 when pruned to 98%, and those that got
            below 0.024 lost 0.3–0.6.
        grow (float): ``g > 1`` (default 1.5).  α acts with a lag (the factors keep
            shrinking for a while after α is lowered), so a large ``g`` overshoots: on
            the tiny MLP of ``tests/test_target_sparsity.py`` (8 steps per period, seeds
            0–3), ``g = h = 2`` left two seeds at 73% and 78% held-out accuracy where
            ``g = h = 1.5`` reached 91.8–93.9%.
        shrink (float): ``h > 1`` (default 1.5).
        decay (float): ``d`` in ``(0, 1)`` (default 0.5), the factor per period after ``D``.
        decay_start (float): fraction of ``T`` in ``(0, 1]`` after which α decays
            (default 0.75; Algorithm 1 uses 0.5).
        acc_tolerance (float): ``ε`` in ``[0, 1)`` (default 0.01), the relative drop
            from the best accuracy that still counts as holding.  With augmented data
            the train accuracy dips by 1–3 points whenever α makes weights collapse; the
            trainer (``python/classification``) uses 0.03, with which the embedded-digits
            CNN reached a share of 0.0185 at 98% where 0.01 stalled at 0.094.
        measure (Tensor | Iterable[Tensor] | None): keyword only; the tensors whose
            share is read, ranked together (e.g. the model's weights with ``ndim >= 2``).
            ``None`` (default): the optimizer's reparameterized tensors, which only a
            :class:`pilot_kernels.PILoT` marks.
        last_epoch (int): as for :class:`AlphaScheduler`.
        resume (bool): as for :class:`AlphaScheduler`.

    Attributes:
        best_acc (float): :math:`\hat a_k`, 0 before the first step.
        last_share (float | None): :math:`s_k` read by the last step.
        last_action (str | None): ``"grow"``, ``"shrink"`` or ``"decay"``.

    Example::

        >>> sched = TargetSparsity(opt, target=0.9, total_epochs=40)
        >>> for epoch in range(40):
        ...     train_acc = train_one_epoch(model, opt)
        ...     sched.step(train_acc)
        ...     print(epoch, sched.get_last_alpha(), sched.last_share)
        >>> pilot_kernels.prune_(model, opt, sparsity=0.9)

        >>> # The explicit-L1 baseline: SGD whose group carries α, read by the step.
        >>> weights = [p for p in model.parameters() if p.ndim >= 2]
        >>> sgd = torch.optim.SGD([{"params": model.parameters(), "alpha": 1e-4}], lr=0.1)
        >>> sched = TargetSparsity(sgd, target=0.9, total_epochs=40, measure=weights)
        >>> # each step: loss.backward();
        >>> # add_l1_subgradient_(weights, sgd.param_groups[0]["alpha"]); sgd.step()
    """

    _SETTINGS = ("target", "total_epochs", "tolerance", "grow", "shrink", "decay",
                 "decay_start", "acc_tolerance")

    def __init__(
        self,
        optimizer: Optimizer,
        target: float,
        total_epochs: int,
        *,
        tolerance: float = 0.02,
        grow: float = 1.5,
        shrink: float = 1.5,
        decay: float = 0.5,
        decay_start: float = 0.75,
        acc_tolerance: float = 0.01,
        measure: Any = None,
        last_epoch: int = -1,
        resume: bool = True,
    ) -> None:
        _check_alpha_optimizer(optimizer)
        if measure is None:
            if not callable(getattr(optimizer, "is_reparameterized", None)):
                raise TypeError(
                    f"TargetSparsity reads the share of the weights that α sparsifies; "
                    f"{type(optimizer).__name__} does not mark them (PILoT does): pass "
                    "measure=, the tensors to measure (e.g. the model's weights with ndim >= 2)"
                )
            measured = None
        elif isinstance(measure, Optimizer):
            raise TypeError(
                "measure must be a tensor or an iterable of tensors (leave it out to measure "
                "the PILoT optimizer's reparameterized tensors)"
            )
        else:
            measured = _share_tensors(measure)  # a generator is read once, here
        self.target = _check_fraction("target", target, "the sparsity to aim at, e.g. 0.9")
        _check_total_epochs(total_epochs)
        self.tolerance = _check_fraction(
            "tolerance", tolerance, "the share of Σ|x| pruning may remove, e.g. 0.02")
        for name, value in (("grow", grow), ("shrink", shrink)):
            if not _finite_real(value) or not value > 1.0:
                raise ValueError(f"Invalid {name}: {value!r}; it must be a finite factor > 1 (default 1.5)")
        self.decay = _check_fraction("decay", decay, "α's factor per period in the decay phase, e.g. 0.5")
        if not _finite_real(decay_start) or not 0.0 < decay_start <= 1.0:
            raise ValueError(
                f"Invalid decay_start: {decay_start!r}; pass the fraction of total_epochs after "
                "which α decays, in (0, 1] (1: no decay phase)"
            )
        if not _finite_real(acc_tolerance) or not 0.0 <= acc_tolerance < 1.0:
            raise ValueError(
                f"Invalid acc_tolerance: {acc_tolerance!r}; pass the relative accuracy drop that "
                "still counts as holding, in [0, 1) (0.01: 1%)"
            )
        _check_alpha0_positive(optimizer, "TargetSparsity scales α up and down")
        if measured is None:
            _share_tensors(optimizer)  # refuses an optimizer with nothing to measure
        # Not progress: kept out of state_dict() (and so of the optimizer's).
        self._measure: Optional[list[Tensor]] = measured
        self.total_epochs = total_epochs
        self.grow, self.shrink = float(grow), float(shrink)
        self.decay_start = float(decay_start)
        self.acc_tolerance = float(acc_tolerance)
        self.best_acc = 0.0
        self.last_share: Optional[float] = None
        self.last_action: Optional[str] = None
        self._multiplier = 1.0  # set by step() for the duration of one _advance()
        super().__init__(optimizer, last_epoch, resume=resume)

    def _compute_alphas(self) -> list[float]:
        return [float(group["alpha"]) * self._multiplier for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: every attribute except the optimizer and the measured tensors."""
        return {k: v for k, v in super().state_dict().items() if k != "_measure"}

    def decide(self, share: float, acc: float) -> str:
        """The rule alone: ``"grow"``, ``"shrink"`` or ``"decay"`` for period
        ``k = last_epoch + 1`` with share ``s_k`` and accuracy ``a_k``; changes nothing."""
        k = self.last_epoch + 1
        if k > math.floor(self.decay_start * self.total_epochs):
            return "decay"
        holds = acc >= (1.0 - self.acc_tolerance) * self.best_acc
        return "grow" if share > self.tolerance and holds else "shrink"

    def step(self, train_acc: Union[float, Tensor]) -> None:  # type: ignore[override]
        """End period ``k = last_epoch + 1`` with its training accuracy ``train_acc`` (a
        number or a one-element tensor, any scale used consistently)."""
        acc = AdaptiveAlpha._to_float(train_acc)
        source = self.optimizer if self._measure is None else self._measure
        share = float(prunable_share(source, self.target))  # the one host sync
        if not math.isfinite(share):
            raise ValueError(
                "prunable_share is NaN: a measured weight is NaN or infinite; the run "
                "has diverged (lower the learning rate or α); α was not changed"
            )
        action = self.decide(share, acc)
        self._multiplier = {"grow": self.grow, "shrink": 1.0 / self.shrink, "decay": self.decay}[action]
        try:
            self._advance()
        finally:
            self._multiplier = 1.0
        self.best_acc = max(self.best_acc, acc)
        self.last_share = share
        self.last_action = action
        self._publish()
