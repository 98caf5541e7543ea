r"""HAM: Hyperbolic Aware Minimization, the composable form of PILoT's implicit bias.

HAM (Jacobs, Gadhikar, Rubio-Madrigal & Burkholz, ICLR 2026, arXiv 2506.02630) follows
any base optimizer's step with a hyperbolic mirror step on the weights themselves, with
no doubled parameters::

    θ½      = base_step(θ_k)
    θ_{k+1} = θ½ ⊙ exp(clamp(−η (α · sign(θ½) ⊙ ∇f(θ_k) + β), −5, 5))

η is the group's current ``lr``.  To first order this adds ``−η α |θ| ∇f − η β θ`` to
the base step: the ``|θ|``-weighted geometry of PILoT's ``m ⊙ w`` that carries the L1
bias, with β a decay in the role of PILoT's α_t.  Only tensors with ``ndim >= 2`` take
the mirror step by default (:func:`pilot_kernels.init.splits_by_default`); every other
tensor gets the base step alone.

Three optimizers, one step path (:mod:`pilot_kernels.kernels.ham_backends`):

* :class:`HAM` wraps any torch optimizer: ``base.step()``, then one fused elementwise
  pass over the weights and their gradients (no clone, no host sync).
* :class:`HAMAdamW` and :class:`HAMSGD` fuse the base step and the mirror step into one
  pass that reads ``g``, ``θ`` and the base's state once and writes ``θ`` and the state
  once.  With ``alpha = beta = 0`` they are torch.optim.AdamW / torch.optim.SGD
  (``foreach=False``) bit for bit for fp32 parameters.

Decisions where the paper is silent (docs/ham.md gives the reasons):

* ``sign(0)``: exact zeros stay exact zeros (a zero times a finite factor).
* The gradient of the mirror step is the one the base step saw, unscaled (AMP) and
  negated under ``maximize``, without the base's weight decay term.
* Weight decay is the base's (AdamW: decoupled; SGD: L2); β is HAM's own decay.
* ``α``, ``β`` are per param group (``alpha``, ``beta`` keys; :class:`HAM` uses
  ``ham_alpha``, ``ham_beta`` so they cannot clash with a base's own keys).
* Parameters of other dtypes than fp32 are computed on in fp32 and rounded once; the fused
  optimizers keep fp32 moments / momentum buffers whatever the parameter dtype.
"""
from __future__ import annotations

import math
from collections import defaultdict
from itertools import chain
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .init import splits_by_default
from .kernels.ham_api import HamExtras, HamHparams, HamTensors, adamw_scalars
from .kernels.ham_backends import check_backend_name, run_step

__all__ = ["HAM", "HAMAdamW", "HAMSGD", "ham_step"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ham_step(t: HamTensors, h: HamHparams, e: HamExtras = HamExtras(), *, backend: str = "auto",
             workspace: Optional[dict] = None) -> None:
    """Functional HAM step for one (device, dtype, param group) list: see
    :mod:`pilot_kernels.kernels.ham_api` for the fields and
    :func:`pilot_kernels.kernels.ham_reference.step` for the semantics."""
    run_step(t, h, e, backend, workspace)


def _takes_mirror(p: Tensor, ham: Union[str, bool]) -> bool:
    return splits_by_default(p) if ham == "auto" else bool(ham)


def _check_number(group: dict, name: str, low: float = 0.0, high: float = math.inf,
                  tensor_ok: bool = False) -> None:
    v = group[name]
    if isinstance(v, Tensor):
        if not tensor_ok or v.numel() != 1:
            raise ValueError(f"{name} must be a float{' or a one-element tensor' if tensor_ok else ''}, "
                             f"got a tensor of shape {tuple(v.shape)}")
        return  # a device value is not read on the host (no sync)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v < high:
        raise ValueError(f"{name} must be a number in [{low}, {high}), got {v!r}")


def _check_params(group: dict, key: str) -> None:
    for p in group["params"]:
        if p.dtype not in _DTYPES:
            raise TypeError(f"HAM steps float32, bfloat16 and float16 parameters, got {p.dtype}")
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise RuntimeError(f"{key} does not support sparse gradients; use dense gradients "
                               f"(e.g. nn.Embedding(sparse=False))")
        if g.shape != p.shape or not g.is_floating_point():
            raise RuntimeError(f"a gradient must be a float tensor of its parameter's shape "
                               f"{tuple(p.shape)}, got {g.dtype} {tuple(g.shape)}")


class _FusedHAM(Optimizer):
    """Shared machinery of :class:`HAMAdamW` and :class:`HAMSGD`: checks every group before
    anything changes, buckets tensors per (device, dtype, mirror on/off) and calls
    :func:`ham_step` once per bucket."""

    _STATE_KEYS: tuple = ()   # the base's buffers, kept in fp32

    def _check_group(self, group: dict) -> None:
        _check_number(group, "lr", tensor_ok=group["capturable"])
        _check_number(group, "alpha")
        _check_number(group, "beta")
        _check_number(group, "weight_decay")
        if group["ham"] not in ("auto", True, False):
            raise ValueError(f"ham must be 'auto', True or False, got {group['ham']!r}")
        check_backend_name(group["backend"])
        _check_params(group, type(self).__name__)

    def _hparams(self, group: dict) -> HamHparams:  # pragma: no cover - abstract
        raise NotImplementedError

    def _prepare(self, group: dict, ps: list, h: HamHparams) -> tuple:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One step of every group; ``closure`` re-evaluates the loss (as in torch.optim)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:          # every error before anything changes
            self._check_group(group)
        e = HamExtras(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        for group in self.param_groups:
            buckets = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    buckets[(p.device, p.dtype, _takes_mirror(p, group["ham"]))].append(p)
            h = self._hparams(group)
            for (_, _, mirror), ps in buckets.items():
                hb = h if mirror else h._replace(alpha=0.0, beta=0.0)
                for t, hs in self._prepare(group, ps, hb):
                    ham_step(t, hs, e, backend=group["backend"])
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, then the base's buffers back in fp32 (torch casts a
        loaded state tensor to its parameter's dtype; ours are fp32 whatever it is)."""
        saved = state_dict["state"]
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        super().load_state_dict(state_dict)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            for k in self._STATE_KEYS:
                if pid in saved and isinstance(saved[pid].get(k), Tensor):
                    self.state[p][k] = saved[pid][k].to(p.device, torch.float32, copy=True)


class HAMAdamW(_FusedHAM):
    r"""AdamW followed by HAM's mirror step, fused into one pass per (device, dtype) bucket.

    Per element, with ``g`` the gradient (unscaled, negated under ``maximize``)::

        θ ← θ · (1 − lr·wd)                                        (torch.optim.AdamW)
        m ← lerp(m, g, 1 − β1);   v ← β2·v + (1 − β2)·g²
        θ ← θ − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)
        θ ← θ · exp(clamp(−lr·(α·sign(θ)·g + β), −5, 5))            (HAM, ndim ≥ 2 only)

    Args:
        params: iterable of parameters or param groups.
        lr, betas, eps, weight_decay, maximize: as torch.optim.AdamW (same defaults).
        alpha (float): HAM's α, the gradient weight of the mirror step (default 200).
        beta (float): HAM's β, its decay (default 1e-3).
        ham ('auto' | bool): which tensors take the mirror step; ``'auto'``: ``ndim >= 2``.
        capturable (bool): ``lr`` may be a tensor and the step count lives on the
            parameters' device, so the step can be captured in a CUDA graph; AMP's
            ``grad_scale``/``found_inf`` are then handled inside the step.
        backend ('auto' | 'reference' | 'triton' | 'cpu'): see
            :mod:`pilot_kernels.kernels.ham_backends`.

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (torch.optim.AdamW's keys;
    the moments in fp32).
    """

    _STATE_KEYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-3, betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, alpha: float = 200.0,
                 beta: float = 1e-3, ham: Union[str, bool] = "auto", maximize: bool = False,
                 capturable: bool = False, backend: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha,
                        beta=beta, ham=ham, maximize=maximize, capturable=capturable,
                        backend=backend)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self._step_supports_amp_scaling = capturable

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        b1, b2 = group["betas"]
        for name, v in (("betas[0]", b1), ("betas[1]", b2)):
            _check_number({name: v}, name, 0.0, 1.0)
        _check_number(group, "eps")

    def _hparams(self, group: dict) -> HamHparams:
        b1, b2 = group["betas"]
        return HamHparams(base="adamw", lr=group["lr"], alpha=float(group["alpha"]),
                          beta=float(group["beta"]), maximize=bool(group["maximize"]),
                          weight_decay=float(group["weight_decay"]), beta1=float(b1),
                          beta2=float(b2), eps=float(group["eps"]))

    def _prepare(self, group: dict, ps: list, h: HamHparams):
        """Initialise state, count the step and yield ``(tensors, hparams)`` per call:
        one per step count (host counters), or one per tensor when the count lives on
        the device (capturable), whose scalars are then device tensors."""
        capturable = group["capturable"]
        found_inf = getattr(self, "found_inf", None)
        by_step = defaultdict(list)
        for p in ps:
            state = self.state[p]
            if not state:
                device = p.device if capturable else torch.device("cpu")
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            step = state["step"]
            if capturable:
                if found_inf is not None:    # a skipped step does not count
                    step.add_(found_inf.to(step.device).reshape(()).eq(0).float())
                else:
                    step.add_(1)
                by_step[id(p)].append((p, state, step))
            else:
                step.add_(1)
                by_step[int(step.item())].append((p, state, step))  # a CPU tensor: no sync
        for key, items in by_step.items():
            ps_ = [p for p, _, _ in items]
            step = items[0][2] if capturable else key
            decay, step_size, bc2 = adamw_scalars(h.lr, h.beta1, h.beta2, h.weight_decay, step)
            t = HamTensors(ps_, [p.grad for p in ps_], [s["exp_avg"] for _, s, _ in items],
                           [s["exp_avg_sq"] for _, s, _ in items])
            yield t, h._replace(decay=decay, step_size=step_size, bias_correction2_sqrt=bc2)


class HAMSGD(_FusedHAM):
    r"""SGD (momentum, dampening, nesterov, L2 weight decay) followed by HAM's mirror step,
    fused into one pass per (device, dtype) bucket.

    Per element, with ``g`` the gradient (unscaled, negated under ``maximize``)::

        d ← g + wd·θ;   b ← d (first step) or μ·b + (1 − τ)·d;   d ← d + μ·b (nesterov) or b
        θ ← θ − lr·d                                               (torch.optim.SGD)
        θ ← θ · exp(clamp(−lr·(α·sign(θ)·g + β), −5, 5))            (HAM, ndim ≥ 2 only)

    Args: ``lr, momentum, dampening, weight_decay, nesterov, maximize`` as
    torch.optim.SGD; ``alpha, beta, ham, capturable, backend`` as :class:`HAMAdamW`.
    State per parameter: ``momentum_buffer`` (fp32) when ``momentum != 0``.  Under AMP a
    skipped first step leaves the buffer zero, so the next step's ``μ·0 + (1 − τ)·d``
    equals torch's ``b = d`` whenever ``dampening`` is 0.
    """

    _STATE_KEYS = ("momentum_buffer",)

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 alpha: float = 200.0, beta: float = 1e-3, ham: Union[str, bool] = "auto",
                 maximize: bool = False, capturable: bool = False, backend: str = "auto"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, alpha=alpha, beta=beta, ham=ham, maximize=maximize,
                        capturable=capturable, backend=backend)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self._step_supports_amp_scaling = True

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        _check_number(group, "momentum")
        _check_number(group, "dampening")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")

    def _hparams(self, group: dict) -> HamHparams:
        return HamHparams(base="sgd", lr=group["lr"], alpha=float(group["alpha"]),
                          beta=float(group["beta"]), maximize=bool(group["maximize"]),
                          weight_decay=float(group["weight_decay"]),
                          momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                          nesterov=bool(group["nesterov"]))

    def _prepare(self, group: dict, ps: list, h: HamHparams):
        if h.momentum == 0:
            yield HamTensors(ps, [p.grad for p in ps]), h
            return
        firsts = []
        for p in ps:
            state = self.state[p]
            firsts.append(state.get("momentum_buffer") is None)
            if firsts[-1]:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32,
                                                            memory_format=torch.preserve_format)
        yield HamTensors(ps, [p.grad for p in ps], momentum_bufs=[self.state[p]["momentum_buffer"] for p in ps],
                         firsts=firsts), h


class HAM(Optimizer):
    r"""Wrap any torch optimizer with HAM's mirror step.

    ``step()`` runs ``base.step()`` and then, for every parameter that takes the mirror
    step (``ndim >= 2`` by default), one fused elementwise pass
    ``θ ← θ · exp(clamp(−lr·(α·sign(θ)·g + β), −5, 5))`` with the group's current ``lr``
    and the gradient the base step saw.  ``param_groups`` and ``state`` are the base's, so
    LR schedulers, ``state_dict`` and checkpoints work as for the base; HAM's settings
    ride along as the group keys ``ham_alpha``, ``ham_beta`` and ``ham``.

    The gradient must survive the base step.  torch's own optimizers leave ``.grad``
    alone except ``SGD(nesterov=True)`` on its multi-tensor path, which adds the
    momentum into it; for such a group HAM keeps a copy of the gradients
    (``grad_copy='auto'``), and after every step it checks each gradient's version
    counter and raises if an unforeseen base wrote into one (pass ``grad_copy=True``).

    AMP: HAM leaves ``_step_supports_amp_scaling`` unset, so torch's GradScaler unscales
    the gradients and skips the whole step (base and mirror) on inf/NaN itself.
    """

    def __init__(self, base: Optimizer, alpha: float = 200.0, beta: float = 1e-3, *,
                 ham: Union[str, bool] = "auto", grad_copy: Union[str, bool] = "auto",
                 backend: str = "auto"):
        if not isinstance(base, Optimizer):
            raise TypeError(f"HAM wraps a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, (HAM, _FusedHAM)):
            raise TypeError(f"{type(base).__name__} already takes HAM's mirror step")
        if grad_copy not in ("auto", True, False):
            raise ValueError(f"grad_copy must be 'auto', True or False, got {grad_copy!r}")
        check_backend_name(backend)
        for group in base.param_groups:
            group.setdefault("ham_alpha", alpha)
            group.setdefault("ham_beta", beta)
            group.setdefault("ham", ham)
            self._check_group(group)
        super().__init__([{"params": []}], dict(ham_alpha=alpha, ham_beta=beta, ham=ham))
        self.base = base
        self.grad_copy = grad_copy
        self.backend = backend
        self.defaults = {**base.defaults, **self.defaults}
        self.param_groups = base.param_groups
        self.state = base.state

    @staticmethod
    def _check_group(group: dict) -> None:
        _check_number(group, "ham_alpha")
        _check_number(group, "ham_beta")
        if group["ham"] not in ("auto", True, False):
            raise ValueError(f"ham must be 'auto', True or False, got {group['ham']!r}")
        _check_number({"lr": group["lr"]}, "lr", tensor_ok=True)
        _check_params(group, "HAM")

    def _copies_grad(self, group: dict) -> bool:
        if self.grad_copy != "auto":
            return bool(self.grad_copy)
        return (isinstance(self.base, torch.optim.SGD) and group.get("nesterov", False)
                and group.get("foreach") is not False)

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base"):          # Optimizer.__init__'s empty placeholder group
            return
        for k in ("ham_alpha", "ham_beta", "ham"):
            param_group.setdefault(k, self.defaults[k])
        self.base.add_param_group(param_group)      # fills in the base's defaults
        try:
            self._check_group(self.base.param_groups[-1])
        except Exception:
            self.base.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """``closure()`` (if given), ``base.step()``, then the mirror pass (per group, device
        and dtype).  The closure runs first, so the gradients the mirror step uses are the
        ones the base step sees; bases that need a closure inside their step (LBFGS) are
        not supported."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:        # every error before anything changes
            self._check_group(group)
        work = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None and _takes_mirror(p, group["ham"])]
            if self._copies_grad(group):
                grads = [p.grad.clone() for p in ps]
            else:
                grads = [p.grad for p in ps]
            work.append((group, ps, grads, [g._version for g in grads]))
        self.base.step()
        for group, ps, grads, versions in work:
            if any(g._version != v for g, v in zip(grads, versions)):
                raise RuntimeError(
                    f"{type(self.base).__name__}.step() wrote into .grad, so HAM's mirror step "
                    f"lost the gradient the base step saw (the base step has been taken, the "
                    f"mirror step has not); construct HAM(..., grad_copy=True)")
            h = HamHparams(base="none", lr=group["lr"], alpha=float(group["ham_alpha"]),
                           beta=float(group["ham_beta"]), maximize=bool(group.get("maximize", False)))
            if h.alpha == 0 and h.beta == 0:
                continue
            buckets = defaultdict(list)
            for p, g in zip(ps, grads):
                buckets[(p.device, p.dtype)].append((p, g))
            for items in buckets.values():
                ham_step(HamTensors([p for p, _ in items], [g for _, g in items]), h,
                         backend=self.backend)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base's ``state_dict`` (HAM's settings are in its param groups)."""
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def __repr__(self) -> str:
        return f"HAM({self.base!r})"
