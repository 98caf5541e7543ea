"""timm: ``create_optimizer_v2(model, opt="pilot")`` after :func:`register`.

Example (docs/frameworks.md's; ``tests/test_integrations.py`` runs it)::

    from timm.optim import create_optimizer_v2
    from pilot_kernels.integrations.timm import register

    register()  # once: adds "pilot" to timm's optimizer registry
    optimizer = create_optimizer_v2(model, opt="pilot", lr=0.1, weight_decay=5e-5, alpha=1e-4)

timm groups a model's parameters itself before it builds the optimizer (weight decay
off for biases, norms and the names in ``model.no_weight_decay()``, such as a ViT's
``pos_embed`` and ``cls_token``).  PILoT follows that grouping: the tensors timm keeps
out of weight decay are trained as plain SGD, the others are split (``reparam="auto"``),
and groups timm marks ``use_fallback`` (its hybrid-optimizer convention, e.g. with
``fallback_no_weight_decay=True``) are plain.  With ``weight_decay=0`` timm makes a
single group, so pass ``param_group_fn=pilot_kernels.param_groups`` to choose the tensors
by module type instead (this also works with any ``weight_decay``): groups that already
say ``reparam`` are taken as they are.
"""
from __future__ import annotations

from typing import Any, Iterable

from ..optimizer import PILoT

__all__ = ["register", "create"]

NAME = "pilot"


def create(params: Iterable[Any], **kwargs: Any) -> PILoT:
    """Build PILoT from the parameter groups timm made (see the module docstring)."""
    params = list(params)
    if params and all(isinstance(g, dict) for g in params):
        decayed = any(g.get("weight_decay", 0.0) for g in params)
        groups = []
        for g in params:
            g = dict(g)
            fallback = g.pop("use_fallback", False)
            # timm's no-weight-decay group, beside a decayed one: biases, norms and the
            # model's no_weight_decay() names, the tensors PILoT leaves to plain SGD.
            excluded = decayed and g.get("weight_decay", 0.0) == 0.0
            if "reparam" not in g and (fallback or excluded):
                g["reparam"] = False
            groups.append(g)
        params = groups
    return PILoT(params, **kwargs)


def register() -> None:
    """Add ``"pilot"`` to timm's optimizer registry (idempotent)."""
    from timm.optim import OptimInfo, get_optimizer_info
    from timm.optim._optim_factory import default_registry  # what create_optimizer_v2 reads

    try:
        get_optimizer_info(NAME)
        return
    except ValueError:
        pass
    default_registry.register(
        OptimInfo(
            name=NAME,
            opt_class=create,
            description="PILoT (Mask in the Mirror, ICLR 2025): sparsifying SGD on x = m ⊙ w",
            has_eps=False,
            has_momentum=True,
            has_betas=False,
        )
    )
