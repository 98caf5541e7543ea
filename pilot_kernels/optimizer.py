"""The PILoT optimizer: ``x = m ⊙ w`` trained with a time-varying weight decay α_t.

Layout follows ``torch/optim/sgd.py``: the :class:`PILoT` class gathers tensors and
state (``_gather``, torch's ``_init_group``: Dynamo intercepts a method of that name and
runs it eagerly, so ours has another), :func:`pilot` is the functional step, and the
backends in :mod:`pilot_kernels.kernels` do the arithmetic.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _sgd_functional

from .dtensor import DTensor, all_reduce_over_shards_, shard_groups
from .dtensor import local as _local
from .init import split
from .kernels import check_backend_name, get_step_fn, resolve_backend, split_scalar
from .kernels.layout import LayoutGuard

__all__ = ["PILoT", "pilot"]

_REPARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Per-tensor state keys; public as PILoT.FACTOR_KEYS etc. (see the class).
_FACTOR_KEYS = ("m", "w")
_MOMENTUM_KEYS = ("momentum_m", "momentum_w")
_SGD_MOMENTUM_KEY = "momentum_buffer"
# False until a tensor's momentum buffers hold history (SGD's first step: b = d).
_STARTED = "momentum_started"
# Group keys the step reads; a change of any of them re-validates the group.
_HPARAM_KEYS = ("lr", "momentum", "dampening", "nesterov", "alpha", "beta", "weight_decay",
                "maximize", "reparam", "backend", "capturable")

# Readers for the step's gather, applied with map() so the per-tensor loop runs in C
# (see PILoT._gather_unmoved).
_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")    # AttributeError on a None gradient
_VERSION = operator.attrgetter("_version")
_PTR = operator.attrgetter("ptr")
_DATA_PTR = Tensor.data_ptr
_SPLIT_STATE = operator.itemgetter("m", "w", "momentum_m", "momentum_w", _STARTED)
_SPLIT_STATE_NO_MOMENTUM = operator.itemgetter("m", "w")
_SGD_STATE = operator.itemgetter(_SGD_MOMENTUM_KEY, _STARTED)


# ---------------------------------------------------------------------- validation
def _check_value(group: dict, name: str, tensor_values: bool = True) -> None:
    """Raise naming the fix if ``group[name]`` is invalid.  ``lr`` and ``alpha`` may be
    one-element tensors, whose value is read only when ``tensor_values`` (a device
    tensor read is a host sync, which ``step`` avoids)."""
    v = group[name]
    if name in ("nesterov", "maximize", "capturable"):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be True or False, got {v!r}")
    elif name == "reparam":
        if v not in ("auto", True, False) or not isinstance(v, (str, bool)):
            raise ValueError(f"reparam must be 'auto', True or False, got {v!r}")
    elif name == "backend":
        check_backend_name(v)
    else:
        if isinstance(v, Tensor):
            if name not in ("lr", "alpha"):
                raise TypeError(f"{name} must be a number, got a Tensor")
            if v.numel() != 1 or not v.is_floating_point():
                raise ValueError(f"a Tensor {name} must be one floating-point element, got "
                                 f"{v.dtype} of shape {tuple(v.shape)}")
            if not tensor_values:
                return
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"Invalid {name}: {v}; {name} must be a finite number >= 0")
        if v < 0.0:
            raise ValueError(f"Invalid {name}: {v}; {name} must be >= 0")


def _check_hparams(group: dict, tensor_values: bool = True, names: Iterable[str] = _HPARAM_KEYS) -> None:
    """Raise naming the fix for any invalid hyperparameter of ``group`` among ``names``."""
    for name in _HPARAM_KEYS:
        if name not in group:
            raise KeyError(f"param group has no {name!r}; every PILoT group needs {_HPARAM_KEYS}")
    for name in names:
        _check_value(group, name, tensor_values)
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            "Nesterov momentum requires a momentum > 0 and zero dampening; "
            "set momentum > 0 and dampening=0, or nesterov=False"
        )


def _hparam_key(group: dict) -> tuple:
    """The group's hyperparameters as a comparable key.  A tensor enters by identity (the
    key holds it, so its id cannot be reused): comparing it by value would be a sync."""
    return tuple((id(v), v) if isinstance(v, Tensor) else v for v in map(group.__getitem__, _HPARAM_KEYS))


def _structure_key(group: dict) -> tuple:
    """What a group's plan depends on, besides its tensors (see ``PILoT._plan``)."""
    return (group["momentum"] != 0, group["reparam"], group["backend"], group["capturable"])


def _sgd_hparams(group: dict) -> dict:
    """The group's hyperparameters that PILoT shares with torch.optim.SGD."""
    return {k: group[k] for k in ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")}


def _wants_reparam(p: Tensor, reparam: Union[str, bool]) -> bool:
    return p.ndim >= 2 if reparam == "auto" else bool(reparam)


def _check_param(p: Any, reparam: bool) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"optimizer can only optimize Tensors, got {type(p).__name__}")
    if p.is_complex():
        raise TypeError(
            f"PILoT does not support complex parameters (got {p.dtype}); "
            "optimize torch.view_as_real(p) instead"
        )
    if not p.is_floating_point():
        raise TypeError(f"PILoT needs floating-point parameters, got {p.dtype}")
    if reparam and p.dtype not in _REPARAM_DTYPES:
        raise TypeError(
            f"reparameterized tensors must be float32, bfloat16 or float16, got {p.dtype} "
            f"(shape {tuple(p.shape)}); convert the model (e.g. model.float()) or put the "
            "tensor in a group with reparam=False"
        )


def _group_tensors(param_group: dict) -> list:
    """The tensors of a not-yet-added group (named or not), as torch will store them."""
    params = param_group["params"]
    if isinstance(params, Tensor):
        return [params]
    return [p[1] if isinstance(p, tuple) else p for p in params]


def _sparse_error(p: Tensor) -> RuntimeError:
    return RuntimeError(
        f"PILoT does not support sparse gradients (a tensor of shape {tuple(p.shape)} has one), "
        "as torch.optim.SGD(fused=True) does not; use dense gradients "
        "(e.g. nn.Embedding(sparse=False)) or optimize that tensor with torch.optim.SGD"
    )


# ---------------------------------------------------------------------- splitting
def _represents(x: Tensor, m: Tensor, w: Tensor, beta: float) -> bool:
    """Whether the factors ``m, w`` still stand for the value ``x`` holds: in every entry
    either ``m ⊙ w`` rounds to ``x`` (the state a step or a checkpoint left) or ``m, w``
    is exactly ``split(x)`` (the state of a fresh split, whose product may be an ulp off;
    splitting again would change nothing).  One device reduction and host sync."""
    lx, lm, lw = _local(x), _local(m), _local(w)
    if lm.shape != lx.shape:
        return False
    lm, lw = lm.to(lx.device), lw.to(lx.device)
    sm, sw = split(lx, beta)
    return bool(((lm * lw).to(lx.dtype).eq(lx) | (sm.eq(lm) & sw.eq(lw))).all())


# ---------------------------------------------------------------------- step plans
@dataclass(eq=False)
class _Split:
    """One reparameterized tensor of a plan, with the mark of the optimizer's last write
    to it: ``x._version`` and ``x.data_ptr()`` (``x`` is the local shard for DTensors)."""

    p: Tensor
    state: dict
    version: int = -1
    ptr: int = -1


@dataclass(eq=False)
class _Bucket:
    """The reparameterized tensors of one group on one device with one dtype.

    ``params``/``states`` (tuples, fixed with the plan) and ``ptrs`` are what the step's
    gather reads when nothing moved (:meth:`PILoT._gather_unmoved`).  ``versions`` holds
    every tensor's version counter after the bucket's last step if that step updated
    all of them (else None).  It is then newer than the splits' own ``version``
    (``stale``) until :meth:`flush` copies it there: a step that writes one list
    instead of one attribute per tensor.
    """

    device: torch.device
    dtype: torch.dtype
    backend: str
    splits: list = field(default_factory=list)
    workspace: dict = field(default_factory=dict)
    params: tuple = ()
    states: tuple = ()
    ptrs: list = field(default_factory=list)
    versions: Optional[list] = None
    stale: bool = False

    def seal(self) -> None:
        """Fix the tuples once every split is in (the plan is built)."""
        self.params = tuple(s.p for s in self.splits)
        self.states = tuple(s.state for s in self.splits)
        # A split's ptr changes only where the plan is dropped (_set_factors,
        # _adopt_writes), so the marks' addresses are fixed for the plan's life.
        self.ptrs = list(map(_PTR, self.splits))
        # The optimizer checks before every call that no x moved since the last (its
        # write check): the Triton launcher need not compare x's addresses again.
        self.workspace["xs_fixed"] = True

    def flush(self) -> None:
        """Copy ``versions`` into the splits' marks (before anything reads them one by
        one, and before the bucket is dropped: the splits outlive it)."""
        if self.stale:
            for s, v in zip(self.splits, self.versions):
                s.version = v
            self.stale = False


@dataclass(eq=False)
class _GroupPlan:
    """What a group's step needs besides gradients and state values, kept while nothing
    moves: its hyperparameters checked, tensors classified and bucketed, backends chosen."""

    params: list
    n: int
    hkey: tuple    # _hparam_key when last checked
    skey: tuple    # _structure_key the plan was built for
    dense: list    # (p, state) of the tensors SGD updates
    buckets: list

    def __post_init__(self) -> None:
        self.dense_params = [p for p, _ in self.dense]
        self.dense_states = [s for _, s in self.dense]
        self._dense_guard: Optional[LayoutGuard] = None
        self._dense_one_group = False

    def dense_one_group(self) -> bool:
        """Whether the unsplit tensors share one device and one dtype, as torch's
        multi-tensor SGD groups them (a ``.data`` swap may change either at any time:
        a guard over their layouts, 5 µs for ResNet-50's 107, says whether to look
        again)."""
        params = self.dense_params
        if self._dense_guard is None or not self._dense_guard.check(params):
            self._dense_guard = LayoutGuard(params)
            self._dense_one_group = len({(p.device, p.dtype) for p in params}) == 1
        return self._dense_one_group

    def flush(self) -> None:
        for bucket in self.buckets:
            bucket.flush()


class PILoT(Optimizer):
    r"""PILoT: sparsifying SGD on ``x = m ⊙ w`` with a time-varying weight decay α_t.

    A drop-in replacement for :class:`torch.optim.SGD` implementing PILoT (Jacobs &
    Burkholz, *Mask in the Mirror*, ICLR 2025, §3).  The model keeps its ordinary
    parameters ``x``; for every *reparameterized* tensor the optimizer holds fp32
    factors ``m, w`` and their momentum buffers and trains them on
    :math:`f(m ⊙ w) + α_t (‖m‖² + ‖w‖²)`, writing ``x ← m ⊙ w`` after each step.  A
    decaying α_t moves the implicit bias from L2 (dense) to L1 (sparse) (paper §2).
    With ``β = 0`` and a constant α this is spred.

    **Init** (paper §3): a tensor's value ``x`` is split into ``m > 0`` and ``w`` with
    ``m ⊙ w = x`` and ``m² − w² = β``:
    :math:`m = \sqrt{(β + \sqrt{β² + 4x²})/2}`, ``w = x / m``.  ``β > 0`` keeps ``m``
    away from zero so ``x`` can change sign; ``β = 0`` is spred's balanced split, under
    which it cannot.  The parameter itself is not written: ``m ⊙ w`` rounds back to it
    within an fp32 ulp (exactly for bf16/fp16), and the first step writes ``m ⊙ w``.

    **Step**, elementwise in fp32, for a reparameterized tensor:

    .. math::
        \begin{aligned}
        g &\leftarrow \nabla_x f \,/\, \text{grad\_scale}, \qquad g \leftarrow -g \text{ if maximize} \\
        g &\leftarrow g + λ\, m w                                  && \text{(weight\_decay: L2 on } x) \\
        d_m &= g\, w + 2α\, m, \qquad d_w = g\, m + 2α\, w         && \text{(old } m, w) \\
        b &\leftarrow d \text{ (first step)}, \quad b \leftarrow μ b + (1-τ) d   && \text{(momentum, as SGD)} \\
        d &\leftarrow d + μ b \text{ if nesterov else } b \\
        m &\leftarrow m - η\, d_m, \qquad w \leftarrow w - η\, d_w \\
        x &\leftarrow m w, \qquad \ell_1 \mathrel{+}= \textstyle\sum |m w|
        \end{aligned}

    Tensors that are not reparameterized (by default those with ``ndim < 2``: biases,
    norms) follow :class:`torch.optim.SGD` bit for bit, with its ``momentum_buffer``
    state key: its multi-tensor (``foreach=True``) path, or under AMP or ``capturable``
    ``SGD(fused=True)``'s kernel.  (In bfloat16 on the CPU, torch 2.14's foreach and
    per-tensor SGD paths round differently; PILoT matches the foreach one.)

    Decisions where the paper is silent:

    * **Momentum** is SGD's (heavy ball, dampening τ, Nesterov) applied to ``m`` and
      ``w`` separately; weight decay λ is plain L2 on ``x = m ⊙ w``.
    * **The parameters are the truth.**  Anything written into a reparameterized
      parameter outside :meth:`step` (``load_state_dict``, ``copy_``, ``.data =``,
      ``nn.init``, pruning, a DDP broadcast, ``model.half()``) is kept: each step first
      compares each tensor's version counter and address with those recorded after the
      optimizer's own last write (no device work).  On a change, a tensor whose
      factors still stand for its value (in every entry ``m ⊙ w`` rounds to it, or
      ``m, w`` is exactly its split) keeps its factors and momentum: a resume that
      loads model and optimizer in any order stays exact.  Any other is split again
      from its new value with the group's β and starts its momentum afresh, as a
      tensor added now would (its old velocity belongs to factors that no longer
      exist).  That comparison is one device reduction and host sync per changed
      tensor, and happens only when something was written.  A write that moves a
      tensor to float64 raises.
    * :meth:`load_state_dict` loads ``m``, ``w`` and momenta and never writes the
      model; the rule above reconciles the two at the next step.
    * AMP: a step that ``found_inf`` skips leaves every buffer as it was; a tensor's
      momentum counts as started afterwards, because telling which step was skipped
      would need a sync.  Buffers are allocated as zeros, so the next step computes
      ``b = μ·0 + (1−τ) d``, SGD's ``b = d`` whenever τ = 0.

    Args:
        params: parameters, named parameters or param groups, as for any optimizer.
        lr (float or Tensor): learning rate η.
        momentum (float): μ (default 0.9).
        dampening (float): τ (default 0).
        nesterov (bool): Nesterov momentum (default False).
        alpha (float or Tensor): the decay α on ``‖m‖² + ‖w‖²`` (default 0).  May change
            between any two steps (schedules in :mod:`pilot_kernels.schedules` do this).
        beta (float): the split ``m² − w² = β`` used when a tensor is (re-)split
            (default 1, the paper's PILoT; 0 gives spred).
        weight_decay (float): λ; plain L2 on ``x`` (on ``m ⊙ w`` for reparameterized
            tensors, on ``x`` for the others, as SGD).
        maximize (bool): maximize instead of minimize.
        reparam ("auto" | bool): which tensors of a group are reparameterized, decided
            when a tensor is added; ``"auto"`` takes those with ``ndim >= 2``.
        backend ("auto" | "reference" | "triton" | "cuda" | "cpu"): ``auto`` takes the
            fused Triton kernel for CUDA tensors and the fused C++ one for CPU tensors;
            the environment variable ``PILOT_BACKEND`` overrides ``auto``.  Resolved
            when a group's step plan is built, not at every step.
        capturable (bool): keep ``lr`` and ``alpha`` in device tensors and make
            ``step()`` free of host syncs, so a whole training step can be captured in
            a CUDA graph.  Change them in place between replays
            (``group["lr"].fill_(0.01)``; torch's lr schedulers and ours do this).  A
            replayed graph runs no host code, so writes to parameters between replays
            are not seen: after one, step once outside the graph and capture again.
        fused_unscale (bool): let ``torch.amp.GradScaler`` pass its scale and inf flag
            to :meth:`step`, to unscale inside the step without a host sync (default
            True); False leaves unscaling to the scaler (see AMP below).  Sets the
            instance's ``_step_supports_amp_scaling``, the attribute torch's GradScaler
            and PyTorch Lightning read.

    Hyperparameters are checked when set: here, in :meth:`add_param_group` and
    :meth:`load_state_dict`, and at a step whenever a group's value changed since the
    last check (a schedule writing NaN raises before anything moves).

    State of a reparameterized tensor ``p`` (keys in :attr:`STATE_KEYS`):
    ``state[p]["m"]``, ``state[p]["w"]`` and, when the group has momentum,
    ``state[p]["momentum_m"]``, ``state[p]["momentum_w"]``; all fp32 and shaped like
    ``p`` (DTensors like ``p`` under FSDP2).  Other tensors hold SGD's
    ``momentum_buffer``.  Buffers are allocated (as zeros) when a tensor is added, so a
    checkpoint template is complete before the first step;
    ``state[p]["momentum_started"]`` records whether they hold history yet.

    Distributed: under DDP nothing changes (building DDP after the optimizer is fine:
    its broadcast is a write, see above).  Under FSDP2 (DTensor parameters) every rank
    updates its local shard and :meth:`l1_norm` all-reduces over the shards.

    AMP (``torch.amp.GradScaler``): with ``fused_unscale=True`` the scaler hands
    ``grad_scale``/``found_inf`` to :meth:`step`, which unscales the gradients inside
    the fused pass; a step with inf/NaN gradients changes nothing, and nothing is read
    on the host.  ``scaler.unscale_(opt)`` before ``scaler.step(opt)`` (to clip the
    unscaled gradients) is honoured: the step then only checks ``found_inf``.
    ``fused_unscale=False`` makes the optimizer an ordinary one for the scaler, which
    unscales the gradients itself and skips ``step()`` on inf/NaN (one host sync per
    step); frameworks that clip only such optimizers need it (PyTorch Lightning's
    mixed-precision plugin refuses to clip otherwise).

    Sparse gradients are refused, as by ``torch.optim.SGD(fused=True)``.

    Example::

        >>> opt = PILoT(model.parameters(), lr=0.1, momentum=0.9, alpha=1e-5)
        >>> loss_fn(model(x), y).backward()
        >>> opt.step(); opt.zero_grad()
        >>> opt.l1_norm()   # Σ|m ⊙ w| as of the last step, on the device
    """

    #: State keys of a reparameterized tensor's fp32 factors.
    FACTOR_KEYS: tuple[str, ...] = _FACTOR_KEYS
    #: State keys of momentum buffers: a split tensor's two, a plain tensor's SGD one.
    MOMENTUM_KEYS: tuple[str, ...] = _MOMENTUM_KEYS + (_SGD_MOMENTUM_KEY,)
    #: State key of the flag "the momentum buffers hold history" (False: next step b = d).
    STARTED_KEY: str = _STARTED
    #: Every per-tensor state key PILoT writes.
    STATE_KEYS: tuple[str, ...] = FACTOR_KEYS + MOMENTUM_KEYS + (STARTED_KEY,)

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor],
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        alpha: Union[float, Tensor] = 0.0,
        beta: float = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        reparam: Union[str, bool] = "auto",
        backend: str = "auto",
        capturable: bool = False,
        fused_unscale: bool = True,
    ) -> None:
        if not isinstance(fused_unscale, bool):
            raise TypeError(f"fused_unscale must be True or False, got {fused_unscale!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            alpha=alpha,
            beta=beta,
            weight_decay=weight_decay,
            maximize=maximize,
            reparam=reparam,
            backend=backend,
            capturable=capturable,
        )
        _check_hparams(defaults)
        # Check every group before the first is added (and its tensors are split), so
        # bad input anywhere changes nothing.
        params = [params] if isinstance(params, Tensor) else list(params)
        if params and isinstance(params[0], dict):
            for g in params:
                if not isinstance(g, dict):
                    raise TypeError(f"param groups must be dicts, got {type(g).__name__}")
                if not isinstance(g.get("params"), (Tensor, set, type(None))):
                    g["params"] = list(g["params"])  # a generator would be used up here
                self._check_new_group({**defaults, **g})
        else:
            self._check_new_group({**defaults, "params": params})
        self._l1: dict[torch.device, Tensor] = {}
        self._l1_latest: dict[torch.device, int] = {}
        self._derive_private()
        # Per instance, not per class: GradScaler and Lightning read it from the object.
        self._step_supports_amp_scaling = fused_unscale
        super().__init__(params, defaults)

    def _derive_private(self) -> None:
        """The private attributes that follow from param_groups and state.

        ``_l1``/``_l1_latest``: ``Σ|m ⊙ w|`` lives in two device slots per device; each
        step adds into one and zeroes the other, so the fused kernel needs no extra
        launch to clear it (capturable groups zero and fill one slot: a replayed graph
        cannot flip a host-side index).  They are kept, not derived.
        """
        # Step plans per group index (see _plan), dropped whenever what they hold may move,
        # and the state dict they were built from (load_state_dict replaces it).
        self._plans: dict[int, _GroupPlan] = {}
        self._plans_state: Any = None
        # Views of each device's two L1 slots (_l1_slot_views).
        self._l1_views: dict[torch.device, tuple] = {}
        # Per split tensor (by id; the entry holds the tensor, so the id stays unique) the
        # mark of the optimizer's last write.  A tensor without one is compared with
        # m ⊙ w at its next step.
        self._splits: dict[int, _Split] = {}
        params = [p for g in getattr(self, "param_groups", []) for p in g["params"]]
        # Whether any parameter is a DTensor: steps then work on local shards.  Asked
        # when tensors are added, not per tensor per step.
        self._sharded = any(isinstance(p, DTensor) for p in params)
        # Shard dims to all-reduce the local L1 over, when parameters are DTensors.
        self._l1_groups: list = shard_groups(params) if self._sharded else []

    # ------------------------------------------------------------------ pickling
    # torch.optim.Optimizer pickles only defaults, state and param_groups; ours adds the
    # AMP choice and the L1 slots, and re-derives the rest (process groups and kernel
    # plans cannot, or must not, travel).  Write marks are not kept: the first step of
    # a copy compares its parameters with m ⊙ w once.
    _PICKLED = ("_step_supports_amp_scaling", "_l1", "_l1_latest")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_step_supports_amp_scaling", True)
        self.__dict__.setdefault("_l1", {})
        self.__dict__.setdefault("_l1_latest", {d: 0 for d in self._l1})
        self._derive_private()

    # ------------------------------------------------------------------ groups
    def _check_new_group(self, group: dict) -> None:
        _check_hparams(group)
        for p in _group_tensors(group):
            _check_param(p, isinstance(p, Tensor) and _wants_reparam(p, group["reparam"]))

    @torch.no_grad()
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its reparameterized tensors are split into ``m, w`` now (the
        parameters are not written).  Invalid input raises before anything changes."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if not isinstance(param_group.get("params"), (Tensor, set, type(None))):
            param_group["params"] = list(param_group["params"])
        merged = {**self.defaults, **param_group}
        self._check_new_group(merged)
        # Split before the group is added, so a failure leaves the optimizer as it was.
        factors = {id(p): split(p, merged["beta"]) for p in _group_tensors(param_group)
                   if _wants_reparam(p, merged["reparam"])}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["capturable"]:
            self._hparams_to_device(group)
        if not self._sharded and any(isinstance(p, DTensor) for p in group["params"]):
            self._sharded = True
            self._l1_groups = shard_groups(group["params"])
        for p in group["params"]:
            state = self.state[p]
            if id(p) in factors:
                self._set_factors(p, state, *factors[id(p)])
                self._add_to_l1(p, state)
            if group["momentum"] != 0:
                self._init_momentum(p, state)
        self._drop_plans()

    def _set_factors(self, p: Tensor, state: dict, m: Tensor, w: Tensor) -> None:
        """Make ``m, w = split(p)`` the tensor's factors and take ``p`` as it is now.

        ``p`` is not written: ``m ⊙ w`` rounds back to it within an fp32 ulp, and the
        next step writes ``m ⊙ w``.  Leaving it keeps every rank's split of the same
        value identical (DDP broadcasts after the optimizer is built), and keeps a
        model loaded before the optimizer was built equal to the checkpoint's ``m ⊙ w``.
        """
        state["m"], state["w"] = m, w
        x = _local(p)
        s = self._splits.get(id(p))
        if s is None:
            s = self._splits[id(p)] = _Split(p, state)
        s.state, s.version, s.ptr = state, x._version, x.data_ptr()

    def _hparams_to_device(self, group: dict) -> None:
        """Capturable groups keep lr and alpha as fp32 device tensors (updated in place)."""
        device = _local(group["params"][0]).device if group["params"] else torch.device("cpu")
        for name in ("lr", "alpha"):
            v = group[name]
            if not isinstance(v, Tensor) or v.device != device:
                group[name] = torch.as_tensor(v, dtype=torch.float32).to(device).reshape(())

    def _init_momentum(self, p: Tensor, state: dict) -> None:
        """Zero momentum buffers (SGD's for plain tensors), not started yet."""
        if self.is_reparameterized(state):
            state["momentum_m"] = torch.zeros_like(state["m"])
            state["momentum_w"] = torch.zeros_like(state["w"])
        else:
            state[_SGD_MOMENTUM_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state[_STARTED] = False

    def _l1_slot_views(self, device: torch.device) -> tuple:
        """The two L1 slots of ``device`` as views, made once (indexing a tensor costs
        ~1.6 µs on the host, twice per bucket per step)."""
        buf = self._l1[device]
        views = self._l1_views.get(device)
        if views is None or views[2] is not buf:
            views = self._l1_views[device] = (buf[0], buf[1], buf)
        return views

    def _l1_slots(self, device: torch.device) -> Tensor:
        if device not in self._l1:
            self._l1[device] = torch.zeros(2, dtype=torch.float32, device=device)
            self._l1_latest[device] = 0
        return self._l1[device]

    def _add_to_l1(self, p: Tensor, state: dict) -> None:
        """Add ``Σ|m ⊙ w|`` of one tensor's local shard to its device's latest L1 slot."""
        device = _local(p).device
        slots = self._l1_slots(device)
        slots[self._l1_latest[device]] += (_local(state["m"]) * _local(state["w"])).abs().sum()

    @staticmethod
    def is_reparameterized(state: dict) -> bool:
        """Whether a tensor's state holds PILoT factors ``m, w``."""
        return "m" in state

    # ------------------------------------------------------------------ L1
    def l1_norm(self) -> Tensor:
        """``Σ|m ⊙ w|`` over the reparameterized tensors, as of the last step.

        Accumulated inside the step itself (no extra pass over memory) and returned as
        a 0-dim fp32 tensor on the parameters' device, without a host sync.  Before the
        first step it is the norm of the initial split.  Tensors without a gradient in
        the last step do not contribute to it.  With FSDP2 (DTensor parameters) the
        local sums are all-reduced over the shards, so every rank gets the same value:
        call it on every rank.
        """
        if not self._l1:
            return torch.zeros((), dtype=torch.float32)
        norms = [buf[self._l1_latest[d]].clone() for d, buf in self._l1.items()]
        total = norms[0]
        for n in norms[1:]:
            total = total + n.to(total.device, non_blocking=True)
        return all_reduce_over_shards_(total, self._l1_groups)

    @torch.no_grad()
    def refresh_l1_(self) -> None:
        """Recompute :meth:`l1_norm` from the current ``m, w``; call it after editing the
        factors outside a step (pruning and loading do)."""
        for device, buf in self._l1.items():
            buf.zero_()
            self._l1_latest[device] = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if self.is_reparameterized(state):
                    self._add_to_l1(p, state)

    def _drop_plans(self, gi: Optional[int] = None) -> None:
        """Drop group ``gi``'s plan (every plan when None); the write marks its buckets
        hold go back to the splits, which outlive it."""
        for i in [gi] if gi is not None else list(self._plans):
            plan = self._plans.pop(i, None)
            if plan is not None:
                plan.flush()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)

        # Gather every group first: every check runs before any tensor changes.
        gathered = [self._gather(gi, group) for gi, group in enumerate(self.param_groups)]
        written = [(gi, s) for gi, g in enumerate(gathered) for s in g[2]]
        if written:  # parameters were written since our last step (rare; see _adopt_writes)
            self._adopt_writes(written)
            gathered = [self._gather(gi, group) for gi, group in enumerate(self.param_groups)]

        # Capturable optimizers zero one L1 slot per device and fill it (_derive_private).
        single_slot = any(g["capturable"] for g in self.param_groups)
        stepped: set[torch.device] = set()
        for group, (dense, buckets, _) in zip(self.param_groups, gathered):
            if dense[0]:
                self._sgd_step(group, *dense, grad_scale, found_inf)
            for bucket, splits, args in buckets:
                slots, latest = self._l1_slot_views(bucket.device), self._l1_latest[bucket.device]
                if single_slot:
                    accum, clear = slots[latest], None
                    if bucket.device not in stepped:
                        accum.zero_()
                else:
                    accum, clear = slots[1 - latest], slots[latest]
                pilot(
                    *args,
                    **_sgd_hparams(group),
                    alpha=group["alpha"],
                    backend=bucket.backend,
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                    l1_accum=accum,
                    l1_clear=clear,
                    workspace=bucket.workspace,
                )
                stepped.add(bucket.device)
                self._mark_written(bucket, splits, args[0], args[6], group["momentum"] != 0)
        if not single_slot:
            for device in stepped:
                self._l1_latest[device] = 1 - self._l1_latest[device]
        return loss

    def _plan(self, gi: int, group: dict) -> _GroupPlan:
        """The group's plan, rebuilt only when its tensor list, its structure (momentum
        on/off, reparam, backend, capturable) or the state dict changed.  A changed
        hyperparameter value is checked once (a schedule writing NaN raises here)."""
        plan = self._plans.get(gi)
        hkey = _hparam_key(group)
        if plan is not None and plan.hkey != hkey:
            changed = [n for n, a, b in zip(_HPARAM_KEYS, plan.hkey, hkey) if a != b]
            _check_hparams(group, tensor_values=False, names=changed)
            if group["capturable"]:
                self._hparams_to_device(group)
                hkey = _hparam_key(group)
            if plan.skey == _structure_key(group):
                plan.hkey = hkey
        if (plan is not None and plan.params is group["params"] and plan.n == len(plan.params)
                and plan.hkey == hkey and self._plans_state is self.state):
            return plan
        if plan is None:
            _check_hparams(group, tensor_values=False)
            if group["capturable"]:
                self._hparams_to_device(group)
        if self._plans_state is not self.state:
            self._drop_plans()
            self._plans_state = self.state
        elif plan is not None:
            plan.flush()
        plan = self._build_plan(group)
        if not torch.compiler.is_compiling():
            self._plans[gi] = plan
        return plan

    def _build_plan(self, group: dict) -> _GroupPlan:
        compiling = torch.compiler.is_compiling()
        momentum = group["momentum"] != 0
        dense, buckets = [], {}
        for p in group["params"]:
            state = self.state[p]
            if momentum and _STARTED not in state:  # momentum switched on later
                self._init_momentum(p, state)
            if not self.is_reparameterized(state):
                dense.append((p, state))
                continue
            x = _local(p)
            bucket = buckets.get((x.device, x.dtype))
            if bucket is None:
                backend = group["backend"]
                if not compiling:  # resolved here, once per plan, not per step
                    backend = resolve_backend(backend, x.device)
                    self._l1_slots(x.device)
                bucket = buckets[(x.device, x.dtype)] = _Bucket(x.device, x.dtype, backend)
            s = None if compiling else self._splits.get(id(p))
            if s is None:
                s = _Split(p, state)
                if not compiling:
                    self._splits[id(p)] = s
            s.state = state
            bucket.splits.append(s)
        if not compiling:
            for bucket in buckets.values():
                bucket.seal()
        return _GroupPlan(group["params"], len(group["params"]), _hparam_key(group),
                          _structure_key(group), dense, list(buckets.values()))

    def _gather(self, gi: int, group: dict) -> tuple:
        """Gather the tensors of ``group`` that have a gradient, changing nothing.

        Returns SGD's lists for the plain tensors, ``(bucket, splits, pilot() args)`` per
        bucket of split tensors, and the split tensors written since the optimizer's own
        last write (their version counter or address moved; not asked under
        ``torch.compile``), which are left out of the buckets.
        """
        compiling = torch.compiler.is_compiling()
        plan = self._plan(gi, group)
        momentum = group["momentum"] != 0
        if not compiling and not self._sharded:
            gathered = self._gather_unmoved(plan, momentum)
            if gathered is not None:
                return gathered
        params, grads, bufs, firsts = [], [], [], []
        for p, state in plan.dense:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise _sparse_error(p)
            params.append(p)
            grads.append(g)
            if momentum:
                bufs.append(state[_SGD_MOMENTUM_KEY])
                firsts.append(not state[_STARTED])
        one_group = bool(params) and not compiling and not self._sharded and plan.dense_one_group()
        sharded = self._sharded
        written, buckets = [], []
        for bucket in plan.buckets:
            bucket.flush()  # the marks are read one by one below
            splits, xs, gs, ms, ws, bms, bws, fs = [], [], [], [], [], [], [], []
            for s in bucket.splits:
                p = s.p
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise _sparse_error(p)
                x = _local(p) if sharded else p
                # The write check: with the version re-read in _mark_written, 31 µs per
                # step for ResNet-50's 54 split tensors on a shared 2-core CPU under load
                # (timeit, no kernel); torch.optim.SGD(fused=True)'s whole step costs
                # ~160 µs there.  A .data swap to a view of the same memory at the same
                # address (p.data = p.data.t()) moves neither and goes unseen.
                if not compiling and (x._version != s.version or x.data_ptr() != s.ptr):
                    written.append(s)
                    continue
                state = s.state
                splits.append(s)
                xs.append(x)
                gs.append(_local(g) if sharded else g)
                ms.append(_local(state["m"]) if sharded else state["m"])
                ws.append(_local(state["w"]) if sharded else state["w"])
                if momentum:
                    bms.append(_local(state["momentum_m"]) if sharded else state["momentum_m"])
                    bws.append(_local(state["momentum_w"]) if sharded else state["momentum_w"])
                    fs.append(not state[_STARTED])
                else:
                    fs.append(True)
            if xs:
                buckets.append((bucket, splits, (xs, gs, ms, ws, bms or None, bws or None, fs)))
        return (params, grads, bufs, firsts, one_group), buckets, written

    def _gather_unmoved(self, plan: _GroupPlan, momentum: bool) -> Optional[tuple]:
        """``_gather``'s result when nothing it checks has moved, else None (the caller
        then gathers tensor by tensor and finds what did).

        Nothing moved: every tensor of the group has a dense gradient and every split
        tensor still has the version counter and address of the optimizer's last write
        to it (the same write check, on whole lists).  The plan's tuples are read with
        ``map`` (the per-tensor loop runs in C), and the state values are read afresh:
        the step sees a replaced buffer or a reset momentum flag as before.  For
        ResNet-50's 161 tensors: 75 µs tensor by tensor, 51 µs so (min of 40
        interleaved rounds of 200 calls, the shared 2-core machine under load).
        Unsplit tensors without a gradient are left out here too; a split tensor
        without one sends the group to the per-tensor path, which leaves it out and
        keeps its own write mark.
        """
        params = plan.dense_params
        dense: tuple = ([], [], [], [], False)
        if params:
            grads = list(map(_GRAD, params))
            states = plan.dense_states
            try:
                if any(map(_IS_SPARSE, grads)):
                    return None  # the per-tensor path raises the error
            except AttributeError:  # a gradient is None: leave its tensor out
                has = list(map(operator.is_not, grads, repeat(None)))
                params = list(compress(params, has))
                grads = list(compress(grads, has))
                states = list(compress(states, has))
                if any(map(_IS_SPARSE, grads)):
                    return None
            if momentum:
                try:
                    cols = list(zip(*map(_SGD_STATE, states)))
                except KeyError:
                    return None
                if cols:
                    firsts = [False] * len(params) if all(cols[1]) else list(map(operator.not_, cols[1]))
                    dense = (params, grads, list(cols[0]), firsts, plan.dense_one_group())
            else:
                dense = (params, grads, [], [], plan.dense_one_group())
        buckets = []
        for bucket in plan.buckets:
            ps = bucket.params
            if bucket.versions is None:  # the last step left some tensor out
                return None
            grads = list(map(_GRAD, ps))
            try:
                if any(map(_IS_SPARSE, grads)):
                    return None
            except AttributeError:
                return None
            if list(map(_VERSION, ps)) != bucket.versions or list(map(_DATA_PTR, ps)) != bucket.ptrs:
                return None  # written since our last step
            try:
                cols = list(zip(*map(_SPLIT_STATE if momentum else _SPLIT_STATE_NO_MOMENTUM, bucket.states)))
            except KeyError:
                return None
            if momentum:
                firsts = [False] * len(ps) if all(cols[4]) else list(map(operator.not_, cols[4]))
                args = (ps, grads, list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), firsts)
            else:
                args = (ps, grads, list(cols[0]), list(cols[1]), None, None, [True] * len(ps))
            buckets.append((bucket, bucket.splits, args))
        return dense, buckets, []

    def _mark_written(self, bucket: _Bucket, splits: list, xs: Any, firsts: list, momentum: bool) -> None:
        """After a bucket's step: its momentum has started, and the versions after the
        write are the new marks (a backend may or may not bump them)."""
        if momentum and any(firsts):
            for s, first in zip(splits, firsts):
                if first:
                    s.state[_STARTED] = True
        if torch.compiler.is_compiling():
            return
        versions = list(map(_VERSION, xs))
        if len(splits) == len(bucket.splits):  # every tensor stepped: one list
            bucket.versions, bucket.stale = versions, True
        else:
            for s, v in zip(splits, versions):
                s.version = v
            bucket.versions, bucket.stale = None, False

    # ------------------------------------------------------------------ writes
    @torch.no_grad()
    def _adopt_writes(self, written: list) -> None:
        """Take over the values written into split tensors since our last write.

        A tensor that still holds ``m ⊙ w`` exactly keeps its factors and momentum (it
        follows a device move); any other is split again from its value with the group's
        β and starts its momentum afresh.  One device comparison (a host sync) per
        tensor that was written; every check runs before any change.
        """
        for _, s in written:
            x = _local(s.p)
            if x.dtype not in _REPARAM_DTYPES:
                raise TypeError(
                    f"a reparameterized parameter of shape {tuple(x.shape)} is now {x.dtype} "
                    "(model.double()?); PILoT splits float32, bfloat16 or float16 tensors: "
                    "convert the model back (e.g. model.float()), or build the optimizer "
                    "with reparam=False for it"
                )
            if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "a parameter was written since PILoT's last step and cannot be adopted "
                    "while a CUDA graph is being captured; run one step outside the graph "
                    "after writing parameters, then capture"
                )
        for gi, s in written:
            group, p, state = self.param_groups[gi], s.p, s.state
            x = _local(p)
            if _represents(p, state["m"], state["w"], group["beta"]):
                if _local(state["m"]).device != x.device:  # a device move: the state follows
                    for k in _FACTOR_KEYS + _MOMENTUM_KEYS:
                        if k in state:
                            state[k] = state[k].to(x.device)
                s.version, s.ptr = x._version, x.data_ptr()
            else:
                self._set_factors(p, state, *split(p, group["beta"]))
                if group["momentum"] != 0:
                    self._init_momentum(p, state)
            # The plan (and with it the fused backends' launch plans, which hold the old
            # factors' addresses) is rebuilt.
            self._drop_plans(gi)

    def _sgd_step(self, group, params, grads, bufs, firsts, one_group, grad_scale, found_inf) -> None:
        """torch.optim.SGD's own step for the tensors that are not split.

        ``bufs`` are the zero-allocated momentum buffers (empty without momentum),
        ``firsts`` whether each holds no history yet, ``one_group`` whether ``params``
        share one device and dtype.  Without AMP and capturable mode this is
        ``torch.optim.sgd.sgd`` itself, bit for bit: a first step passes ``None`` and SGD
        returns ``b = g`` in a new buffer; a later eager step of one group makes SGD's
        foreach calls directly (:func:`_foreach_sgd`).  With a ``found_inf`` (AMP) or device
        hyperparameters (capturable) it is torch's fused SGD kernel, but always on our
        own buffers: torch's fused path would allocate ``empty_like`` buffers for a
        first step and leave them uninitialised when ``found_inf`` skips it.
        """
        momentum = group["momentum"] != 0
        compiling = torch.compiler.is_compiling()
        if grad_scale is not None or found_inf is not None or (group["capturable"] and not compiling):
            _fused_sgd_on_buffers(params, grads, bufs, firsts, group, grad_scale, found_inf)
        elif (one_group and not compiling and not any(firsts)
              and not isinstance(group["lr"], Tensor)):
            _foreach_sgd(params, grads, bufs, **_sgd_hparams(group))
        else:
            started = not any(firsts)  # every later step: no per-tensor list to build
            if momentum:
                sgd_bufs = list(bufs) if started else [None if first else b for b, first in zip(bufs, firsts)]
            else:
                sgd_bufs = [None] * len(params)
            # torch's fused SGD is opaque to Dynamo (a graph break), and Dynamo reports
            # every group as capturable: the single-tensor loop compiles instead.
            # Eager steps take the foreach path on every device: torch's default picks it
            # on CUDA only, and on CPU its per-tensor Python loop cost ~0.4 µs × 3 ops per
            # tensor (2,000 small tensors: most of a step).  Same ops in the same order,
            # so the results are SGD's bit for bit (in bfloat16 on the CPU, torch 2.14's
            # own foreach and per-tensor paths round differently; these are its foreach
            # path's).
            _sgd_functional(
                params,
                grads,
                sgd_bufs,
                foreach=not compiling,
                fused=False if compiling else None,
                **_sgd_hparams(group),
            )
            if momentum and not started:  # SGD made new buffers for first steps
                for p, buf, first in zip(params, sgd_bufs, firsts):
                    if first:
                        self.state[p][_SGD_MOMENTUM_KEY] = buf
        if momentum and any(firsts):
            for p, first in zip(params, firsts):
                if first:
                    self.state[p][_STARTED] = True

    # ------------------------------------------------------------------ state_dict
    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`.

        ``m``, ``w`` and their momentum buffers stay fp32 whatever the parameters'
        dtype (``torch.optim.Optimizer`` would cast them to it).  The model's
        parameters are never written: at the next step a tensor that equals the loaded
        ``m ⊙ w`` (the model was loaded from the same checkpoint, before or after)
        keeps the loaded state, any other is split again from its own value.

        Load pre-hooks see, and may replace, the whole state dict (factors included);
        post-hooks see the loaded state.  Group keys missing from an older checkpoint
        take this optimizer's defaults.  A state dict that does not fit raises a
        ValueError and leaves the optimizer as it was.
        """
        state_dict = dict(state_dict)  # shallow copy, as torch does
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, groups = self._loaded(state_dict)
        # Nothing has changed so far; commit.
        self.state, self.param_groups = state, groups
        self._derive_private()
        self.refresh_l1_()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _loaded(self, state_dict: dict[str, Any]) -> tuple:
        """The state and param groups ``state_dict`` describes, built without touching
        the optimizer; raises a ValueError naming the mismatch."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("an optimizer state_dict is a dict with 'state' and 'param_groups'; "
                             "pass the dict opt.state_dict() returned")
        groups, saved_groups = self.param_groups, deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups but the optimizer has "
                f"{len(groups)}; build the optimizer with the same groups as the saved one"
            )
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if not isinstance(sg, dict) or "params" not in sg:
                raise ValueError(f"param group {i} of the state_dict has no 'params'")
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {i} has {len(g['params'])} tensors but the state_dict's has "
                    f"{len(sg['params'])}; the model or its grouping differs from the saved one"
                )
        id_map = {pid: p for g, sg in zip(groups, saved_groups) for pid, p in zip(sg["params"], g["params"])}
        new_groups = []
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            new = {**self.defaults, **sg, "params": g["params"]}  # missing keys: our defaults
            if "param_names" in g and "param_names" not in sg:
                new["param_names"] = g["param_names"]
            try:
                _check_hparams(new)
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"param group {i} of the state_dict is invalid: {e}") from e
            new_groups.append(new)

        state: defaultdict = defaultdict(dict)
        for key, saved in state_dict["state"].items():
            if key in id_map:
                p = id_map[key]
                state[p] = self._loaded_tensor_state(key, p, saved, state_dict["param_groups"])
            elif isinstance(key, int):
                raise ValueError(
                    f"state_dict has state for tensor id {key}, which none of its param "
                    "groups lists; the state_dict is damaged or from another optimizer"
                )
            else:
                state[key] = saved  # not a parameter's state: kept as is, as torch does
        for new in new_groups:
            for p in new["params"]:
                if p not in state:
                    if self.is_reparameterized(self.state.get(p, {})):
                        raise ValueError(
                            f"state_dict has no state for a reparameterized tensor of shape "
                            f"{tuple(p.shape)}; it needs at least 'm' and 'w'"
                        )
                    state[p] = {}
                if new["momentum"] != 0 and _STARTED not in state[p]:
                    self._init_momentum(p, state[p])  # as when a tensor is added
            if new["capturable"]:
                self._hparams_to_device(new)
        return state, new_groups

    def _loaded_tensor_state(self, pid: Any, p: Tensor, saved: Any, saved_groups: list) -> dict:
        if not isinstance(saved, dict):
            raise ValueError(f"state of tensor {pid} must be a dict, got {type(saved).__name__}")
        ours_now = self.is_reparameterized(self.state.get(p, {}))
        theirs = "m" in saved
        if ours_now != theirs:
            raise ValueError(
                f"tensor {pid} (shape {tuple(p.shape)}) is "
                f"{'' if theirs else 'not '}reparameterized in the state_dict but "
                f"{'' if ours_now else 'not '}in this optimizer; use the same reparam setting"
            )
        if theirs and "w" not in saved:
            raise ValueError(f"state_dict entry of tensor {pid} has 'm' but no 'w'")
        if theirs and ("momentum_m" in saved) != ("momentum_w" in saved):
            raise ValueError(f"state_dict entry of tensor {pid} has only one of 'momentum_m' and 'momentum_w'")
        out = {}
        for n, v in saved.items():
            if not isinstance(v, Tensor):
                out[n] = deepcopy(v)
                continue
            if n in _FACTOR_KEYS + _MOMENTUM_KEYS + (_SGD_MOMENTUM_KEY,) and v.shape != p.shape:
                raise ValueError(
                    f"state_dict entry {n!r} of tensor {pid} has shape {tuple(v.shape)} but the "
                    f"parameter has shape {tuple(p.shape)}; the model differs from the saved one"
                )
            if n in _FACTOR_KEYS + _MOMENTUM_KEYS:
                # Factors and their momenta are fp32 whatever the parameter's dtype.
                device = v.device if isinstance(v, DTensor) else _local(p).device
                out[n] = v.detach().to(device=device, dtype=torch.float32, copy=True)
            else:  # as torch.optim.Optimizer.load_state_dict does
                out[n] = Optimizer._process_value_according_to_param_policy(p, v, pid, saved_groups, n)
        if _STARTED not in out:  # older checkpoints: a saved buffer meant started
            keys = _MOMENTUM_KEYS if theirs else (_SGD_MOMENTUM_KEY,)
            if all(k in out for k in keys):
                out[_STARTED] = True
        return out


def pilot(
    xs: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ws: list[Tensor],
    momentum_ms: Optional[list[Tensor]],
    momentum_ws: Optional[list[Tensor]],
    firsts: list[bool],
    *,
    lr: Union[float, Tensor],
    momentum: float,
    dampening: float,
    nesterov: bool,
    alpha: Union[float, Tensor],
    weight_decay: float,
    maximize: bool,
    backend: str = "auto",
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    l1_accum: Optional[Tensor] = None,
    l1_clear: Optional[Tensor] = None,
    workspace: Optional[dict] = None,
) -> None:
    """Functional PILoT step for reparameterized tensors on one device with one dtype.

    See :class:`PILoT` for the update and
    :func:`pilot_kernels.kernels.reference.pilot_step` for the arguments.  ``lr`` and
    ``alpha`` may be floats or 0-dim device tensors (read on the device).  Under
    ``torch.compile`` the step is the custom op ``torch.ops.pilot_kernels.pilot_step``,
    which the compiler treats as one opaque, in-place call.
    """
    if not xs:
        return
    if torch.compiler.is_compiling():
        from .ops import pilot_step_op

        pilot_step_op(
            xs, grads, ms, ws, momentum_ms or [], momentum_ws or [], firsts,
            *split_scalar(lr), momentum, dampening, nesterov, *split_scalar(alpha),
            weight_decay, maximize, grad_scale, found_inf, l1_accum, l1_clear, backend,
        )
        return
    device = xs[0].device
    step_fn = get_step_fn(resolve_backend(backend, device))
    if grad_scale is not None and grad_scale.device != device:
        grad_scale = grad_scale.to(device, non_blocking=True)
    if found_inf is not None and found_inf.device != device:
        found_inf = found_inf.to(device, non_blocking=True)
    step_fn(
        xs, grads, ms, ws, momentum_ms, momentum_ws, firsts,
        lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, alpha=alpha,
        weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
        found_inf=found_inf, l1_accum=l1_accum, l1_clear=l1_clear, workspace=workspace,
    )


def _foreach_sgd(params: list, grads: list, bufs: list, *, lr: float, momentum: float, dampening: float,
                 nesterov: bool, weight_decay: float, maximize: bool) -> None:
    """``torch.optim.sgd._multi_tensor_sgd`` for tensors of one device and dtype whose
    momentum buffers all hold history: its foreach calls, on the same lists in the same
    order, so the same results bit for bit (``tests/test_reference.py`` compares with
    ``torch.optim.SGD``).  What is left out is its grouping by device and dtype (one
    group here) and its per-tensor loop over the buffers: 33 → 7 µs for ResNet-50's 107
    unsplit tensors (kernels stubbed, min of 30 interleaved rounds, the shared 2-core
    machine), most of what the step cost on the host beyond torch's own fused SGD.
    """
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        if maximize:  # reuses the negated copies, as torch does
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1 - dampening)
        if nesterov:
            torch._foreach_add_(grads, bufs, alpha=momentum)
        else:
            grads = bufs
    torch._foreach_add_(params, grads, alpha=-lr)


def _fused_sgd_on_buffers(params, grads, bufs, firsts, group, grad_scale, found_inf) -> None:
    """torch's fused SGD kernel (``torch._fused_sgd_``, what ``SGD(fused=True)`` runs) on
    buffers that always exist.  Its first-step flag is one per call, so first and
    continuing tensors go in separate calls.  A step that ``found_inf`` skips leaves
    the buffers as they were: zero before a first step, so the next step computes
    ``b = μ·0 + (1−τ)·g``, SGD's ``b = g`` whenever the dampening τ is 0 (which step was
    skipped is known only on the device; telling the host would cost a sync).
    """
    momentum = group["momentum"] != 0
    if momentum:
        parts = [(f, [i for i, first in enumerate(firsts) if first == f]) for f in (True, False)]
    else:
        parts = [(False, range(len(params)))]
    for is_first, idx in parts:
        if not idx:
            continue
        lists = [[params[i] for i in idx], [grads[i] for i in idx]]
        if momentum:
            lists.append([bufs[i] for i in idx])
        grouped = Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=False)
        for (device, _), (tensors, _) in grouped.items():
            torch._fused_sgd_(
                tensors[0],
                tensors[1],
                tensors[2] if momentum else [],
                **_sgd_hparams(group),
                is_first_step=is_first,
                grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True),
            )
