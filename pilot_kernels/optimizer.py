"""The PILoT optimizer: ``x = m ⊙ w`` trained with a time-varying weight decay α_t.

Laid out as ``torch/optim/sgd.py``: the :class:`PILoT` class gathers each group's
tensors and state (:meth:`PILoT._gather`, torch's ``_init_group``: Dynamo intercepts a
method of that name and runs it eagerly, so ours has another), :func:`pilot` is the
functional step, and :func:`pilot_kernels.kernels.run_step` picks the backend that does
the arithmetic.
"""
from __future__ import annotations

import operator
from itertools import compress, repeat
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _sgd_functional

from .dtensor import DTensor, all_reduce_over_shards_, shard_groups
from .dtensor import local as _local
from .init import split
from ._checks import (HPARAM_KEYS, REPARAM_DTYPES, check_hparams, check_param, dtype_error,
                      group_tensors, hparam_key, sgd_hparams, sparse_error, wants_split)
from ._loading import loaded_state
from .kernels import run_step, split_scalar
from .kernels.layout import LayoutGuard
from .kernels.api import StepExtras, StepHparams, StepTensors

__all__ = ["PILoT", "pilot"]

# Per-tensor state keys; public as PILoT.FACTOR_KEYS etc. (see the class).
_FACTOR_KEYS = ("m", "w")
_MOMENTUM_KEYS = ("momentum_m", "momentum_w")
_SGD_MOMENTUM_KEY = "momentum_buffer"
# False until a tensor's momentum buffers hold history (SGD's first step: b = d).
_STARTED = "momentum_started"

# Readers for the gather, applied with map(): the per-tensor loop then runs in C.
_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_FACTORS = operator.itemgetter("m", "w")
_FACTORS_AND_MOMENTA = operator.itemgetter("m", "w", "momentum_m", "momentum_w", _STARTED)
_SGD_MOMENTUM = operator.itemgetter(_SGD_MOMENTUM_KEY, _STARTED)
_M = operator.itemgetter("m")


def _with_grads(params: list, states: list) -> tuple[list, list, list]:
    """The ``params`` that have a gradient, their gradients and states; a sparse
    gradient raises."""
    grads = list(map(_GRAD, params))
    try:
        sparse = any(map(_IS_SPARSE, grads))
    except AttributeError:  # a gradient is None: leave its tensor out
        has = list(map(operator.is_not, grads, repeat(None)))
        params, grads, states = list(compress(params, has)), list(compress(grads, has)), list(compress(states, has))
        sparse = any(map(_IS_SPARSE, grads))
    if sparse:
        raise sparse_error(next(p for p, g in zip(params, grads) if g.is_sparse))
    return params, grads, states


def _gather_traced(t: "_GroupTensors", momentum: bool) -> tuple:
    """:meth:`PILoT._gather`'s lists from plain loops, for ``torch.compile`` (Dynamo
    traces no ``map`` over ``operator.itemgetter``)."""
    plain: tuple = ([], [], [], [])
    for p, s in zip(t.dense, t.dense_states):
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise sparse_error(p)
        plain[0].append(p)
        plain[1].append(p.grad)
        if momentum:
            plain[2].append(s[_SGD_MOMENTUM_KEY])
            plain[3].append(not s[_STARTED])
    buckets: dict = {}
    for p, s in zip(t.splits, t.split_states):
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise sparse_error(p)
        x = _local(p)
        ps, lists = buckets.setdefault((x.device, x.dtype), ([], [[], [], [], [], [] if momentum else None,
                                                                  [] if momentum else None, []]))
        ps.append(p)
        lists[0].append(x)
        lists[1].append(_local(g))
        lists[2].append(_local(s["m"]))
        lists[3].append(_local(s["w"]))
        if momentum:
            lists[4].append(_local(s["momentum_m"]))
            lists[5].append(_local(s["momentum_w"]))
        lists[6].append(not s[_STARTED] if momentum else True)
    return plain, buckets


class _GroupTensors:
    """A group's tensors as the gather reads them: plain and reparameterized ones with
    their state dicts (kept while the group's tensor list and the optimizer's state dict
    are the same objects), and the ``(device, dtype)`` keys of the reparameterized ``x``
    with a guard over their and their ``m``'s layouts."""

    def __init__(self, params: list, state: dict, is_split: Callable[[dict], bool]):
        self.params, self.n, self.state = params, len(params), state
        entries = [(p, state.get(p)) for p in params]
        self.dense = [p for p, s in entries if not (s and is_split(s))]
        # A plain tensor without momentum has no state: an empty dict stands in for it.
        self.dense_states = [s if s is not None else {} for p, s in entries if not (s and is_split(s))]
        self.splits = [p for p, s in entries if s and is_split(s)]
        self.split_states = [state[p] for p in self.splits]
        self.guard: Optional[LayoutGuard] = None
        self.keys: list = []

    def remember_layout(self, xs: list, ms: list) -> None:
        self.guard = LayoutGuard(xs + ms)
        self.keys = sorted({(x.device, x.dtype) for x in xs}, key=str)


# ---------------------------------------------------------------------- L1 norm
class _L1Slots:
    """``Σ|m ⊙ w|`` per device, accumulated by the fused step itself.

    Each device has two fp32 slots: a step adds into one and clears the other inside
    the same kernel, so no launch zeroes the accumulator.  Capturable optimizers zero
    and fill one slot instead (a replayed CUDA graph cannot flip a host-side index).
    """

    def __init__(self) -> None:
        self.slots: dict[torch.device, Tensor] = {}
        self.latest: dict[torch.device, int] = {}

    def buffer(self, device: torch.device) -> Tensor:
        if device not in self.slots:
            self.slots[device] = torch.zeros(2, dtype=torch.float32, device=device)
            self.latest[device] = 0
        return self.slots[device]

    def add_(self, device: torch.device, value: Tensor) -> None:
        self.buffer(device)[self.latest[device]] += value

    def for_step(self, device: torch.device, single: bool, first_on_device: bool) -> tuple:
        """``(accum, clear)`` for one call of the step on ``device``."""
        buf, latest = self.buffer(device), self.latest[device]
        if single:
            if first_on_device:
                buf[latest].zero_()
            return buf[latest], None
        return buf[1 - latest], (buf[latest] if first_on_device else None)

    def flip(self, devices: Iterable[torch.device]) -> None:
        for d in devices:
            self.latest[d] = 1 - self.latest[d]

    def total(self) -> Tensor:
        if not self.slots:
            return torch.zeros((), dtype=torch.float32)
        norms = [buf[self.latest[d]].clone() for d, buf in self.slots.items()]
        total = norms[0]
        for n in norms[1:]:
            total = total + n.to(total.device, non_blocking=True)
        return total

    def zero_(self) -> None:
        for d, buf in self.slots.items():
            buf.zero_()
            self.latest[d] = 0

    def snapshot(self) -> tuple:
        """The slots' values and indices, for :meth:`restore` (``sparsity.sweep`` keeps
        them across its trial prunings: a recomputed sum could differ in the last bits)."""
        return {d: b.clone() for d, b in self.slots.items()}, dict(self.latest)

    def restore(self, snap: tuple) -> None:
        slots, latest = snap
        for d, b in slots.items():
            self.slots[d].copy_(b)
        self.latest.update(latest)


class PILoT(Optimizer):
    r"""PILoT: sparsifying SGD on ``x = m ⊙ w`` with a time-varying weight decay α_t.

    A drop-in replacement for :class:`torch.optim.SGD` implementing PILoT (Jacobs &
    Burkholz, *Mask in the Mirror*, ICLR 2025, §3).  The model keeps its ordinary
    parameters ``x``; for every *reparameterized* tensor the optimizer holds fp32
    factors ``m, w`` and their momentum buffers and trains them on
    :math:`f(m ⊙ w) + α_t (‖m‖² + ‖w‖²)`, writing ``x ← m ⊙ w`` after each step.  A
    decaying α_t moves the implicit bias from L2 (dense) to L1 (sparse) (paper §2).
    With ``β = 0`` and a constant α this is spred.

    **Split** (paper §3): a tensor's value ``x`` is split into ``m > 0`` and ``w`` with
    ``m ⊙ w = x`` and ``m² − w² = β``:
    :math:`m = \sqrt{(β + \sqrt{β² + 4x²})/2}`, ``w = x / m``, with ``m`` then nudged by
    up to two fp32 ulps so that ``m ⊙ w`` is exactly ``x`` wherever fp32 allows
    (:func:`pilot_kernels.init.split`).  ``β > 0`` keeps ``m`` away from zero so ``x``
    can change sign; ``β = 0`` is spred's balanced split, under which it cannot.

    **Step**, elementwise in fp32, for a reparameterized tensor:

    .. math::
        \begin{aligned}
        (m, w) &\leftarrow \text{split}(x, β) \text{ where } x \ne m w && \text{(written since the last step)} \\
        g &\leftarrow \nabla_x f \,/\, \text{grad\_scale}, \qquad g \leftarrow -g \text{ if maximize} \\
        g &\leftarrow g + λ\, m w                                  && \text{(weight\_decay: L2 on } x) \\
        d_m &= g\, w + 2α\, m, \qquad d_w = g\, m + 2α\, w         && \text{(old } m, w) \\
        b &\leftarrow d \text{ (first step)}, \quad b \leftarrow μ b + (1-τ) d   && \text{(momentum, as SGD)} \\
        d &\leftarrow d + μ b \text{ if nesterov else } b \\
        m &\leftarrow m - η\, d_m, \qquad w \leftarrow w - η\, d_w \\
        x &\leftarrow m w, \qquad \ell_1 \mathrel{+}= \textstyle\sum |m w|
        \end{aligned}

    Tensors that are not reparameterized (by default those with ``ndim < 2``: biases,
    norms) follow :class:`torch.optim.SGD` bit for bit with its ``momentum_buffer``
    state key: its multi-tensor (``foreach=True``) path, or under AMP or ``capturable``
    ``SGD(fused=True)``'s kernel.  ``.grad`` is never written.

    Decisions where the paper is silent:

    * **Momentum** is SGD's (heavy ball, dampening τ, Nesterov) applied to ``m`` and
      ``w`` separately; weight decay λ is plain L2 on ``x = m ⊙ w``.
    * **The parameters are the truth.**  Whatever is written into a reparameterized
      parameter between steps (``load_state_dict``, ``copy_``, ``.data`` writes,
      ``nn.init``, pruning masks, a DDP broadcast, EMA updates) is kept: the fused pass
      reads ``x`` and compares it bit for bit with the ``m ⊙ w`` the last step wrote.
      Each element that differs is split again from its new value with the group's β
      and takes this step as its momentum's first (its old velocity belongs to factors
      that no longer exist); every other element keeps its factors and momentum.  No
      host sync, no version counters: writes through ``.data`` and inside CUDA graphs
      are seen too.  ``adopt_writes=False`` skips the read of ``x`` (4 of 44 bytes per
      fp32 element); writes between steps are then overwritten with ``m ⊙ w``.
      A write that moves a tensor to float64 raises.
    * :meth:`load_state_dict` loads ``m``, ``w`` and momenta and never writes the
      model; the rule above reconciles the two at the next step, so a resume that loads
      model and optimizer in either order is exact.
    * AMP: a step that ``found_inf`` skips changes nothing (``x`` included); a tensor's
      momentum counts as started afterwards, because telling which step was skipped
      would need a sync.  Buffers are allocated as zeros, so the next step computes
      ``b = μ·0 + (1−τ) d``, SGD's ``b = d`` whenever τ = 0.

    Args:
        params: parameters, named parameters or param groups, as for any optimizer.
        lr (float or Tensor): learning rate η (default 1e-3, as SGD's).
        momentum (float): μ (default 0.9).
        dampening (float): τ (default 0).
        nesterov (bool): Nesterov momentum (default False).
        alpha (float or Tensor): the decay α on ``‖m‖² + ‖w‖²`` (default 0).  May change
            between any two steps (schedules in :mod:`pilot_kernels.schedules` do this).
        beta (float): the split ``m² − w² = β`` used when a tensor or an element is
            (re-)split (default 1, the paper's PILoT; 0 gives spred).
        weight_decay (float): λ; plain L2 on ``x`` (on ``m ⊙ w`` for reparameterized
            tensors, on ``x`` for the others, as SGD).
        maximize (bool): maximize instead of minimize.
        reparam ("auto" | bool): which tensors of a group are reparameterized, decided
            when a tensor is added; ``"auto"`` takes those with ``ndim >= 2``.
        backend ("auto" | "reference" | "triton" | "cuda" | "cpu"): ``auto`` takes the
            fused Triton kernel for CUDA tensors and the fused C++ one for CPU tensors;
            the environment variable ``PILOT_BACKEND`` overrides ``auto``.
        capturable (bool): keep ``lr`` and ``alpha`` in device tensors and make
            ``step()`` free of host syncs, so a whole training step can be captured in
            a CUDA graph.  Change them in place between replays
            (``group["lr"].fill_(0.01)``; torch's lr schedulers and ours do this).
        fused_unscale (bool): let ``torch.amp.GradScaler`` pass its scale and inf flag
            to :meth:`step`, to unscale inside the step without a host sync (default
            True); False leaves unscaling to the scaler (see AMP below).  Sets the
            instance's ``_step_supports_amp_scaling``, the attribute torch's GradScaler
            and PyTorch Lightning read.
        adopt_writes (bool): keep values written into reparameterized parameters
            between steps (default True; see above).

    Hyperparameters are checked when set: here, in :meth:`add_param_group` and
    :meth:`load_state_dict`, and at a step whenever a group's value changed since the
    last check (a schedule writing NaN raises before anything moves).

    State of a reparameterized tensor ``p`` (keys in :attr:`STATE_KEYS`):
    ``state[p]["m"]``, ``state[p]["w"]`` and, when the group has momentum,
    ``state[p]["momentum_m"]``, ``state[p]["momentum_w"]``; all fp32 and shaped like
    ``p`` (DTensors like ``p`` under FSDP2).  Other tensors hold SGD's
    ``momentum_buffer`` when the group has momentum, and no state otherwise.  Buffers
    are allocated (as zeros) when a tensor is added, so a checkpoint template is
    complete before the first step; ``state[p]["momentum_started"]`` records whether
    they hold history yet.

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
        lr: Union[float, Tensor] = 1e-3,
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
        adopt_writes: bool = True,
    ) -> None:
        if isinstance(params, Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors "
                f"or dicts, but got {torch.typename(params)}; pass [tensor] or model.parameters()"
            )
        if not isinstance(fused_unscale, bool):
            raise TypeError(f"fused_unscale must be True or False, got {fused_unscale!r}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        alpha=alpha, beta=beta, weight_decay=weight_decay, maximize=maximize,
                        reparam=reparam, backend=backend, capturable=capturable,
                        adopt_writes=adopt_writes)
        check_hparams(defaults)
        # Check every group before the first is added (and its tensors are split), so
        # bad input anywhere changes nothing.
        params = list(params)
        if params and isinstance(params[0], dict):
            for g in params:
                if not isinstance(g, dict):
                    raise TypeError(f"param groups must be dicts, got {type(g).__name__}")
                if not isinstance(g.get("params"), (Tensor, set, type(None))):
                    g["params"] = list(g["params"])  # a generator would be used up here
                self._check_new_group({**defaults, **g})
        else:
            self._check_new_group({**defaults, "params": params})
        self._l1 = _L1Slots()
        self._derive_private()
        # Per instance, not per class: GradScaler and Lightning read it from the object.
        self._step_supports_amp_scaling = fused_unscale
        super().__init__(params, defaults)

    def _derive_private(self) -> None:
        """The private attributes that follow from param_groups and state."""
        # Per group index: the hyperparameter key last checked, and the group's tensors
        # as the gather reads them (see _tensors).
        self._checked: dict[int, tuple] = {}
        self._group_tensors: dict[int, _GroupTensors] = {}
        # Per (group index, device, dtype): the backend's workspace, kept between steps.
        self._workspaces: dict[tuple, dict] = {}
        params = [p for g in getattr(self, "param_groups", []) for p in g["params"]]
        # Whether any parameter is a DTensor: steps then work on local shards.
        self._sharded = any(isinstance(p, DTensor) for p in params)
        # Shard dims to all-reduce the local L1 over, when parameters are DTensors.
        self._l1_groups: list = shard_groups(params) if self._sharded else []

    # ------------------------------------------------------------------ pickling
    # torch.optim.Optimizer pickles only defaults, state and param_groups; ours adds the
    # AMP choice and the L1 slots, and re-derives the rest (process groups cannot travel).
    _PICKLED = ("_step_supports_amp_scaling", "_l1")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_step_supports_amp_scaling", True)
        self.__dict__.setdefault("_l1", _L1Slots())
        for group in self.param_groups:
            group.setdefault("adopt_writes", True)
        self._derive_private()

    # ------------------------------------------------------------------ groups
    def _check_new_group(self, group: dict) -> None:
        check_hparams(group)
        for p in group_tensors(group):
            check_param(p, isinstance(p, Tensor) and wants_split(p, group["reparam"]))

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
        factors = {id(p): split(p, merged["beta"]) for p in group_tensors(param_group)
                   if wants_split(p, merged["reparam"])}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["capturable"]:
            self._hparams_to_device(group)
        if not self._sharded and any(isinstance(p, DTensor) for p in group["params"]):
            self._sharded = True
            self._l1_groups = shard_groups(group["params"])
        for p in group["params"]:
            if id(p) in factors:
                state = self.state[p]
                state["m"], state["w"] = factors[id(p)]
                self._l1.add_(_local(p).device, (_local(state["m"]) * _local(state["w"])).abs().sum())
            if group["momentum"] != 0:
                self._init_momentum(p, self.state[p])

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
        return all_reduce_over_shards_(self._l1.total(), self._l1_groups)

    @torch.no_grad()
    def refresh_l1_(self) -> None:
        """Recompute :meth:`l1_norm` from the current ``m, w``; call it after editing the
        factors outside a step (pruning and loading do)."""
        self._l1.zero_()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if self.is_reparameterized(state):
                    self._l1.add_(_local(p).device, (_local(state["m"]) * _local(state["w"])).abs().sum())

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
        single_slot = any(g["capturable"] for g in self.param_groups)
        stepped: set = set()
        for gi, (group, (dense, buckets)) in enumerate(zip(self.param_groups, gathered)):
            if dense[0]:
                self._sgd_step(group, *dense, grad_scale, found_inf)
            for (device, dtype), (ps, lists) in buckets.items():
                accum, clear = self._l1.for_step(device, single_slot, device not in stepped)
                stepped.add(device)
                pilot(
                    *lists,
                    **sgd_hparams(group),
                    alpha=group["alpha"],
                    beta=group["beta"],
                    adopt_writes=group["adopt_writes"],
                    backend=group["backend"],
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                    l1_accum=accum,
                    l1_clear=clear,
                    workspace=self._workspaces.setdefault((gi, device, dtype), {}),
                )
                if group["momentum"] != 0:
                    self._mark_started(ps, lists[6])
        if not single_slot:
            self._l1.flip(stepped)
        return loss

    def _check_group(self, gi: int, group: dict) -> None:
        """Check the hyperparameters that changed since the group's last step (a schedule
        writing NaN raises here, before anything moves), without reading device values."""
        key = hparam_key(group)
        last = self._checked.get(gi)
        if last == key:
            return
        names = HPARAM_KEYS if last is None else [n for n, a, b in zip(HPARAM_KEYS, last, key) if a != b]
        check_hparams(group, tensor_values=False, names=names)
        if group["capturable"]:
            self._hparams_to_device(group)
            key = hparam_key(group)
        if group["momentum"] != 0:  # momentum may have been switched on since
            for p in group["params"]:
                if _STARTED not in self.state.get(p, {}):
                    self._init_momentum(p, self.state[p])
                    self._group_tensors.pop(gi, None)  # it holds the states without buffers
        if not torch.compiler.is_compiling():
            self._checked[gi] = key

    def _tensors(self, gi: int, group: dict) -> "_GroupTensors":
        """The group's tensors sorted into plain and reparameterized ones with their
        state dicts, kept while the tensor list and the state dict are the same objects
        (per-tensor state lookups would cost more than the rest of the gather), and the
        layout of every reparameterized ``x`` and ``m`` checked in one call."""
        params, state = group["params"], self.state
        if torch.compiler.is_compiling():  # Dynamo guards on the tensors itself
            return _GroupTensors(params, state, self.is_reparameterized)
        t = self._group_tensors.get(gi)
        if t is None or t.params is not params or t.n != len(params) or t.state is not state:
            t = self._group_tensors[gi] = _GroupTensors(params, state, self.is_reparameterized)
        xs = list(map(_local, t.splits)) if self._sharded else t.splits
        ms = [_local(s["m"]) for s in t.split_states] if self._sharded else list(map(_M, t.split_states))
        if t.guard is None or not t.guard.check(xs + ms):
            # x and m no longer share the shapes and devices they had (a .data swap,
            # model.to(), model.double()): reconcile, then remember the new layout.
            self._follow_moves(group, t.splits)
            ms = [_local(s["m"]) for s in t.split_states]
            t.remember_layout(xs, ms)
        return t

    def _gather(self, gi: int, group: dict) -> tuple:
        """Gather the tensors of ``group`` that have a gradient, changing nothing.

        Returns SGD's lists ``(params, grads, momentum buffers, firsts)`` for the plain
        tensors and, per ``(device, dtype)`` of ``x``, the parameters and :func:`pilot`'s
        seven lists for the reparameterized ones.
        """
        self._check_group(gi, group)
        momentum = group["momentum"] != 0
        t = self._tensors(gi, group)
        if torch.compiler.is_compiling():
            return _gather_traced(t, momentum)

        params, grads, states = _with_grads(t.dense, t.dense_states)
        if momentum and params:
            bufs, started = zip(*map(_SGD_MOMENTUM, states))
            plain = (params, grads, list(bufs), list(map(operator.not_, started)))
        else:
            plain = (params, grads, [], [])

        ps, gs, states = _with_grads(t.splits, t.split_states)
        if not ps:
            return plain, {}
        cols = zip(*map(_FACTORS_AND_MOMENTA if momentum else _FACTORS, states))
        if momentum:
            ms, ws, bms, bws, started = map(list, cols)
            firsts = list(map(operator.not_, started))
        else:
            (ms, ws), bms, bws = map(list, cols), None, None
            firsts = [True] * len(ps)
        lists = [ps, gs, ms, ws, bms, bws, firsts]
        if self._sharded:
            lists = [None if col is None else list(map(_local, col)) for col in lists[:6]] + [firsts]
        if len(t.keys) == 1:
            return plain, {t.keys[0]: (ps, lists)}
        buckets: dict = {}
        for i, x in enumerate(lists[0]):
            b_ps, b_lists = buckets.setdefault((x.device, x.dtype), ([], [None if c is None else [] for c in lists]))
            b_ps.append(ps[i])
            for col, b_col in zip(lists, b_lists):
                if col is not None:
                    b_col.append(col[i])
        return plain, buckets

    def _follow_moves(self, group: dict, ps: list) -> None:
        """Reconcile the state of tensors whose ``.data`` moved to another device (the
        state follows) or shape (split again from the new value, momentum restarted)."""
        for p in ps:
            x, state = _local(p), self.state[p]
            if x.dtype not in REPARAM_DTYPES:
                raise dtype_error(x)
            if x.shape != _local(state["m"]).shape:
                state["m"], state["w"] = split(p, group["beta"])
                if group["momentum"] != 0:
                    self._init_momentum(p, state)
            elif x.device != _local(state["m"]).device:
                for k in _FACTOR_KEYS + _MOMENTUM_KEYS:
                    if k in state:
                        state[k] = state[k].to(x.device)

    def _mark_started(self, params: list, firsts: list) -> None:
        """After a step, every tensor's momentum holds history."""
        if any(firsts):
            for p, first in zip(params, firsts):
                if first:
                    self.state[p][_STARTED] = True

    def _sgd_step(self, group, params, grads, bufs, firsts, grad_scale, found_inf) -> None:
        """torch.optim.SGD's own step for the tensors that are not split.

        ``bufs`` are the zero-allocated momentum buffers (empty without momentum) and
        ``firsts`` whether each holds no history yet.  Eager steps without AMP are
        ``torch.optim.sgd.sgd(foreach=True)`` itself, bit for bit (a first step passes
        ``None`` and SGD returns ``b = g`` in a new buffer); compiled ones its
        single-tensor loop (the foreach and fused paths are graph breaks).  With a
        ``found_inf`` (AMP) or device hyperparameters (capturable) it is torch's fused
        SGD kernel on our own buffers (:func:`_fused_sgd_on_buffers`).
        """
        momentum = group["momentum"] != 0
        compiling = torch.compiler.is_compiling()
        if grad_scale is not None or found_inf is not None or (group["capturable"] and not compiling):
            _fused_sgd_on_buffers(params, grads, bufs, firsts, group, grad_scale, found_inf)
        else:
            if momentum:
                sgd_bufs = [None if first else b for b, first in zip(bufs, firsts)] if any(firsts) else list(bufs)
            else:
                sgd_bufs = [None] * len(params)
            if group["nesterov"] and not group["maximize"] and group["weight_decay"] == 0:
                grads = [g.clone() for g in grads]  # foreach SGD adds μ·b into them in place
            _sgd_functional(params, grads, sgd_bufs, foreach=not compiling, fused=False,
                            **sgd_hparams(group))
            if momentum and any(firsts):  # SGD made new buffers for first steps
                for p, buf, first in zip(params, sgd_bufs, firsts):
                    if first:
                        self.state[p][_SGD_MOMENTUM_KEY] = buf
        if momentum:
            self._mark_started(params, firsts)

    # ------------------------------------------------------------------ state_dict
    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`.

        ``m``, ``w`` and their momentum buffers stay fp32 whatever the parameters'
        dtype (``torch.optim.Optimizer`` would cast them to it).  The model's
        parameters are never written: at the next step every element that equals the
        loaded ``m ⊙ w`` (the model was loaded from the same checkpoint, before or
        after) keeps the loaded state, any other is split again from its own value.

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
        state, groups = loaded_state(self, state_dict)
        # Nothing has changed so far; commit.
        self.state, self.param_groups = state, groups
        self._derive_private()
        self.refresh_l1_()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

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
    beta: float,
    weight_decay: float,
    maximize: bool,
    adopt_writes: bool = True,
    backend: str = "auto",
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    l1_accum: Optional[Tensor] = None,
    l1_clear: Optional[Tensor] = None,
    workspace: Optional[dict] = None,
) -> None:
    """Functional PILoT step for reparameterized tensors on one device with one dtype.

    See :class:`PILoT` for the update and :mod:`pilot_kernels.kernels.api` for the
    arguments.  ``lr`` and ``alpha`` may be floats or 0-dim device tensors (read on the
    device).  Under ``torch.compile`` the step is the custom op
    ``torch.ops.pilot_kernels.pilot_step``, which the compiler treats as one opaque,
    in-place call.
    """
    if not xs:
        return
    if torch.compiler.is_compiling():
        from .ops import pilot_step_op

        pilot_step_op(
            xs, grads, ms, ws, momentum_ms or [], momentum_ws or [], firsts,
            *split_scalar(lr), momentum, dampening, nesterov, *split_scalar(alpha),
            weight_decay, maximize, beta, adopt_writes, grad_scale, found_inf, l1_accum,
            l1_clear, backend,
        )
        return
    t = StepTensors(xs, grads, ms, ws, momentum_ms, momentum_ws, firsts)
    h = StepHparams(lr, momentum, dampening, nesterov, alpha, beta, weight_decay, maximize, adopt_writes)
    e = StepExtras(grad_scale, found_inf, l1_accum, l1_clear)
    run_step(backend, t, h, e, workspace if workspace is not None else {})


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
                **sgd_hparams(group),
                is_first_step=is_first,
                grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True),
            )
