r"""Which tensors PILoT should split: param groups that fit the model.

``PILoT(model.parameters(), reparam="auto")`` splits every tensor with ``ndim >= 2``.
For convolutional networks that is exactly the weights of the Conv and Linear layers,
but transformers hold other ``ndim >= 2`` tensors, and ``"auto"`` splits (and decays
with α, so sparsifies) them too:

=====================  ==========================================================
model                  also split by ``reparam="auto"``
=====================  ==========================================================
timm ViT / DeiT        ``pos_embed`` (1, N, D), ``cls_token`` and ``dist_token`` (1, 1, D)
Swin                   ``relative_position_bias_table``
GPT-2 (transformers)   ``wte`` (tied with ``lm_head``) and the position embedding ``wpe``
BERT (transformers)    word, position and token-type embeddings
=====================  ==========================================================

:func:`param_groups` splits only what is a weight matrix or filter bank, the way timm's
``param_groups_weight_decay`` decides what gets weight decay:

* split (``reparam=True``): the ``weight`` of every module that has one with
  ``ndim >= 2`` (``nn.Linear``, ``nn.Conv*d``, ``nn.Bilinear``, transformers' ``Conv1D``,
  custom linear layers) and ``nn.MultiheadAttention``'s packed projection weights;
  embedding tables (``nn.Embedding``, ``nn.EmbeddingBag``, and a weight tied to one, as a
  language model's head is) only with ``embeddings=True``;
* plain SGD (``reparam=False``): everything else (biases, norm weights, position
  embeddings, class/distillation tokens, relative position tables, embeddings by
  default), and every tensor the model names in ``no_weight_decay()`` or
  ``no_weight_decay_keywords()`` (timm's conventions, read from every submodule that has
  them, so a wrapped timm model counts) or that matches a pattern in ``skip``;
* weight decay λ as timm applies it: not on tensors with ``ndim <= 1``, biases or the
  tensors the model (or ``skip``) names; ``decay_1d=True`` decays biases and norms too
  (``torch.optim.SGD``'s own habit).

Example::

    >>> from pilot_kernels import PILoT, param_groups
    >>> opt = PILoT(param_groups(model), lr=0.1, momentum=0.9, alpha=1e-5, weight_decay=5e-5)
"""
from __future__ import annotations

import fnmatch
from typing import Any, Iterable

from torch import nn

__all__ = ["param_groups"]

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
# nn.MultiheadAttention keeps its input projections as bare parameters, not in a Linear.
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _excluded_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """Patterns from ``no_weight_decay()`` and keywords from ``no_weight_decay_keywords()``
    of the model and of every submodule (names made relative to ``model``)."""
    patterns: set[str] = set()
    keywords: set[str] = set()
    for prefix, module in model.named_modules():
        lead = f"{prefix}." if prefix else ""
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            patterns.update(lead + str(n) for n in fn())
        fn = getattr(module, "no_weight_decay_keywords", None)
        if callable(fn):
            keywords.update(str(k) for k in fn())
    return patterns, keywords


def param_groups(
    model: nn.Module,
    *,
    embeddings: bool = False,
    skip: Iterable[str] = (),
    decay_1d: bool = False,
) -> list[dict[str, Any]]:
    """Param groups for :class:`pilot_kernels.PILoT` that split only weight matrices and filters.

    Args:
        model (nn.Module): the model (a timm, torchvision or transformers model, or any).
        embeddings (bool): also split embedding tables (default False).  Position
            embeddings are ``nn.Embedding`` in GPT-2 and BERT: name them in ``skip``
            (e.g. ``skip=("*wpe*",)``) to keep them plain while splitting ``wte``.
        skip (Iterable[str]): ``fnmatch`` patterns of parameter names (as in
            ``model.named_parameters()``) to keep plain and undecayed, like the names
            a model returns from ``no_weight_decay()``.
        decay_1d (bool): give biases and norm weights weight decay too (default False,
            as timm and Hugging Face do).

    Returns:
        Up to three groups, empty ones left out: the split tensors
        (``reparam=True``), plain tensors with weight decay (``reparam=False``), and
        plain tensors without it (``reparam=False, weight_decay=0.0``).  Parameters with
        ``requires_grad=False`` are left out, as timm does.  Pass them to ``PILoT``; its
        own ``weight_decay`` and ``alpha`` apply where a group does not set them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"param_groups takes the model (an nn.Module), got {type(model).__name__}; "
            "pass the module whose parameters PILoT should train"
        )
    for flag, value in (("embeddings", embeddings), ("decay_1d", decay_1d)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if isinstance(skip, str):
        raise TypeError(f"skip takes a collection of name patterns, got the string {skip!r}; wrap it: ({skip!r},)")
    patterns, keywords = _excluded_names(model)
    patterns.update(skip)

    # Every owner of every parameter: a tied weight (lm_head = wte) has two.
    splittable: dict[int, bool] = {}
    embedding: dict[int, bool] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for leaf, p in module.named_parameters(recurse=False):
            key = id(p)
            is_weight = leaf == "weight" or (isinstance(module, nn.MultiheadAttention) and leaf in _MHA_WEIGHTS)
            splittable[key] = splittable.get(key, False) or (is_weight and p.ndim >= 2)
            embedding[key] = embedding.get(key, False) or isinstance(module, _EMBEDDINGS)

    split, plain_decay, plain_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = id(p)
        named = any(fnmatch.fnmatchcase(name, pat) for pat in patterns) or any(k in name for k in keywords)
        if splittable[key] and not named and (embeddings or not embedding[key]):
            split.append(p)
        elif named or (not decay_1d and (p.ndim <= 1 or name.endswith(".bias"))):
            plain_no_decay.append(p)
        else:
            plain_decay.append(p)

    groups = []
    if split:
        groups.append({"params": split, "reparam": True})
    if plain_decay:
        groups.append({"params": plain_decay, "reparam": False})
    if plain_no_decay:
        groups.append({"params": plain_no_decay, "reparam": False, "weight_decay": 0.0})
    return groups
