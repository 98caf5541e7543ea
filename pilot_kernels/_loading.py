"""What :meth:`PILoT.load_state_dict` loads: the state and param groups a state dict
describes, built and checked without touching the optimizer (so a state dict that does
not fit raises a ValueError naming the mismatch and changes nothing).  The factors and
their momenta stay fp32 whatever the parameters' dtype; everything else is cast as
``torch.optim.Optimizer.load_state_dict`` casts it."""
from __future__ import annotations

from collections import defaultdict
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._checks import check_hparams
from .dtensor import DTensor
from .dtensor import local as _local

_FACTOR_KEYS = ("m", "w")
_MOMENTUM_KEYS = ("momentum_m", "momentum_w")
_SGD_MOMENTUM_KEY = "momentum_buffer"
_STARTED = "momentum_started"


def loaded_state(opt: Any, state_dict: dict[str, Any]) -> tuple:
    """The state and param groups ``state_dict`` describes, built without touching
    the optimizer; raises a ValueError naming the mismatch."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError("an optimizer state_dict is a dict with 'state' and 'param_groups'; "
                         "pass the dict opt.state_dict() returned")
    groups, saved_groups = opt.param_groups, deepcopy(state_dict["param_groups"])
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
        new = {**opt.defaults, **sg, "params": g["params"]}  # missing keys: our defaults
        if "param_names" in g and "param_names" not in sg:
            new["param_names"] = g["param_names"]
        try:
            check_hparams(new)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"param group {i} of the state_dict is invalid: {e}") from e
        new_groups.append(new)

    state: defaultdict = defaultdict(dict)
    for key, saved in state_dict["state"].items():
        if key in id_map:
            p = id_map[key]
            state[p] = _tensor_state(opt, key, p, saved, state_dict["param_groups"])
        elif isinstance(key, int):
            raise ValueError(
                f"state_dict has state for tensor id {key}, which none of its param "
                "groups lists; the state_dict is damaged or from another optimizer"
            )
        else:
            state[key] = saved  # not a parameter's state: kept as is, as torch does
    for new in new_groups:
        for p in new["params"]:
            if p not in state and opt.is_reparameterized(opt.state.get(p, {})):
                raise ValueError(
                    f"state_dict has no state for a reparameterized tensor of shape "
                    f"{tuple(p.shape)}; it needs at least 'm' and 'w'"
                )
            if new["momentum"] != 0 and _STARTED not in state[p]:
                opt._init_momentum(p, state[p])  # as when a tensor is added
        if new["capturable"]:
            opt._hparams_to_device(new)
    return state, new_groups

def _tensor_state(opt: Any, pid: Any, p: Tensor, saved: Any, saved_groups: list) -> dict:
    if not isinstance(saved, dict):
        raise ValueError(f"state of tensor {pid} must be a dict, got {type(saved).__name__}")
    ours_now = opt.is_reparameterized(opt.state.get(p, {}))
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
