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

Controllers (paper Algorithm 1, and ours): :class:`AdaptiveAlpha` and
:class:`TargetSparsity` are stepped once per period with the period's training accuracy
and multiply every group's current α by a factor their rule picks (so they need α0 > 0:
an α of 0 could never grow).  :class:`AdaptiveAlpha` reads ``L1 = Σ|x|``;
:class:`TargetSparsity` reads :func:`~pilot_kernels.sparsity.prunable_share`, the share of
``Σ|x|`` held by the smallest ``target`` fraction of the entries (a measure that does not
depend on the model's size or scale, unlike Algorithm 1's ``K``).  Given ``chance=``, the
accuracy of a constant guess, neither raises α while the accuracy is near chance, and
both cut it (:meth:`~AdaptiveAlpha.near_chance` gives the margin): a model that has not
learnt, or has collapsed, is not pushed further.

Other optimizers.  The schedulers only read and write ``group["alpha"]``: any
``torch.optim.Optimizer`` whose every param group carries an ``"alpha"`` entry can be
driven, e.g. the explicit-L1 baseline, SGD whose groups hold the α of the
``α·sign(x)`` term the training step adds (:func:`pilot_kernels.sparsity.add_l1_subgradient_`
with ``group["alpha"]``).  The entry travels with ``optimizer.state_dict()`` like any
group hyperparameter.  :class:`TargetSparsity` then needs ``measure=``, the tensors
whose prunability it reads (PILoT marks its reparameterized tensors itself);
:class:`AdaptiveAlpha` needs PILoT's ``l1_norm()``.

Measurements behind the defaults: ``docs/schedules.md`` and ``docs/target_sparsity.md``.
"""
from __future__ import annotations

import copy
import math
import warnings
import weakref
from numbers import Real
from typing import Any, Optional, Union

from torch import Tensor
from torch.optim import Optimizer

# prunable_share and SHARE_REL_ERROR are re-exported: they were defined here before.
from .sparsity import SHARE_REL_ERROR, _check_fraction, _finite_real, _share_tensors, prunable_share

__all__ = [
    "AlphaScheduler",
    "ConstantAlpha",
    "HarmonicAlpha",
    "QuadraticAlpha",
    "GeometricAlpha",
    "AdaptiveAlpha",
    "TargetSparsity",
    "prunable_share",
    "SHARE_REL_ERROR",
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

#: Entries older versions wrote into a scheduler's state and that mean nothing now;
#: dropped on load (``_multiplier`` was always 1.0 between steps).
_OBSOLETE_KEYS = frozenset({"_multiplier"})


def _saved_entries(groups: list[dict]) -> Optional[list[dict]]:
    """A copy of the schedulers' progress saved in ``groups``; None when there is none."""
    entries = next((g[STATE_KEY] for g in groups if STATE_KEY in g), None)
    return None if entries is None else copy.deepcopy(list(entries))


class _Attached:
    """The α schedulers attached to one optimizer, in the order they were built, and the
    saved progress no scheduler has claimed yet.

    Found through ``_ATTACHED``, a WeakKeyDictionary keyed by the optimizer, with weak
    references to the schedulers: neither keeps the other alive.  A side table rather than
    an attribute, because optimizers that pickle their whole ``__dict__`` (accelerate's
    ``AcceleratedOptimizer``) would then pickle weak references, which cannot be pickled.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.schedulers: list[weakref.ref] = []
        # An optimizer that arrives with entries in its groups (a deepcopy or unpickled
        # copy of one with schedulers) has them pending, for the next schedulers built.
        self.pending: list[dict] = _saved_entries(optimizer.param_groups) or []
        optimizer.register_state_dict_pre_hook(_publish_hook)
        optimizer.register_load_state_dict_post_hook(_load_post_hook)

    @staticmethod
    def of(optimizer: Optimizer) -> "_Attached":
        record = _ATTACHED.get(optimizer)
        if record is None:
            record = _ATTACHED[optimizer] = _Attached(optimizer)
        return record

    def alive(self) -> list["AlphaScheduler"]:
        live = [s for s in (r() for r in self.schedulers) if s is not None]
        if len(live) != len(self.schedulers):
            self.schedulers = [weakref.ref(s) for s in live]
        return live

    def attach(self, scheduler: "AlphaScheduler") -> None:
        """Append ``scheduler``; it takes the first pending slot, applied or not (slots stay in order)."""
        if self.pending:
            self.pending.pop(0)
        self.alive()
        self.schedulers.append(weakref.ref(scheduler))

    def publish(self, optimizer: Optimizer) -> None:
        """Write every scheduler's progress (and the pending entries) into the live groups.

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


def _load_post_hook(optimizer: Optimizer) -> None:
    # The loaded groups hold what was saved; a state_dict without schedules leaves the
    # schedulers alone.
    record = _ATTACHED[optimizer]
    entries = _saved_entries(optimizer.param_groups)
    if entries is not None:
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
        record = _Attached.of(optimizer)
        saved = record.pending[0] if record.pending else None
        if not (saved is not None and resume and last_epoch == -1 and self._restore(saved)):
            self._advance()
        # Attached only once built: a constructor that raised leaves no trace.
        record.attach(self)
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

    def _advance(self, alphas: Optional[list[float]] = None) -> None:
        """Count one period and write ``alphas`` (default: :meth:`_compute_alphas`'s)."""
        self.last_epoch += 1
        if alphas is None:
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
        this scheduler's progress already; see the module docstring).  Entries a newer
        version added and an older state lacks keep this scheduler's values.
        """
        self._check_groups(state_dict)
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in _OBSOLETE_KEYS})
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
        skip = _OBSOLETE_KEYS.union(self._SETTINGS)
        progress = {k: v for k, v in entry["state"].items() if k not in skip}
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
        _Attached.of(self.optimizer).attach(self)

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


# ---------------------------------------------------------------------- controllers
def _check_total_epochs(total_epochs: Any) -> None:
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(
            f"Invalid total_epochs: {total_epochs!r}; pass the number of training epochs T "
            "(the number of periods step() will be called), an int >= 1"
        )


def _check_alpha0_positive(optimizer: Optimizer, who: str) -> None:
    """Raise if every group that holds reparameterized tensors (any optimizer other than
    PILoT: every group) has α = 0: a factor keeps it 0."""
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


def _check_chance(chance: Any) -> Optional[float]:
    if chance is None:
        return None
    if not _finite_real(chance) or not chance > 0.0:
        raise ValueError(
            f"Invalid chance: {chance!r}; pass the training accuracy of a constant guess in the "
            "units of train_acc (1/num_classes for balanced classes and accuracies in 0..1, "
            "100/num_classes in percent), or None when it is not known"
        )
    return float(chance)


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


class _AccuracyController(AlphaScheduler):
    r"""Base of :class:`AdaptiveAlpha` and :class:`TargetSparsity`: ``α ← α · f``, once a
    period, with the factor ``f`` of the action the period's training accuracy and a
    measure of the weights call for.

    :meth:`step` reads the measure (:meth:`_read`), picks the action with :meth:`decide`
    and multiplies every group's *current* α by its factor (:meth:`_multipliers`), so
    groups keep their ratios and α continues from the value a loaded optimizer holds.
    With :math:`k` = ``last_epoch + 1``, :math:`D = \lfloor \text{decay\_start} \cdot T
    \rfloor` and :math:`a_k` the accuracy, the actions are, in this order:

    * ``"decay"`` if :math:`k > D` (the decay phase, whatever the measure and accuracy);
    * ``"chance"`` if :meth:`near_chance` (:math:`a_k`): multiplied by the down factor,
      never raised;
    * ``"grow"`` if the subclass's test :meth:`_pushes` holds, else ``"shrink"``.

    Subclasses set the settings and progress attributes of their rule, then call
    ``super().__init__``; they define :meth:`_read`, :meth:`_pushes`, :meth:`_record` and
    :meth:`_multipliers`.
    """

    #: :meth:`near_chance`: an accuracy at most this fraction of chance above chance is
    #: chance (with 2 balanced classes, up to 60% of 100).
    CHANCE_MARGIN = 0.2
    #: :meth:`near_chance`: an accuracy that has lost this fraction of its best lead over
    #: chance has fallen to chance.
    CHANCE_LEAD = 0.5

    def __init__(self, optimizer: Optimizer, total_epochs: int, chance: Optional[float],
                 last_epoch: int, resume: bool) -> None:
        self.chance = _check_chance(chance)
        self.total_epochs = total_epochs
        self.best_acc = 0.0
        self.last_action: Optional[str] = None
        super().__init__(optimizer, last_epoch, resume=resume)

    def _compute_alphas(self) -> list[float]:
        # The initial step keeps every group's α: the rule moves it from there.
        return [float(group["alpha"]) for group in self.optimizer.param_groups]

    def near_chance(self, acc: float) -> bool:
        r"""Whether the accuracy ``acc`` counts as chance: with :math:`c` = ``chance`` and
        :math:`\hat a` = ``best_acc`` (the best before this period),

        .. math::
            a - c \le \max\bigl(μ\, c,\ λ\, (\hat a - c)\bigr)
            \qquad (μ = \texttt{CHANCE\_MARGIN} = 0.2,\ λ = \texttt{CHANCE\_LEAD} = 0.5)

        i.e. not clearly above chance (the first term: with 2 balanced classes, up to 60%)
        or fallen back at least halfway from the best to chance (the second term: a
        collapse).  A model that has not learnt gains nothing from sparser weights, and
        one that collapses needs less α, not more.  Always False when ``chance`` is None.
        """
        c = self.chance
        if c is None:
            return False
        return acc - c <= max(self.CHANCE_MARGIN * c, self.CHANCE_LEAD * (self.best_acc - c))

    def decide(self, measured: float, acc: float) -> str:
        """The rule alone: ``"grow"``, ``"shrink"``, ``"decay"`` or ``"chance"`` for period
        ``k = last_epoch + 1`` with the measure ``measured`` and accuracy ``acc``; changes
        nothing."""
        k = self.last_epoch + 1
        if k > math.floor(self.decay_start * self.total_epochs):
            return "decay"
        if self.near_chance(acc):
            return "chance"
        return "grow" if self._pushes(measured, acc) else "shrink"

    def step(self, train_acc: Union[float, Tensor]) -> None:  # type: ignore[override]
        """End period ``k = last_epoch + 1`` with its training accuracy ``train_acc``.

        Args:
            train_acc (float | Tensor): the period's training accuracy, a number or a
                one-element tensor (any scale, e.g. 0..1 or 0..100, used consistently,
                ``chance`` included).
        """
        acc = _to_float(train_acc)
        measured = self._read()
        action = self.decide(measured, acc)
        factors = self._multipliers()
        factor = factors["shrink" if action == "chance" else action]
        self._advance([alpha * factor for alpha in self._compute_alphas()])
        self.best_acc = max(self.best_acc, acc)
        self.last_action = action
        self._record(measured, acc)
        self._publish()

    # ------------------------------------------------------------------ the rule's parts
    def _read(self) -> float:
        """The period's measure of the weights (one host sync); raises before any change."""
        raise NotImplementedError

    def _pushes(self, measured: float, acc: float) -> bool:
        """Whether, in the control phase and off chance, α grows."""
        raise NotImplementedError

    def _record(self, measured: float, acc: float) -> None:
        """Keep what the next period's rule needs."""
        raise NotImplementedError

    def _multipliers(self) -> dict[str, float]:
        """α's factor for ``"grow"``, ``"shrink"`` (also ``"chance"``) and ``"decay"``."""
        raise NotImplementedError


class AdaptiveAlpha(_AccuracyController):
    r"""Algorithm 1 of the paper: grow α while training goes well, then decay it.

    Call :meth:`step` once at the end of every epoch ``k = 1, …, T`` with that epoch's
    training accuracy :math:`a_k`.  With :math:`L_1 = \sum |m ⊙ w|` over all
    reparameterized tensors (``optimizer.l1_norm()``) and :math:`a_0 = 0`:

    .. math::
        α \leftarrow
        \begin{cases}
            α \cdot δ & \text{if } a_k \ge a_{k-1} \text{ and } L_1 > K \text{ and } k \le T/2
                        \text{ and } a_k \text{ is not near chance} \\
            α / δ     & \text{otherwise}
        \end{cases}

    Every group's α is multiplied by the same factor, so groups keep their ratios.
    After ``T/2`` α decays geometrically (the convergence theorem needs
    :math:`\int α_t\,dt < ∞`); calls beyond ``T`` keep dividing by δ.
    ``δ = 1`` keeps α constant (spred).  The schedule is multiplicative: it reads the
    groups' current ``alpha`` (restored with the optimizer's state_dict), so α0 must be
    positive: the groups that hold reparameterized tensors may not all start at α = 0.
    "Near chance" (ours, off unless ``chance`` is given) is :meth:`near_chance`:
    Algorithm 1 alone raises α whenever the accuracy did not drop, also at chance.

    Args:
        optimizer (Optimizer): a :class:`pilot_kernels.PILoT` (needs ``l1_norm()``).
        total_epochs (int): ``T``, the number of training epochs.
        delta (float): ``δ``, finite and ``>= 1`` (default 1.01, the paper's).
        l1_threshold (float): ``K``, finite and ``>= 0``; α only grows while ``L1 > K``.
            The paper uses 8000 (CIFAR) and 2e4–6e4 (ImageNet); the default 0 disables
            the check.
        last_epoch (int): as for :class:`AlphaScheduler`.
        resume (bool): as for :class:`AlphaScheduler`.
        chance (float | None): keyword only; the training accuracy of a constant guess,
            in the units of ``train_acc`` (``1/num_classes`` for balanced classes; the
            largest class's share otherwise).  ``None`` (default): unknown, no guard.

    Attributes:
        previous_acc (float): :math:`a_{k-1}`, 0 before the first step.
        best_acc (float): the best accuracy so far, 0 before the first step.
        last_l1 (float | None): the :math:`L_1` read by the last step.
        last_action (str | None): ``"grow"``, ``"shrink"``, ``"decay"`` (after ``T/2``)
            or ``"chance"``; the last three divide by δ.

    Example::

        >>> sched = AdaptiveAlpha(opt, total_epochs=100, l1_threshold=8000, chance=0.1)
        >>> for epoch in range(100):
        ...     train_acc = train_one_epoch(model, opt)
        ...     sched.step(train_acc)
    """

    _SETTINGS = ("total_epochs", "chance", "delta", "l1_threshold")

    #: Algorithm 1 decays after ``T/2``.
    decay_start = 0.5

    def __init__(
        self,
        optimizer: Optimizer,
        total_epochs: int,
        delta: float = 1.01,
        l1_threshold: float = 0.0,
        last_epoch: int = -1,
        *,
        resume: bool = True,
        chance: Optional[float] = None,
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
        _check_alpha0_positive(optimizer, "AdaptiveAlpha scales α by δ or 1/δ")
        if not callable(getattr(optimizer, "l1_norm", None)):
            raise TypeError(
                f"AdaptiveAlpha reads optimizer.l1_norm(), which {type(optimizer).__name__} "
                "does not have; pass a pilot_kernels.PILoT optimizer"
            )
        self.delta = float(delta)
        self.l1_threshold = float(l1_threshold)
        self.previous_acc = 0.0
        self.last_l1: Optional[float] = None
        super().__init__(optimizer, total_epochs, chance, last_epoch, resume)

    def _read(self) -> float:
        return float(self.optimizer.l1_norm())

    def _pushes(self, l1: float, acc: float) -> bool:
        return acc >= self.previous_acc and l1 > self.l1_threshold

    def _record(self, l1: float, acc: float) -> None:
        self.previous_acc = acc
        self.last_l1 = l1

    def _multipliers(self) -> dict[str, float]:
        return {"grow": self.delta, "shrink": 1.0 / self.delta, "decay": 1.0 / self.delta}


class TargetSparsity(_AccuracyController):
    r"""Steer α so that the model prunes well at a chosen sparsity (ours, beyond the paper).

    Call :meth:`step` once per period (an epoch, or every ``N`` optimizer steps: the
    caller's choice) with the period's training accuracy :math:`a_k`.  It reads
    :math:`s_k` = :func:`~pilot_kernels.sparsity.prunable_share` ``(measure, target)``,
    the share of :math:`\sum|x|` that pruning the smallest ``target`` fraction of the
    measured entries (by default PILoT's reparameterized tensors) would remove, and with
    :math:`\hat a_{k-1} = \max_{i<k} a_i` (:math:`\hat a_0 = 0`), :math:`T` =
    ``total_epochs`` periods and :math:`D = \lfloor \text{decay\_start} \cdot T \rfloor`:

    .. math::
        α \leftarrow
        \begin{cases}
            α \cdot d & \text{if } k > D \quad \text{(decay, whatever } s_k, a_k) \\
            α / h     & \text{if } a_k \text{ is near chance} \quad \text{(not learnt, or collapsed)} \\
            α \cdot g & \text{if } s_k > τ \text{ and } a_k \ge (1 - ε)\, \hat a_{k-1}
                        \quad \text{(not prunable yet, accuracy holds: push)} \\
            α / h     & \text{otherwise} \quad \text{(target met, or accuracy fell: ease off)}
        \end{cases}

    with ``grow`` :math:`g > 1`, ``shrink`` :math:`h > 1`, ``decay``
    :math:`0 < d < 1`, ``tolerance`` :math:`τ`, ``acc_tolerance`` :math:`ε`, and "near
    chance" :meth:`near_chance` (only with ``chance`` given: "within ε of the best" also
    holds when the best is chance).  Every group's α is multiplied by the same factor, so
    groups keep their ratios.  Like Algorithm 1, it grows α while training goes well and
    decays it geometrically at the end, so :math:`\sum_k α_k < ∞` as the convergence
    theorem needs (paper Theorem 2.2: :math:`\int_0^∞ α_t\,dt < ∞`); calls beyond ``T``
    keep decaying.  In the control phase α settles where the smallest ``target`` fraction
    holds about ``τ`` of the L1 norm while the accuracy stays within ``ε`` of the best seen.

    Why no tuning per model: Algorithm 1 grows α while :math:`\sum|x| > K`, and
    :math:`\sum|x| \approx n\, \mathbb{E}|x|` grows with the parameter count ``n`` and
    the weights' scale, so ``K`` must be chosen per model.  :math:`s_k` is a ratio of two
    sums over the same entries: it does not change when every weight is scaled by ``c``
    or when the model has more entries drawn from the same distribution, and :math:`τ`
    reads directly as "one-shot pruning to ``target`` removes at most ``τ`` of the
    weights' L1 mass".  The factors are multiplicative, so α0 only needs to be positive:
    the controller finds the scale (a factor ``g`` per period).  It should be below the α
    at which weights collapse, though, since the rule reacts one period late.  The
    accuracy test is relative too (:math:`ε = 0.01` allows a 1% relative drop, whether
    accuracies are given in 0..1 or 0..100).

    Cost per :meth:`step`: one :func:`~pilot_kernels.sparsity.prunable_share` (one pass
    over the measured entries, no host sync) and one host sync to read it; under FSDP2 one
    all-reduce of 256 KiB.  Under DDP pass the accuracy averaged over the ranks (the
    same number on every rank), so that every rank takes the same decision.

    Any optimizer whose param groups carry ``"alpha"`` (see the module docstring): with
    ``measure`` naming the weights α sparsifies, the same rule drives, e.g., the α of an
    explicit L1 term ``α·sign(x)`` added to SGD's gradients.  The measured tensors are
    not part of :meth:`state_dict` (nor of the optimizer's): a resumed run passes them
    again, as it passes the optimizer.  The defaults' measurements are in
    ``docs/target_sparsity.md``.

    Args:
        optimizer (Optimizer): a :class:`pilot_kernels.PILoT` with α > 0 in a group
            that holds reparameterized tensors (a multiplicative rule cannot leave 0),
            or another optimizer whose every group has an ``"alpha"`` (not all 0) when
            ``measure`` is given.
        target (float): the sparsity to aim at, in ``(0, 1)``, e.g. 0.9.
        total_epochs (int): ``T``, the number of periods :meth:`step` will be called.
        tolerance (float): ``τ`` in ``(0, 1)`` (default 0.02), the share of ``Σ|x|``
            the pruned entries may hold; models that ended above it lost points when
            pruned.
        grow (float): ``g > 1`` (default 1.5).  α acts with a lag (the factors keep
            shrinking for a while after α is lowered), so a large ``g`` overshoots.
        shrink (float): ``h > 1`` (default 1.5).
        decay (float): ``d`` in ``(0, 1)`` (default 0.5), the factor per period after ``D``.
        decay_start (float): fraction of ``T`` in ``(0, 1]`` after which α decays
            (default 0.75; Algorithm 1 uses 0.5).
        acc_tolerance (float): ``ε`` in ``[0, 1)`` (default 0.01), the relative drop
            from the best accuracy that still counts as holding.  With augmented data
            the train accuracy dips by a few points whenever α makes weights collapse;
            the trainer (``python/classification``) uses 0.03.
        measure (Tensor | Iterable[Tensor] | None): keyword only; the tensors whose
            share is read, ranked together (e.g. the model's weights with ``ndim >= 2``).
            ``None`` (default): the optimizer's reparameterized tensors, which only a
            :class:`pilot_kernels.PILoT` marks.
        chance (float | None): keyword only; the training accuracy of a constant guess,
            in the units of ``train_acc`` (``1/num_classes`` for balanced classes; the
            largest class's share otherwise).  ``None`` (default): unknown, no guard.
        last_epoch (int): as for :class:`AlphaScheduler`.
        resume (bool): as for :class:`AlphaScheduler`.

    Attributes:
        best_acc (float): :math:`\hat a_k`, 0 before the first step.
        last_share (float | None): :math:`s_k` read by the last step.
        last_action (str | None): ``"grow"``, ``"shrink"``, ``"decay"`` or ``"chance"``.

    Example::

        >>> sched = TargetSparsity(opt, target=0.9, total_epochs=40, chance=0.1)
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

    _SETTINGS = ("target", "total_epochs", "chance", "tolerance", "grow", "shrink", "decay",
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
        chance: Optional[float] = None,
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
        self.grow, self.shrink = float(grow), float(shrink)
        self.decay_start = float(decay_start)
        self.acc_tolerance = float(acc_tolerance)
        self.last_share: Optional[float] = None
        super().__init__(optimizer, total_epochs, chance, last_epoch, resume)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: every attribute except the optimizer and the measured tensors."""
        return {k: v for k, v in super().state_dict().items() if k != "_measure"}

    def _read(self) -> float:
        source = self.optimizer if self._measure is None else self._measure
        share = float(prunable_share(source, self.target))  # the one host sync
        if not math.isfinite(share):
            raise ValueError(
                "prunable_share is NaN: a measured weight is NaN or infinite; the run "
                "has diverged (lower the learning rate or α); α was not changed"
            )
        return share

    def _pushes(self, share: float, acc: float) -> bool:
        return share > self.tolerance and acc >= (1.0 - self.acc_tolerance) * self.best_acc

    def _record(self, share: float, acc: float) -> None:
        self.last_share = share

    def _multipliers(self) -> dict[str, float]:
        return {"grow": self.grow, "shrink": 1.0 / self.shrink, "decay": self.decay}
