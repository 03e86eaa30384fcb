"""Optional features and the pip extras that install them.

A base `pip install fedssl` trains, evaluates, personalizes and exports; a few
commands need more, declared as extras in pyproject.toml. Their modules import
the extra's packages through `require`, where the feature is used, so that every
fedssl module imports without them and a missing extra is one clear line.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fedssl.errors import UserError

__all__ = ["EXTRAS", "MissingExtra", "require"]

# extra -> (what it enables, the packages it installs, as imported)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "plots": ("PNG plots (fedssl data, fedssl compare)", ("matplotlib",)),
    "privacy": ("differential privacy (privacy.mechanism=central)", ("dp_accounting",)),
    "flower": ("the Flower backend (federation.backend=flower)", ("flwr",)),
    "onnx": ("ONNX export and prediction (--format onnx)", ("onnx", "onnxscript", "onnxruntime")),
    "ssl": ("self-supervised learning (algorithm.name=fedaffect)", ("lightly",)),
}


class MissingExtra(UserError, ImportError):
    """An optional feature's package is not installed: a user's error (one line, exit 2)
    that import machinery (pkgutil.walk_packages, test collectors) also sees as an ImportError."""


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import `module`, which the `extra` installs.

    Raises:
        MissingExtra: the module is not installed (or cannot be imported), naming the
            feature that needs it and the pip command that installs it.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        what = feature or EXTRAS[extra][0]
        raise MissingExtra(f"{what} needs {module.split('.')[0]}, which is not installed: "
                        f"pip install 'fedssl[{extra}]'") from None
