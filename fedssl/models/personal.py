"""Which arrays of a model stay on the client: by name pattern, the classifier head,
or the normalization layers.

Names are `model.state_dict()` keys, buffers included, because FedBN keeps a
BatchNorm's running statistics local along with its affine weights.
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

from torch import nn

from fedssl.errors import UserError
from fedssl.models.split import head_parameter_names

# Normalization layers (FedBN): BatchNorm and InstanceNorm (_NormBase), LayerNorm,
# GroupNorm, and timm's subclasses of these (BatchNormAct2d, LayerNorm2d, ...).
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)

PATTERNS_KEY = "algorithm.personal.patterns"


def select_arrays(model: nn.Module, patterns: Sequence[str], key: str = PATTERNS_KEY) -> list[str]:
    """State-dict names matching any of the fnmatch `patterns`, in state_dict order.

    Raises:
        UserError: a pattern matches nothing (naming `key` and the pattern).
    """
    names = list(model.state_dict())
    selected: set[str] = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            example = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise UserError(f"{key}: pattern {pattern!r} matches no array of {type(model).__name__} "
                            f"(its arrays are named like {example})")
        selected.update(matched)
    return [n for n in names if n in selected]


def head_array_names(model: nn.Module) -> list[str]:
    """The classifier's names (timm's `get_classifier()`; FedPer's and FedRep's default)."""
    return head_parameter_names(model)


def norm_array_names(model: nn.Module) -> list[str]:
    """Every array (affine weights and running statistics) of the model's normalization layers."""
    prefixes = [name for name, module in model.named_modules() if isinstance(module, NORM_TYPES)]
    names = list(model.state_dict())
    return [n for n in names if n.rsplit(".", 1)[0] in prefixes]
