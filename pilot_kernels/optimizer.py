"""The PILoT optimizer: ``x = m ⊙ w`` trained with a time-varying weight decay α_t.

Layout follows ``torch/optim/sgd.py``: the :class:`PILoT` class gathers tensors and
state, :func:`pilot` is the functional step, and the backends in
:mod:`pilot_kernels.kernels` do the arithmetic.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _sgd_functional

from .dtensor import DTensor, all_reduce_over_shards_, shard_groups
from .dtensor import local as _local
from .init import split
from .kernels import check_backend_name, get_step_fn, resolve_backend

__all__ = ["PILoT", "pilot"]

_REPARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Per-tensor state keys; public as PILoT.FACTOR_KEYS etc. (see the class).
_FACTOR_KEYS = ("m", "w")
_MOMENTUM_KEYS = ("momentum_m", "momentum_w")
_SGD_MOMENTUM_KEY = "momentum_buffer"
# False until a tensor's momentum buffers hold history (SGD's first step: b = d).
_STARTED = "momentum_started"


def _same(t: Tensor) -> Tensor:
    return t


def _check_hparams(group: dict, tensor_values: bool = True) -> None:
    """Raise a ValueError naming the fix for any invalid hyperparameter of ``group``.

    ``lr`` and ``alpha`` may be one-element tensors; their values are checked only when
    ``tensor_values`` (reading a device tensor is a host sync, which ``step`` avoids).
    """
    for name in ("lr", "alpha"):
        v = group[name]
        if isinstance(v, Tensor):
            if v.numel() != 1:
                raise ValueError(f"a Tensor {name} must have exactly one element, got shape {tuple(v.shape)}")
            if not tensor_values:
                continue
            v = v.item()
        if v < 0.0:
            what = "learning rate" if name == "lr" else name
            raise ValueError(f"Invalid {what}: {v}; {name} must be >= 0")
    for name in ("momentum", "beta", "weight_decay", "dampening"):
        if group[name] < 0.0:
            raise ValueError(f"Invalid {name}: {group[name]}; {name} must be >= 0")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            "Nesterov momentum requires a momentum > 0 and zero dampening; "
            "set momentum > 0 and dampening=0, or nesterov=False"
        )
    if group["reparam"] not in ("auto", True, False):
        raise ValueError(f"reparam must be 'auto', True or False, got {group['reparam']!r}")
    check_backend_name(group["backend"])


def _wants_reparam(p: Tensor, reparam: Union[str, bool]) -> bool:
    return p.ndim >= 2 if reparam == "auto" else bool(reparam)


def _check_param(p: Tensor, reparam: bool) -> None:
    if p.is_complex():
        raise TypeError(
            f"PILoT does not support complex parameters (got {p.dtype}); "
            "optimize torch.view_as_real(p) instead"
        )
    if not p.is_floating_point():
        raise TypeError(f"PILoT needs floating-point parameters, got {p.dtype}")
    if reparam and p.dtype not in _REPARAM_DTYPES:
        raise TypeError(
            f"reparameterized tensors must be float32, bfloat16 or float16, got {p.dtype}; "
            "convert the model (e.g. model.float()) or put the tensor in a group with reparam=False"
        )


class PILoT(Optimizer):
    r"""PILoT: sparsifying SGD on ``x = m ⊙ w`` with a time-varying weight decay α_t.

    A drop-in replacement for :class:`torch.optim.SGD`.  The model keeps its ordinary
    parameters ``x``; for every *reparameterized* tensor the optimizer holds fp32
    factors ``m, w`` (split from ``x`` at construction so that ``m² − w² = β``) and
    their momentum buffers, and after each step writes ``x ← m ⊙ w`` back.  The
    objective is :math:`f(m ⊙ w) + α (‖m‖² + ‖w‖²)`; a decaying α moves the implicit
    bias from L2 (dense) to L1 (sparse).  With ``β = 0`` and constant α this is spred.

    One step for a reparameterized tensor, elementwise, in fp32 (spec §3):

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
    norms) follow :class:`torch.optim.SGD` exactly, with the same ``momentum_buffer``
    state key.

    Args:
        params: parameters or param groups, as for any optimizer.
        lr (float): learning rate η.
        momentum (float): μ (default 0.9).
        dampening (float): τ (default 0).
        nesterov (bool): Nesterov momentum (default False).
        alpha (float): the decay α on ``‖m‖² + ‖w‖²`` (default 0).  May change between
            any two steps (schedules in :mod:`pilot_kernels.schedules` do this).
        beta (float): the split ``m² − w² = β`` used when a tensor is added
            (default 1, the paper's PILoT; 0 gives spred).
        weight_decay (float): λ; plain L2 on ``x`` (on ``m ⊙ w`` for reparameterized
            tensors, on ``x`` for the others, as SGD).
        maximize (bool): maximize instead of minimize.
        reparam ("auto" | bool): which tensors of a group are reparameterized;
            ``"auto"`` takes those with ``ndim >= 2``.
        backend ("auto" | "reference" | "triton" | "cuda"): ``auto`` takes the fused
            Triton kernel for CUDA tensors and the plain-torch reference otherwise; the
            environment variable ``PILOT_BACKEND`` overrides ``auto``.
        capturable (bool): keep ``lr`` and ``alpha`` in device tensors and make
            ``step()`` free of host syncs and host-side decisions, so a whole training
            step can be captured in a CUDA graph.  Change them in place between replays
            (``group["lr"].fill_(0.01)``; torch's lr schedulers and ours do this).
        fused_unscale (bool): let ``torch.amp.GradScaler`` pass its scale and inf flag
            to :meth:`step`, to unscale inside the step without a host sync (default
            True); False leaves unscaling to the scaler (see AMP below).  Sets the
            instance's ``_step_supports_amp_scaling``, the attribute torch's GradScaler
            and PyTorch Lightning read.

    State of a reparameterized tensor ``p``: ``state[p]["m"]``, ``state[p]["w"]`` and,
    when the group has momentum, ``state[p]["momentum_m"]``, ``state[p]["momentum_w"]``;
    all fp32 and shaped like ``p`` (DTensors like ``p`` under FSDP2).  Other tensors
    hold SGD's ``momentum_buffer``.  Buffers are allocated (as zeros) when a tensor is
    added, so a checkpoint template is complete before the first step;
    ``state[p]["momentum_started"]`` records whether they hold history yet.

    Distributed: under DDP nothing changes.  Under FSDP2 (DTensor parameters) every
    rank updates its local shard and :meth:`l1_norm` all-reduces over the shards.

    AMP (``torch.amp.GradScaler``): with ``fused_unscale=True`` (the default) the scaler
    hands ``grad_scale``/``found_inf`` to :meth:`step`, which unscales the gradients
    inside the fused pass; a step with inf/NaN gradients changes nothing, and nothing is
    read on the host.  ``scaler.unscale_(opt)`` before ``scaler.step(opt)`` (to clip the
    unscaled gradients) is honoured: the step then only checks ``found_inf``.
    ``fused_unscale=False`` makes the optimizer an ordinary one for the scaler, which
    unscales the gradients itself and skips ``step()`` on inf/NaN (one host sync per
    step); frameworks that clip only such optimizers need it (PyTorch Lightning's
    mixed-precision plugin refuses to clip otherwise).

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
        # Σ|m ⊙ w| lives in two device slots per device: each step adds into one and
        # zeroes the other, so the fused kernel needs no extra launch to clear it.
        # (Capturable groups zero and fill one slot instead: a replayed graph cannot
        # flip a host-side index.)
        self._l1: dict[torch.device, Tensor] = {}
        self._l1_latest: dict[torch.device, int] = {}
        # Shard dims to all-reduce the local L1 over, when parameters are DTensors.
        self._l1_groups: list = []
        # Per (group, device, dtype) scratch space of the fused backends (kernel tables).
        self._workspaces: dict[tuple, dict] = {}
        # Whether any parameter is a DTensor: step() then works on local shards.  Asked
        # once here instead of per tensor per step (the step's host cost is budgeted).
        self._sharded = False
        # Per instance, not per class: GradScaler and Lightning read it from the object.
        self._step_supports_amp_scaling = fused_unscale
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ pickling
    # torch.optim.Optimizer pickles only defaults, state and param_groups; ours adds the
    # AMP choice and the L1 slots, and re-derives the rest (process groups and kernel
    # plans cannot, or must not, travel).
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
        self._workspaces = {}
        params = [p for g in self.param_groups for p in g["params"]]
        self._sharded = any(isinstance(p, DTensor) for p in params)
        self._l1_groups = shard_groups(params) if self._sharded else []

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its reparameterized tensors are split into ``m, w`` now and
        overwritten with ``m ⊙ w``.  Invalid input raises before anything changes."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        merged = {**self.defaults, **param_group}
        _check_hparams(merged)
        for p in params:
            if isinstance(p, Tensor):
                _check_param(p, _wants_reparam(p, merged["reparam"]))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["capturable"]:
            self._hparams_to_device(group)
        with torch.no_grad():
            for p in group["params"]:
                self._init_state(p, group)

    def _hparams_to_device(self, group: dict) -> None:
        """Capturable groups keep lr and alpha as fp32 device tensors (updated in place)."""
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        for name in ("lr", "alpha"):
            v = group[name]
            if not isinstance(v, Tensor) or v.device != device:
                group[name] = torch.as_tensor(v, dtype=torch.float32).to(device).reshape(())

    def _init_state(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if _wants_reparam(p, group["reparam"]):
            m, w = split(p, group["beta"])
            state["m"], state["w"] = m, w
            p.copy_(m * w)
            self._add_to_l1(p, state)
        if group["momentum"] != 0:
            self._init_momentum(p, state)

    def _init_momentum(self, p: Tensor, state: dict) -> None:
        """Zero momentum buffers (SGD's for plain tensors), not started yet."""
        if self.is_reparameterized(state):
            state["momentum_m"] = torch.zeros_like(state["m"])
            state["momentum_w"] = torch.zeros_like(state["w"])
        else:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state[_STARTED] = False

    def _add_to_l1(self, p: Tensor, state: dict) -> None:
        """Add ``Σ|m ⊙ w|`` of one tensor's local shard to its device's latest L1 slot."""
        device = _local(p).device
        if device not in self._l1:
            self._l1[device] = torch.zeros(2, dtype=torch.float32, device=device)
            self._l1_latest[device] = 0
        if isinstance(p, DTensor) and not self._sharded:
            self._sharded = True
            self._l1_groups = shard_groups([p])
        self._l1[device][self._l1_latest[device]] += (_local(state["m"]) * _local(state["w"])).abs().sum()

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

    # ------------------------------------------------------------------ step
    def _check_step_inputs(self) -> None:
        """Every check that can fail, before any tensor is touched."""
        for group in self.param_groups:
            _check_hparams(group, tensor_values=False)
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        "PILoT does not support sparse gradients; use dense gradients "
                        "(e.g. nn.Embedding(sparse=False))"
                    )

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
        if not torch.compiler.is_compiling():
            self._check_step_inputs()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)

        # Capturable optimizers zero one L1 slot per device and fill it (see __init__).
        single_slot = any(g["capturable"] for g in self.param_groups)
        stepped_devices: set[torch.device] = set()
        for gi, group in enumerate(self.param_groups):
            dense, dense_grads, dense_bufs, dense_firsts = [], [], [], []
            buckets: dict[tuple[torch.device, torch.dtype], dict[str, list]] = {}
            momentum = group["momentum"] != 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if momentum and _STARTED not in state:  # momentum switched on later
                    self._init_momentum(p, state)
                if not self.is_reparameterized(state):
                    dense.append(p)
                    dense_grads.append(p.grad)
                    if momentum:
                        dense_bufs.append(state[_SGD_MOMENTUM_KEY])
                        dense_firsts.append(not state[_STARTED])
                        state[_STARTED] = True
                    continue
                local = _local if self._sharded else _same
                x = local(p)
                b = buckets.get((x.device, x.dtype))
                if b is None:
                    b = buckets[(x.device, x.dtype)] = {k: [] for k in ("xs", "grads", "ms", "ws", "bms", "bws", "firsts")}
                b["xs"].append(x)
                b["grads"].append(local(p.grad))
                b["ms"].append(local(state["m"]))
                b["ws"].append(local(state["w"]))
                if momentum:
                    b["bms"].append(local(state["momentum_m"]))
                    b["bws"].append(local(state["momentum_w"]))
                    b["firsts"].append(not state[_STARTED])
                    state[_STARTED] = True
                else:
                    b["firsts"].append(True)

            if dense:
                self._sgd_step(group, dense, dense_grads, dense_bufs, dense_firsts, grad_scale, found_inf)

            for (device, dtype), b in buckets.items():
                latest = self._l1_latest[device]
                if single_slot:
                    accum, clear = self._l1[device][latest], None
                    if device not in stepped_devices:
                        accum.zero_()
                else:
                    accum, clear = self._l1[device][1 - latest], self._l1[device][latest]
                pilot(
                    b["xs"], b["grads"], b["ms"], b["ws"], b["bms"] or None, b["bws"] or None, b["firsts"],
                    lr=group["lr"],
                    momentum=group["momentum"],
                    dampening=group["dampening"],
                    nesterov=group["nesterov"],
                    alpha=group["alpha"],
                    weight_decay=group["weight_decay"],
                    maximize=group["maximize"],
                    backend=group["backend"],
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                    l1_accum=accum,
                    l1_clear=clear,
                    workspace=self._workspaces.setdefault((gi, device, dtype), {}),
                )
                stepped_devices.add(device)
        if not single_slot:
            for device in stepped_devices:
                self._l1_latest[device] = 1 - self._l1_latest[device]
        return loss

    def _sgd_step(self, group, params, grads, bufs, firsts, grad_scale, found_inf) -> None:
        """torch.optim.SGD's own step for the tensors that are not split.

        ``bufs`` are the zero-allocated momentum buffers (empty without momentum),
        ``firsts`` whether each holds no history yet.  Without AMP and capturable mode
        this is ``torch.optim.sgd.sgd`` itself, bit for bit: a first step passes ``None``
        and SGD returns ``b = g`` in a new buffer.  With a ``found_inf`` (AMP) or device
        hyperparameters (capturable) it is torch's fused SGD kernel, but always on our
        own buffers: torch's fused path would allocate ``empty_like`` buffers for a
        first step and leave them uninitialised when ``found_inf`` skips it.
        """
        amp = grad_scale is not None or found_inf is not None
        if amp or (group["capturable"] and not torch.compiler.is_compiling()):
            _fused_sgd_on_buffers(params, grads, bufs, firsts, group, grad_scale, found_inf)
            return
        momentum = group["momentum"] != 0
        sgd_bufs = [None if first else b for b, first in zip(bufs, firsts)] if momentum else [None] * len(params)
        # torch's fused SGD is opaque to Dynamo (a graph break), and Dynamo reports every
        # group as capturable: the single-tensor loop compiles instead.
        compiling = torch.compiler.is_compiling()
        _sgd_functional(
            params,
            grads,
            sgd_bufs,
            foreach=False if compiling else None,
            fused=False if compiling else None,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if momentum:
            for p, buf in zip(params, sgd_bufs):
                self.state[p][_SGD_MOMENTUM_KEY] = buf

    # ------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`.

        ``m``, ``w`` and their momentum buffers stay fp32 whatever the parameters'
        dtype (``torch.optim.Optimizer`` would cast them to it), and every
        reparameterized parameter is overwritten with ``m ⊙ w`` so the model and the
        optimizer agree.  A state_dict that does not match the parameters raises a
        ValueError before anything changes.
        """
        self._check_loadable(state_dict)
        ours_keys = _FACTOR_KEYS + _MOMENTUM_KEYS
        ours: dict[Any, dict[str, Tensor]] = {}
        plain_state: dict[Any, dict[str, Any]] = {}
        for k, s in state_dict["state"].items():
            plain_state[k] = {n: v for n, v in s.items() if n not in ours_keys}
            ours[k] = {n: v for n, v in s.items() if n in ours_keys}
        super().load_state_dict({**state_dict, "state": plain_state})

        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        id_to_param = dict(zip(saved_ids, params))
        with torch.no_grad():
            for k, tensors in ours.items():
                if not tensors:
                    continue
                p = id_to_param[k]
                state = self.state[p]
                for n, v in tensors.items():
                    state[n] = v.detach().to(device=p.device, dtype=torch.float32, copy=True)
                p.copy_(state["m"] * state["w"])
            for group in self.param_groups:
                if group["capturable"]:
                    self._hparams_to_device(group)
        self._workspaces.clear()
        self.refresh_l1_()

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups but the optimizer has "
                f"{len(groups)}; build the optimizer with the same groups as the saved one"
            )
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {i} has {len(g['params'])} tensors but the state_dict's has "
                    f"{len(sg['params'])}; the model or its grouping differs from the saved one"
                )
        params = [p for g in groups for p in g["params"]]
        saved_ids = [i for g in saved_groups for i in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid, {})
            ours_now = self.is_reparameterized(self.state[p])
            theirs = "m" in saved
            if ours_now != theirs:
                raise ValueError(
                    f"tensor {pid} (shape {tuple(p.shape)}) is "
                    f"{'' if theirs else 'not '}reparameterized in the state_dict but "
                    f"{'' if ours_now else 'not '}in this optimizer; use the same reparam setting"
                )
            for n in _FACTOR_KEYS + _MOMENTUM_KEYS + ("momentum_buffer",):
                v = saved.get(n)
                if isinstance(v, Tensor) and v.shape != p.shape:
                    raise ValueError(
                        f"state_dict entry {n!r} of tensor {pid} has shape {tuple(v.shape)} but the "
                        f"parameter has shape {tuple(p.shape)}; the model differs from the saved one"
                    )
            if theirs and "w" not in saved:
                raise ValueError(f"state_dict entry of tensor {pid} has 'm' but no 'w'")


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
            *_split_scalar(lr), momentum, dampening, nesterov, *_split_scalar(alpha),
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


def _split_scalar(v: Union[float, Tensor]) -> tuple[float, Optional[Tensor]]:
    """A float or device-tensor hyperparameter as the custom op's (float, tensor) pair."""
    return (0.0, v) if isinstance(v, Tensor) else (float(v), None)


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
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                is_first_step=is_first,
                grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True),
            )
