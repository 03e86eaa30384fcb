"""Which parameters are the classifier "head" and which the shared "body".

Personalized FL methods split a model this way: FedPer/FedRep/LG-FedAvg keep the
head (or the body) local, FedBN keeps normalization layers local (by name
pattern). Names are those of `model.named_parameters()`, so they index a state dict
or an optimizer's parameter groups directly.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

from torch import nn

from fedssl.errors import UserError

__all__ = ["head_parameter_names", "split_body_head", "select_parameters"]


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the classifier's parameters, in `named_parameters()` order.

    The classifier is the module `model.get_classifier()` returns (timm's interface;
    a tuple of modules, e.g. DeiT's two heads, counts as one head). Without
    `get_classifier`, the module(s) named by `model.pretrained_cfg['classifier']`.
    An Identity classifier (after `reset_classifier(0)`) gives an empty list.

    Raises:
        UserError: the model has neither, so its head is unknown.
    """
    modules = _classifier_modules(model)
    ids = {id(p) for module in modules for p in module.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def split_body_head(model: nn.Module) -> tuple[list[str], list[str]]:
    """(body names, head names): disjoint, and together all of `named_parameters()`."""
    head = set(head_parameter_names(model))
    names = [name for name, _ in model.named_parameters()]
    return [n for n in names if n not in head], [n for n in names if n in head]


def select_parameters(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of the parameters matching any of the fnmatch `patterns` (case-sensitive).

    E.g. `["bn*", "*.bn*"]` for FedBN, `["fc.*"]` for a head. In `named_parameters()`
    order.

    Raises:
        UserError: a pattern matches no parameter (it names the pattern).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [name for name, _ in model.named_parameters()]
    selected: set[str] = set()
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            example = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise UserError(
                f"parameter pattern {pattern!r} matches no parameter of {type(model).__name__} "
                f"(its parameters are named like {example})"
            )
        selected.update(matched)
    return [n for n in names if n in selected]


def _classifier_modules(model: nn.Module) -> list[nn.Module]:
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        found = list(classifier) if isinstance(classifier, (tuple, list)) else [classifier]
        if all(isinstance(m, nn.Module) for m in found):
            return found
    names = getattr(model, "pretrained_cfg", None) or {}
    names = names.get("classifier") if isinstance(names, dict) else None
    if names:
        names = (names,) if isinstance(names, str) else tuple(names)
        try:
            return [model.get_submodule(n) for n in names]
        except AttributeError as e:
            raise UserError(f"{type(model).__name__}: its classifier {names} is not a submodule: {e}") from e
    raise UserError(
        f"{type(model).__name__} has no get_classifier() and no pretrained_cfg['classifier']; "
        "name its personal layers by pattern instead"
    )
