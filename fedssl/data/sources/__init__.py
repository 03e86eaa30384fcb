"""Data sources, one module each; chosen by `data.source` in a recipe.

Each module exposes `load(cfg: DataConfig) -> SourceData`. Modules are imported only
when chosen, so a run on synthetic faces never imports an image decoder it does not use.
"""

from __future__ import annotations

import importlib

from fedssl.config.schema import DataConfig
from fedssl.data.dataset import SourceData
from fedssl.registry import did_you_mean
from fedssl.errors import UserError

SOURCE_MODULES = {
    "synthetic_faces": "synthetic_faces",
    "fer2013": "fer2013",
    "folder": "image_folder",
    "idx": "idx",
}


def load_source(cfg: DataConfig) -> SourceData:
    """Decode the source named by `cfg.source` into memory."""
    if cfg.source not in SOURCE_MODULES:
        raise UserError(
            f"data.source: unknown source {cfg.source!r}{did_you_mean(cfg.source, list(SOURCE_MODULES))}; "
            f"choose one of {', '.join(SOURCE_MODULES)}"
        )
    module = importlib.import_module(f"fedssl.data.sources.{SOURCE_MODULES[cfg.source]}")
    return module.load(cfg)
