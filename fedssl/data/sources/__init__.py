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
    """Decode the source named by `cfg.source` into memory, once every name the `data`
    section chooses by is known to be right: a typo fails in a second, not after
    minutes of decoding."""
    from fedssl.data.federated import check_label_mode
    from fedssl.data.partition import check_scheme
    from fedssl.data.transforms import check_augmentation

    check_scheme(cfg.partition.scheme), check_label_mode(cfg.labels.mode), check_augmentation(cfg.augment)
    if cfg.source not in SOURCE_MODULES:
        raise UserError(
            f"data.source: unknown source {cfg.source!r}{did_you_mean(cfg.source, list(SOURCE_MODULES))}; "
            f"choose one of {', '.join(SOURCE_MODULES)}"
        )
    module = importlib.import_module(f"fedssl.data.sources.{SOURCE_MODULES[cfg.source]}")
    return module.load(cfg)
