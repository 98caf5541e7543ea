r"""Measuring and using the sparsity PILoT produces (paper §4 and appendix C.2, as in spred).

Training drives many entries of ``x = m ⊙ w`` towards zero but rarely to exactly zero.
As in the paper (and spred), sparsity is read off by post-hoc magnitude pruning without
fine-tuning: prune the fraction ``s`` of entries with the smallest ``|x|``, evaluate,
for a sweep of ``s`` (:func:`spred_sparsities`).

Every function here works on the *reparameterized* tensors of a model.  With the
:class:`~pilot_kernels.PILoT` optimizer passed, those are the model's parameters ``p``
whose optimizer state holds factors (``"m" in optimizer.state[p]``); without one, the
tensors with ``ndim >= 2`` (PILoT's ``reparam="auto"``).  Names are the model's
``named_parameters()`` names.

* :func:`sparsity_report` — per-tensor and global fraction of ``|x| <= threshold``.
* :func:`prune_` — zero the smallest-``|x|`` fraction in place, keeping ``x``, ``m``,
  ``w`` and the momentum buffers consistent, so that the pruned entries stay exactly zero
  under further PILoT steps without any mask.
* :func:`sweep` — prune to each sparsity, evaluate, restore bit-exactly.
* :func:`export_state_dict` — a plain ``state_dict`` (CPU copies) with exact zeros that
  loads into the unmodified model.
* :func:`prunable_share` — the share of ``Σ|x|`` that pruning to a sparsity would remove:
  how well a model prunes before it is pruned (what :class:`~pilot_kernels.TargetSparsity`
  steers α by).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .dtensor import all_reduce_over_shards_, local, shard_groups
from .optimizer import PILoT

__all__ = [
    "add_l1_subgradient_",
    "SparsityReport",
    "sparsity_report",
    "prune_",
    "apply_keep_masks_",
    "sweep",
    "spred_sparsities",
    "export_state_dict",
    "prunable_share",
]

T = TypeVar("T")

_SCOPES = ("global", "layer")
# Per-tensor optimizer state that pruning zeroes along with x.
_PRUNED_STATE_KEYS = PILoT.FACTOR_KEYS + PILoT.MOMENTUM_KEYS


# ---------------------------------------------------------------------- validation
def _targets(model: nn.Module, optimizer: Optional[Optimizer]) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` of every reparameterized tensor of ``model``, or a ValueError."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (for the tensor names), got {type(model).__name__}")
    named = list(model.named_parameters())
    if optimizer is None:
        targets = [(n, p) for n, p in named if p.ndim >= 2]
        if not targets:
            raise ValueError(
                "the model has no tensors with ndim >= 2 to count or prune; pass the PILoT "
                "optimizer to use its reparameterized tensors instead"
            )
        return targets
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in owned for _, p in named):
        raise ValueError(
            f"the {type(optimizer).__name__} holds none of the model's parameters; pass the "
            "optimizer built from this model's parameters() (not from a copy of the model)"
        )
    # optimizer.state is a defaultdict: look up without inserting.
    targets = [(n, p) for n, p in named if id(p) in owned and "m" in optimizer.state.get(p, {})]
    if not targets:
        raise ValueError(
            f"the {type(optimizer).__name__} reparameterizes none of the model's tensors; pass "
            "the pilot_kernels.PILoT optimizer that trains this model, or optimizer=None to "
            "treat the tensors with ndim >= 2 as reparameterized"
        )
    return targets


def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(
            f"sparsity must be a fraction in [0, 1] (0.9 zeroes 90% of the entries), got {sparsity!r}"
        )
    return float(sparsity)


def _check_scope(scope: Any) -> None:
    if scope not in _SCOPES:
        raise ValueError(
            f"scope must be 'global' (one magnitude ranking over all tensors) or 'layer' "
            f"(the same fraction in every tensor), got {scope!r}"
        )


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not threshold >= 0.0:
        raise ValueError(f"threshold must be a number >= 0 (|x| <= threshold counts as zero), got {threshold!r}")
    return float(threshold)


# ---------------------------------------------------------------------- selection
def _magnitudes(p: Tensor) -> Tensor:
    """``|x|`` flattened, in fp32; NaN ranks as the largest magnitude (pruned last)."""
    a = p.detach().abs().float().flatten()
    return torch.where(torch.isnan(a), torch.full_like(a, math.inf), a)


def _smallest(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly ``k`` smallest entries of the 1-D ``scores``.

    The ``k``-th smallest value ``t`` comes from ``kthvalue``; all entries ``< t`` are
    taken, and of the entries ``== t`` the first ones in flat order, as many as needed.
    Deterministic and without a host sync.
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    kth = scores.kthvalue(k).values
    below = scores < kth
    ties = scores == kth
    needed = k - below.sum()
    return below | (ties & (ties.cumsum(0) <= needed))


def _keep_masks(params: list[Tensor], sparsity: float, scope: str) -> list[Tensor]:
    """Keep-masks (``True`` = kept) pruning ``round(sparsity · n)`` smallest-``|x|``
    entries, over all ``params`` together (``"global"``) or per tensor (``"layer"``)."""
    if scope == "layer":
        return [~_smallest(_magnitudes(p), round(sparsity * p.numel())).view_as(p) for p in params]
    device = params[0].device
    scores = torch.cat([_magnitudes(p).to(device) for p in params])
    pruned = _smallest(scores, round(sparsity * scores.numel()))
    chunks = pruned.split([p.numel() for p in params])
    return [~c.view_as(p).to(p.device) for c, p in zip(chunks, params)]


# ---------------------------------------------------------------------- L1 bookkeeping
def _refresh_l1(optimizer: Optional[Optimizer]) -> None:
    """Make ``PILoT.l1_norm()`` reflect factors changed outside a step."""
    refresh = getattr(optimizer, "refresh_l1_", None)
    if refresh is not None:
        refresh()


# ---------------------------------------------------------------------- report
@dataclass(frozen=True)
class SparsityReport:
    """Sparsity of the reparameterized tensors: the fraction of entries with
    ``|x| <= threshold``, per tensor and over all of them.

    Attributes:
        threshold: magnitude at or below which an entry counts as zero.
        layer_zeros: tensor name → number of entries with ``|x| <= threshold``.
        layer_numel: tensor name → number of entries.
    """

    threshold: float
    layer_zeros: dict[str, int]
    layer_numel: dict[str, int]

    @property
    def layer_sparsity(self) -> dict[str, float]:
        """Tensor name → fraction of its entries counted as zero."""
        return {n: self.layer_zeros[n] / self.layer_numel[n] if self.layer_numel[n] else 0.0
                for n in self.layer_numel}

    @property
    def zeros(self) -> int:
        """Entries counted as zero over all reparameterized tensors."""
        return sum(self.layer_zeros.values())

    @property
    def numel(self) -> int:
        """Entries of all reparameterized tensors."""
        return sum(self.layer_numel.values())

    @property
    def sparsity(self) -> float:
        """Global fraction ``zeros / numel``."""
        return self.zeros / self.numel if self.numel else 0.0

    def format(self) -> str:
        """A plain-text table: one row per tensor and a ``global`` row."""
        rows = [(n, self.layer_numel[n], self.layer_zeros[n], s) for n, s in self.layer_sparsity.items()]
        rows.append(("global", self.numel, self.zeros, self.sparsity))
        width = max(len("tensor"), *(len(r[0]) for r in rows))
        lines = [f"{'tensor':<{width}}  {'numel':>12}  {'zeros':>12}  {'sparsity':>9}"]
        for i, (name, numel, zeros, frac) in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * len(lines[0]))
            lines.append(f"{name:<{width}}  {numel:>12d}  {zeros:>12d}  {100 * frac:>8.2f}%")
        lines.append(f"(an entry counts as zero when |x| <= {self.threshold:g})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


@torch.no_grad()
def sparsity_report(
    model: nn.Module, optimizer: Optional[Optimizer] = None, threshold: float = 0.0
) -> SparsityReport:
    """Count the entries of the reparameterized tensors with ``|x| <= threshold``.

    Args:
        model: the model (its ``named_parameters()`` give the names).
        optimizer: the :class:`~pilot_kernels.PILoT` training it; ``None`` counts the
            tensors with ``ndim >= 2``.
        threshold: magnitude counted as zero (default 0: exact zeros only).

    Returns:
        A :class:`SparsityReport`; ``print(report)`` shows a table.

    With FSDP2 (DTensor) parameters the counts are all-reduced over the shards: call it
    on every rank.
    """
    threshold = _check_threshold(threshold)
    targets = _targets(model, optimizer)
    params = [p for _, p in targets]
    # Counted on local shards under FSDP2 and summed over the shards: one collective.
    device = local(params[0]).device
    zeros = torch.stack([(local(p).detach().abs() <= threshold).sum().to(device) for p in params])
    zeros = all_reduce_over_shards_(zeros, shard_groups(params)).tolist()  # one host sync
    return SparsityReport(
        threshold=threshold,
        layer_zeros={n: int(z) for (n, _), z in zip(targets, zeros)},
        layer_numel={n: p.numel() for n, p in targets},  # a DTensor's numel is the full one
    )


# ---------------------------------------------------------------------- pruning
@torch.no_grad()
def prune_(
    model: nn.Module,
    optimizer: Optional[Optimizer] = None,
    sparsity: float = 0.9,
    scope: str = "global",
) -> dict[str, Tensor]:
    r"""Zero the ``sparsity`` fraction of smallest-``|x|`` entries, in place.

    Exactly ``round(sparsity · n)`` entries are pruned, where ``n`` counts the entries
    of all reparameterized tensors (``scope="global"``: one ranking over the whole
    model) or of each tensor separately (``scope="layer"``).  Ties at the threshold
    magnitude are broken by position (earlier tensors, then lower flat index, first),
    so the result is deterministic.  NaN entries rank last.

    With the PILoT optimizer passed, the pruned entries are set to zero in ``x``, in
    both factors ``m, w`` and in both momentum buffers, so ``x == m ⊙ w`` still holds
    and the entries **stay exactly zero in every later PILoT step, with no mask**: for
    ``m = w = 0`` the update (the PILoT docstring's)

    .. math::
        d_m = (g + λ m w)\, w + 2α\, m = 0, \qquad d_w = (g + λ m w)\, m + 2α\, w = 0

    vanishes whatever the gradient ``g``, weight decay ``λ`` and ``α``, and with zero
    momentum buffers ``b ← μ b + (1−τ) d = 0`` too (also with Nesterov).  Plain SGD on
    ``x`` (no optimizer passed) has no such fixed point: there the zeros only last until
    the next update.  ``optimizer.l1_norm()`` is refreshed to the pruned weights.

    Args:
        model: the model.
        optimizer: the :class:`~pilot_kernels.PILoT` training it, or ``None`` to prune
            the tensors with ``ndim >= 2`` (``x`` only).
        sparsity: fraction in ``[0, 1]`` to prune.
        scope: ``"global"`` or ``"layer"``.

    Returns:
        tensor name → boolean keep-mask (``True`` where the entry was kept), shaped
        like the tensor and on its device.

    Raises:
        ValueError: bad ``sparsity`` or ``scope``, or an optimizer that does not train
            this model; nothing is changed then.
    """
    sparsity = _check_sparsity(sparsity)
    _check_scope(scope)
    targets = _targets(model, optimizer)
    params = [p for _, p in targets]
    keeps = {n: keep for (n, _), keep in zip(targets, _keep_masks(params, sparsity, scope))}
    apply_keep_masks_(model, optimizer, keeps)
    return keeps


@torch.no_grad()
def apply_keep_masks_(model: nn.Module, optimizer: Optional[Optimizer], keeps: dict[str, Tensor]) -> None:
    """Zero the entries where ``keeps[name]`` is False: in ``x`` and, with the PILoT
    optimizer, in ``m``, ``w`` and both momentum buffers (see :func:`prune_` for why
    they then stay zero), and refresh ``optimizer.l1_norm()``.  Re-applies the masks
    :func:`prune_` returned, e.g. after rewinding the weights."""
    params = dict(model.named_parameters())
    for name, keep in keeps.items():
        p = params[name]
        drop = ~keep.to(p.device)
        p.masked_fill_(drop, 0)
        if optimizer is not None:
            state = optimizer.state[p]
            for key in _PRUNED_STATE_KEYS:
                if key in state:
                    state[key].masked_fill_(drop, 0)
    _refresh_l1(optimizer)


def sweep(
    model: nn.Module,
    optimizer: Optional[Optimizer],
    fn: Callable[[], T],
    sparsities: Iterable[float],
    scope: str = "global",
) -> list[tuple[float, float, T]]:
    """Evaluate ``fn()`` after pruning to each sparsity, restoring the model each time.

    For each ``s`` in ``sparsities``: :func:`prune_` to ``s`` in place, measure the
    global fraction of exact zeros, call ``fn()``, then restore ``x``, ``m``, ``w``,
    the momentum buffers and the optimizer's L1 accumulator bit-exactly — also when
    ``fn`` raises.  Only the reparameterized tensors are saved and restored; whatever
    ``fn`` itself changes (e.g. BatchNorm statistics in train mode) is its business.

    Args:
        model, optimizer, scope: as for :func:`prune_`.
        fn: called with no arguments, e.g. ``lambda: evaluate(model, val_loader)``.
        sparsities: fractions in ``[0, 1]``, e.g. :func:`spred_sparsities()`.

    Returns:
        ``[(s, measured_sparsity, fn_result), ...]``; the measured sparsity can exceed
        ``s`` where entries were already zero.
    """
    sparsities = [_check_sparsity(s) for s in sparsities]
    _check_scope(scope)
    params = [p for _, p in _targets(model, optimizer)]
    saved = []
    for p in params:
        saved.append((p, p.detach().clone()))
        if optimizer is not None:
            state = optimizer.state[p]
            saved.extend((state[k], state[k].clone()) for k in _PRUNED_STATE_KEYS if k in state)
    # PILoT's L1 slots are saved as they are, not recomputed afterwards: a fused backend
    # sums Σ|m·w| in its own order, so a recomputation could differ in the last bits.
    l1 = getattr(optimizer, "_l1", None)
    l1_saved = l1.snapshot() if l1 is not None else None

    results = []
    for s in sparsities:
        try:
            prune_(model, optimizer, s, scope)
            measured = sparsity_report(model, optimizer).sparsity
            results.append((s, measured, fn()))
        finally:
            with torch.no_grad():
                for tensor, copy in saved:
                    tensor.copy_(copy)
            if l1_saved is not None:
                l1.restore(l1_saved)
    return results


# ---------------------------------------------------------------------- explicit L1
@torch.no_grad()
def add_l1_subgradient_(params: Iterable[Tensor], alpha: float) -> None:
    """``p.grad += α·sign(p)`` for every ``p`` with a gradient: a subgradient of ``α‖p‖₁``.

    The explicit-L1 baseline PILoT is compared against (LASSO on the weights, trained with
    plain SGD).  Call it on unscaled gradients (after ``GradScaler.unscale_``), before
    ``optimizer.step()``; ``alpha = 0`` does nothing.
    """
    if alpha == 0:
        return
    params = [p for p in params if p.grad is not None]
    if params:
        torch._foreach_add_([p.grad for p in params], [torch.sign(p) for p in params], alpha=alpha)


def spred_sparsities(cs: Iterable[float] = range(0, 7)) -> list[float]:
    """spred's sweep ``[1 − 10^(−c) for c in cs]``: 0, 0.9, 0.99, …, 0.999999 by default."""
    out = []
    for c in cs:
        if isinstance(c, bool) or not isinstance(c, Real) or not c >= 0:
            raise ValueError(f"every c must be a number >= 0 (sparsity 1 − 10^(−c) in [0, 1)), got {c!r}")
        out.append(1.0 - 10.0 ** (-c))
    return out


@torch.no_grad()
def export_state_dict(
    model: nn.Module,
    optimizer: Optional[Optimizer] = None,
    sparsity: Optional[float] = None,
    threshold: Optional[float] = None,
    scope: str = "global",
) -> "OrderedDict[str, Any]":
    """A plain ``model.state_dict()`` (CPU copies) whose pruned entries are exact zeros.

    The model is not modified.  Pruned entries are chosen among the reparameterized
    tensors either as in :func:`prune_` (``sparsity``, ``scope``) or as the entries
    with ``|x| <= threshold``; with neither, the tensors are copied as they are.  The
    result loads into the unmodified model class with ``load_state_dict(strict=True)``
    (tied parameters are zeroed under every key that refers to them).

    Args:
        model, optimizer, scope: as for :func:`prune_`.
        sparsity: fraction in ``[0, 1]`` to prune by magnitude ranking.
        threshold: prune the entries with ``|x| <= threshold`` instead.

    Raises:
        ValueError: both ``sparsity`` and ``threshold`` given, or a bad value.
    """
    if sparsity is not None and threshold is not None:
        raise ValueError("pass either sparsity (a fraction to prune) or threshold (a magnitude), not both")
    _check_scope(scope)
    targets = _targets(model, optimizer)
    params = [p for _, p in targets]
    if sparsity is not None:
        keeps = _keep_masks(params, _check_sparsity(sparsity), scope)
    elif threshold is not None:
        threshold = _check_threshold(threshold)
        keeps = [~(p.detach().abs() <= threshold) for p in params]
    else:
        keeps = [None] * len(params)
    keep_by_id = {id(p): keep for p, keep in zip(params, keeps)}

    live = model.state_dict(keep_vars=True)
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in live.items():
        if isinstance(value, Tensor):
            copy = value.detach().to("cpu", copy=True)
            keep = keep_by_id.get(id(value))
            if keep is not None:
                copy.masked_fill_(~keep.cpu(), 0)
            value = copy
        out[key] = value
    metadata = getattr(live, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


# ---------------------------------------------------------------------- share measure
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


def _finite_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


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
    :math:`[2^{-64}, 2^{64})`); exact when the entries of that bin are equal.

    Cost: a few elementwise passes over the entries (``abs``, the bin index, a bincount
    and a ``scatter_add_``, tensor by tensor, with about 24 bytes of temporaries per entry
    of the largest tensor), a few ops on the 16,384 bins, and no host sync: the result is
    a 0-dim float64 tensor on the first tensor's device (timings: ``docs/schedules.md``).
    Under FSDP2 (DTensor parameters) each rank bins its local shards and the
    ``2 × 16,384`` histogram (256 KiB) is all-reduced over the shard dims, one collective:
    every rank gets the value a single process gets for the whole tensors (call it on
    every rank).  Under DDP the tensors are replicated and no collective runs.

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
