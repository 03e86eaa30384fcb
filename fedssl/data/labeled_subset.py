"""A practitioner's own labeled images, for fine-tuning a federated model.

They come as a folder of class subfolders or a FER2013-style CSV, read by the same
sources a recipe uses (`fedssl.data.sources`), at the model's image size and
channels. Their labels are then put in the model's class order, matched by name:
a folder's classes are its sorted subfolder names, which is not FER2013's order
(angry, disgust, fear, happy, sad, surprise, neutral).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedssl.config.schema import DataConfig
from fedssl.data.dataset import ImageDataset, SourceData
from fedssl.errors import UserError

__all__ = ["load_labeled", "match_classes", "holdout_split", "minimum_samples"]

# The recipe keys the shared sources name in their messages, and the flags that
# set them here, so that an error points at what the user typed.
_FLAG_FOR_KEY = (("set data.skip_bad: true", "pass --skip-bad"), ("data.path", "--data"))


def load_labeled(path: str | Path, image_size: int, channels: int, skip_bad: bool = False) -> SourceData:
    """Decode the labeled images at `path`: a class-per-folder tree, or a CSV file
    with FER2013's columns (`emotion,pixels[,Usage]`).

    A tree split into train/ and test/ (or val/), or a CSV with a Usage column and
    test rows, comes back with its own `test` set.

    Raises:
        UserError: a missing path, or bad data (naming the file and the row or image).
    """
    from fedssl.data.sources import load_source

    path = Path(path)
    if not path.exists():
        raise UserError(f"--data: {path} does not exist (expected a folder of class subfolders or a FER2013-style CSV)")
    source = "folder" if path.is_dir() else "fer2013"
    cfg = DataConfig(source=source, path=str(path), image_size=image_size, channels=channels, skip_bad=skip_bad)
    try:
        return load_source(cfg)
    except UserError as error:
        message = str(error)
        for key, flag in _FLAG_FOR_KEY:
            message = message.replace(key, flag)
        raise UserError(message) from None


def match_classes(data: SourceData, model_classes: tuple[str, ...]) -> SourceData:
    """`data` relabelled in the model's class order, matched by name.

    Every class of the data must be one of the model's (compared without regard to
    case); the data may lack some of the model's classes, which the model keeps
    predicting.

    Raises:
        UserError: a class the model does not know, naming it.
    """
    names = data.train.class_names
    index = {name.lower(): i for i, name in enumerate(model_classes)}
    unknown = [name for name in names if name.lower() not in index]
    if unknown:
        raise UserError(
            f"--data has classes the checkpoint's model does not know: {', '.join(map(repr, unknown))} "
            f"(the data has {len(names)} classes, the model {len(model_classes)}: {', '.join(model_classes)})"
        )
    to_model = np.array([index[name.lower()] for name in names], dtype=np.int64)

    def relabel(dataset: ImageDataset | None) -> ImageDataset | None:
        if dataset is None:
            return None
        return replace(dataset, labels=to_model[dataset.labels], class_names=tuple(model_classes))

    return SourceData(train=relabel(data.train), test=relabel(data.test))


def minimum_samples(fraction: float) -> int:
    """The fewest images from which `holdout_split` can hold out `fraction` and keep
    at least one image on each side."""
    n = 2
    while not 1 <= _held_count(fraction, n) <= n - 1:
        n += 1
    return n


def holdout_split(data: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(fine-tuning, held-out) split of `data`, stratified by class.

    round(fraction * N) images are held out; each class gives its share, the
    rounding remainders going to the classes with the largest fractional parts
    (ties drawn at random), so that small classes are represented when they can be.

    Raises:
        UserError: `fraction` is not in (0, 1), or `data` has too few images to give
            both sides at least one (the message says how many are needed).
    """
    if not 0 < fraction < 1:
        raise UserError(f"--holdout: must be a fraction between 0 and 1 (exclusive), got {fraction}")
    n = len(data)
    held = _held_count(fraction, n)
    if not 1 <= held <= n - 1:
        raise UserError(
            f"--data: {n} labeled image{'s' if n != 1 else ''} are too few to hold out {fraction:.0%} for "
            f"evaluation and fine-tune on the rest; at least {minimum_samples(fraction)} are needed"
        )
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(data.labels, return_counts=True)
    quotas = fraction * counts
    per_class = np.floor(quotas).astype(np.int64)
    # Largest remainder first; the random key breaks ties between equal remainders.
    order = np.lexsort((rng.random(len(classes)), -(quotas - per_class)))
    per_class[order[: held - int(per_class.sum())]] += 1
    held_out = []
    for label, take in zip(classes, per_class):
        members = rng.permutation(np.flatnonzero(data.labels == label))
        held_out.extend(members[:take].tolist())
    is_held = np.zeros(n, dtype=bool)
    is_held[held_out] = True
    return data.subset(np.flatnonzero(~is_held)), data.subset(np.flatnonzero(is_held))


def _held_count(fraction: float, n: int) -> int:
    # Half rounds up (not Python's round-half-to-even), so the count is predictable.
    return math.floor(fraction * n + 0.5)
