"""Checks of PILoT's hyperparameters and parameters: each raises naming the fix, before
anything changes."""
from __future__ import annotations

import math
from typing import Any, Iterable, Union

import torch
from torch import Tensor

from .init import splits_by_default
from .kernels import check_backend_name

REPARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Group keys the step reads; every one is checked when it changes.
HPARAM_KEYS = ("lr", "momentum", "dampening", "nesterov", "alpha", "beta", "weight_decay",
               "maximize", "reparam", "backend", "capturable", "adopt_writes")
_BOOL_KEYS = ("nesterov", "maximize", "capturable", "adopt_writes")


def check_value(group: dict, name: str, tensor_values: bool = True) -> None:
    """Raise naming the fix if ``group[name]`` is invalid.  ``lr`` and ``alpha`` may be
    one-element tensors, whose value is read only when ``tensor_values`` (a device
    tensor read is a host sync, which ``step`` avoids)."""
    v = group[name]
    if name in _BOOL_KEYS:
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


def check_hparams(group: dict, tensor_values: bool = True, names: Iterable[str] = HPARAM_KEYS) -> None:
    """Raise naming the fix for any invalid hyperparameter of ``group`` among ``names``."""
    for name in HPARAM_KEYS:
        if name not in group:
            raise KeyError(f"param group has no {name!r}; every PILoT group needs {HPARAM_KEYS}")
    for name in names:
        check_value(group, name, tensor_values)
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            "Nesterov momentum requires a momentum > 0 and zero dampening; "
            "set momentum > 0 and dampening=0, or nesterov=False"
        )


def hparam_key(group: dict) -> tuple:
    """The group's hyperparameters as a comparable key.  A tensor enters by identity (the
    key holds it, so its id cannot be reused): comparing it by value would be a sync."""
    return tuple((id(v), v) if isinstance(v, Tensor) else v for v in map(group.__getitem__, HPARAM_KEYS))


def sgd_hparams(group: dict) -> dict:
    """The group's hyperparameters that PILoT shares with torch.optim.SGD."""
    return {k: group[k] for k in ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")}


def wants_split(p: Tensor, reparam: Union[str, bool]) -> bool:
    return splits_by_default(p) if reparam == "auto" else bool(reparam)


def check_param(p: Any, reparam: bool) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"optimizer can only optimize Tensors, got {type(p).__name__}")
    if p.is_complex():
        raise TypeError(
            f"PILoT does not support complex parameters (got {p.dtype}); "
            "optimize torch.view_as_real(p) instead"
        )
    if not p.is_floating_point():
        raise TypeError(f"PILoT needs floating-point parameters, got {p.dtype}")
    if reparam and p.dtype not in REPARAM_DTYPES:
        raise TypeError(
            f"reparameterized tensors must be float32, bfloat16 or float16, got {p.dtype} "
            f"(shape {tuple(p.shape)}); convert the model (e.g. model.float()) or put the "
            "tensor in a group with reparam=False"
        )


def group_tensors(param_group: dict) -> list:
    """The tensors of a not-yet-added group (named or not), as torch will store them."""
    params = param_group["params"]
    if isinstance(params, Tensor):
        return [params]
    return [p[1] if isinstance(p, tuple) else p for p in params]


def sparse_error(p: Tensor) -> RuntimeError:
    return RuntimeError(
        f"PILoT does not support sparse gradients (a tensor of shape {tuple(p.shape)} has one), "
        "as torch.optim.SGD(fused=True) does not; use dense gradients "
        "(e.g. nn.Embedding(sparse=False)) or optimize that tensor with torch.optim.SGD"
    )


def dtype_error(x: Tensor) -> TypeError:
    return TypeError(
        f"a reparameterized parameter of shape {tuple(x.shape)} is now {x.dtype} "
        "(model.double()?); PILoT splits float32, bfloat16 or float16 tensors: "
        "convert the model back (e.g. model.float()), or build the optimizer "
        "with reparam=False for it"
    )
