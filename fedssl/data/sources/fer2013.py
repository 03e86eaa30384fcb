"""FER2013 as distributed on Kaggle: one CSV file of 48x48 grayscale faces.

The header is ``emotion,pixels,Usage``. ``emotion`` is a class index 0..6 (angry,
disgust, fear, happy, sad, surprise, neutral), ``pixels`` holds 2304 space-separated
integers 0..255 in row-major order, and ``Usage`` is ``Training`` (the training pool),
``PublicTest`` or ``PrivateTest`` (both go to the test set). A file without a
``Usage`` column, such as Kaggle's ``train.csv``, is all training data.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from fedssl.config.schema import DataConfig
from fedssl.csvfile import brief, csv_rows
from fedssl.data.dataset import FER2013_CLASSES, ImageDataset, SourceData
from fedssl.errors import UserError

log = logging.getLogger("fedssl")

SIDE = 48
NUM_PIXELS = SIDE * SIDE
REQUIRED_COLUMNS = ("emotion", "pixels")
SPLITS = {"Training": "train", "PublicTest": "test", "PrivateTest": "test"}


class BadRow(ValueError):
    """One malformed row; the message says what is wrong with it."""


class Columns(NamedTuple):
    """Where the fields are in each row of one file."""

    emotion: int
    pixels: int
    usage: int | None  # None: the file has no Usage column, every row is training data
    width: int  # fields per row


def load(cfg: DataConfig) -> SourceData:
    """Read the FER2013 CSV at `cfg.path`.

    Args:
        cfg: the data section of a recipe; uses `path`, `image_size`, `channels`
            and `skip_bad`.

    Returns:
        The ``Training`` rows as `train` and the ``PublicTest``/``PrivateTest`` rows
        as `test` (None when the file has no test rows or no Usage column).

    Raises:
        UserError: the file is missing or malformed (the message names the line).
    """
    path = _csv_path(cfg.path)
    rows, columns, total, skipped = _read_csv(path, cfg.skip_bad)
    if skipped:
        log.warning("skipped %d of %d rows in %s (first: %s)", len(skipped), total, path, skipped[0])
    if not rows["train"]:
        what = "no usable rows" if columns.usage is None else "no usable Training rows"
        raise UserError(f"{path}: {what} ({total} data rows, {len(skipped)} skipped)")
    train = _dataset(rows["train"], cfg)
    test = _dataset(rows["test"], cfg) if rows["test"] else None
    return SourceData(train=train, test=test)


def _csv_path(text: str) -> Path:
    if not text:
        raise UserError("data.path is empty; set it to the FER2013 CSV file (e.g. fer2013.csv)")
    path = Path(text)
    if not path.exists():
        raise UserError(f"data.path: {path} does not exist (expected the FER2013 CSV file)")
    if not path.is_file():
        raise UserError(f"data.path: {path} is not a file (expected the FER2013 CSV file)")
    return path


def _read_csv(path: Path, skip_bad: bool) -> tuple[dict, Columns, int, list[str]]:
    """Parse every row of `path`.

    Returns:
        ``{"train": [(image, label), ...], "test": [...]}``, the file's columns, the
        number of data rows, and one problem per skipped row.

    Raises:
        UserError: a malformed file, or the first malformed row unless `skip_bad`.
    """
    rows = {"train": [], "test": []}
    skipped, total = [], 0
    lines = csv_rows(path, "the FER2013 CSV")
    _, header = next(lines, (0, None))
    columns = _header_columns(header, path)
    for line, row in lines:
        if not any(field.strip() for field in row):
            continue  # a blank line holds no sample
        total += 1
        try:
            image, label, split = parse_row(row, columns)
        except BadRow as e:
            problem = f"line {line}: {e}"
            if not skip_bad:
                raise UserError(f"{path}, {problem} (set data.skip_bad: true to skip bad rows)") from None
            skipped.append(problem)
            continue
        rows[split].append((image, label))
    return rows, columns, total, skipped


def _header_columns(header: list[str] | None, path: Path) -> Columns:
    """Column positions of emotion, pixels and (optional) Usage in `header`."""
    if not header:
        raise UserError(f"{path}: empty file, expected a header line 'emotion,pixels,Usage'")
    names = [name.strip() for name in header]
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        headerless = len(names) > 1 and names[0].isdigit()
        raise UserError(
            f"{path}, line 1: missing column(s) {', '.join(missing)}; "
            + ("it looks like a data row: the file has no header line 'emotion,pixels,Usage'" if headerless
               else f"the header has {', '.join(brief(name) for name in names)} (expected emotion,pixels[,Usage])")
        )
    usage = names.index("Usage") if "Usage" in names else None
    return Columns(names.index("emotion"), names.index("pixels"), usage, len(names))


def parse_row(row: list[str], columns: Columns) -> tuple[np.ndarray, int, str]:
    """Decode one CSV row.

    Args:
        row: the fields of the row.
        columns: what `_header_columns` returned for the file.

    Returns:
        The 48x48 uint8 image, the label and the split ("train" or "test").

    Raises:
        BadRow: the row is malformed.
    """
    if len(row) != columns.width:
        raise BadRow(f"{len(row)} fields, expected {columns.width}")
    label = _parse_label(row[columns.emotion])
    pixels = parse_pixels(row[columns.pixels])
    if columns.usage is None:
        return pixels, label, "train"
    value = row[columns.usage].strip()
    if value not in SPLITS:
        raise BadRow(f"Usage {brief(value)} is not one of {', '.join(SPLITS)}")
    return pixels, label, SPLITS[value]


def _parse_label(text: str) -> int:
    try:
        label = int(text)
    except ValueError:
        raise BadRow(f"emotion {brief(text.strip())} is not an integer") from None
    if not 0 <= label < len(FER2013_CLASSES):
        raise BadRow(f"emotion {label} is out of range 0..{len(FER2013_CLASSES) - 1}")
    return label


def parse_pixels(text: str) -> np.ndarray:
    """The 48x48 uint8 image in a ``pixels`` field; BadRow if it is malformed."""
    # np.fromstring's text mode is the fast path: str.split + int takes several
    # times longer on the full file. Older numpy only warns and returns a partial
    # array on a bad token, so that warning is made an error.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            values = np.fromstring(text, dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning):
        values = None
    if values is None or len(values) != NUM_PIXELS or values.min() < 0 or values.max() > 255:
        values = _parse_pixels_slowly(text)  # says exactly what is wrong
    return values.astype(np.uint8).reshape(SIDE, SIDE)


def _parse_pixels_slowly(text: str) -> np.ndarray:
    """Token by token, to say which token is wrong or how many there are.

    Raises:
        BadRow: a token is not an integer or is outside 0..255, or the count is wrong.
    """
    tokens = text.split()
    values = []
    for i, token in enumerate(tokens, 1):
        try:
            value = int(token)
        except ValueError:
            raise BadRow(f"pixel {i} is {token!r}, not an integer") from None
        if not 0 <= value <= 255:  # before numpy sees it: it may not fit in int64
            raise BadRow(f"pixel {i} is {value}, outside 0..255")
        values.append(value)
    if len(values) != NUM_PIXELS:
        raise BadRow(f"{len(values)} pixels, expected {NUM_PIXELS}")
    return np.asarray(values, dtype=np.int64)


def _dataset(rows: list[tuple[np.ndarray, int]], cfg: DataConfig) -> ImageDataset:
    """Stack 48x48 gray images, resized to `cfg.image_size`, with `cfg.channels`."""
    gray = np.stack([image for image, _ in rows])
    if cfg.image_size != SIDE:
        size = (cfg.image_size, cfg.image_size)
        gray = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BILINEAR)) for im in gray])
    images = np.repeat(gray[..., None], cfg.channels, axis=-1)  # gray -> RGB repeats the plane
    labels = np.array([label for _, label in rows], dtype=np.int64)
    return ImageDataset(images=images, labels=labels, class_names=FER2013_CLASSES)
