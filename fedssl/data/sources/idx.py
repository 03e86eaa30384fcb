"""MNIST-format IDX files, as MNIST and Fashion-MNIST are distributed.

`path` is a folder holding the four standard files, each optionally gzipped::

    train-images-idx3-ubyte[.gz]    train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]     t10k-labels-idx1-ubyte[.gz]

This is the layout of Debian's ``dataset-fashion-mnist`` package
(/usr/share/datasets/fashion-mnist, all four gzipped). An IDX file is a big-endian
magic number (two zero bytes, the type code 0x08 for unsigned bytes, the number of
dimensions), one 4-byte size per dimension, then the values. The train files are
the training pool and the t10k files the test set.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fedssl.config.schema import DataConfig
from fedssl.data.dataset import ImageDataset, SourceData
from fedssl.errors import UserError

log = logging.getLogger("fedssl")

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
UNSIGNED_BYTE = 0x08
# In label order, as in Fashion-MNIST's README.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def load(cfg: DataConfig) -> SourceData:
    """Read the train and t10k IDX files in the folder `cfg.path`.

    Args:
        cfg: the data section of a recipe; uses `path`, `image_size`, `channels`
            and `skip_bad`.

    Returns:
        The train files as `train` and the t10k files as `test`. Class names are
        Fashion-MNIST's when the path mentions "fashion", else "0", "1", ...

    Raises:
        UserError: a missing, truncated or malformed file, image and label counts
            that differ, or a label out of range (unless `skip_bad`).
    """
    folder = _folder(cfg.path)
    paths = find_files(folder)
    splits = {split: _read_split(*paths[split]) for split in FILES}
    is_fashion = "fashion" in cfg.path.lower() or "fashion" in str(folder.resolve()).lower()
    if is_fashion:
        names = FASHION_MNIST_CLASSES
    else:
        top = max(int(labels.max(initial=0)) for _, labels in splits.values())
        names = tuple(str(i) for i in range(max(10, top + 1)))
    return SourceData(
        train=_dataset(*splits["train"], paths["train"][1], names, cfg),
        test=_dataset(*splits["test"], paths["test"][1], names, cfg),
    )


def _folder(text: str) -> Path:
    if not text:
        example = "/usr/share/datasets/fashion-mnist"
        raise UserError(f"data.path is empty; set it to the folder of IDX files (e.g. {example})")
    folder = Path(text)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"data.path: {folder} {what} (expected the folder of train-*/t10k-* IDX files)")
    return folder


def find_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """{"train": (images, labels), "test": (images, labels)} paths in `folder`.

    Raises:
        UserError: naming every standard file found neither plain nor gzipped.
    """
    found, missing = {}, []
    for names in FILES.values():
        for name in names:
            # The plain file wins over the .gz: it needs no decompressing.
            path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
            found[name] = path
            if path is None:
                missing.append(f"{name}[.gz]")
    if missing:
        entries = sorted(p.name for p in folder.iterdir())
        present = ", ".join(entries[:8]) + (f", ... ({len(entries)} in all)" if len(entries) > 8 else "") or "nothing"
        raise UserError(
            f"data.path: {folder} lacks {', '.join(missing)}; the idx source needs both the train and the "
            f"t10k images and labels (the folder holds: {present})"
        )
    return {split: (found[images], found[labels]) for split, (images, labels) in FILES.items()}


def _read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = parse_idx(_read_bytes(images_path), 3, images_path)
    labels = parse_idx(_read_bytes(labels_path), 1, labels_path)
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if not len(images):
        raise UserError(f"{images_path}: holds no images")
    return images, labels


def _read_bytes(path: Path) -> bytes:
    """The content of `path`, decompressed if it is named .gz."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise UserError(f"{path}: corrupt or truncated gzip file ({e})") from None


def parse_idx(data: bytes, ndim: int, path: Path) -> np.ndarray:
    """The unsigned-byte array with `ndim` dimensions stored in IDX `data`.

    Args:
        data: the (decompressed) file content.
        ndim: dimensions the file must have: 3 for images, 1 for labels.
        path: the file, for error messages.

    Raises:
        UserError: a bad magic number, a truncated file or trailing bytes.
    """
    header = 4 + 4 * ndim
    expected_magic = UNSIGNED_BYTE << 8 | ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated: {len(data)} bytes, shorter than the {header}-byte IDX header")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        hint = "; it is gzip-compressed, so name it with .gz" if data[:2] == b"\x1f\x8b" else ""
        raise UserError(f"{path}: bad magic number 0x{magic:08X}, expected 0x{expected_magic:08X}{hint}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    shape = "x".join(map(str, dims))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes"
        raise UserError(
            f"{path}: {what}: expected {expected} bytes ({header}-byte header + {shape} values), found {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _dataset(
    images: np.ndarray, labels: np.ndarray, labels_path: Path, names: tuple[str, ...], cfg: DataConfig
) -> ImageDataset:
    """Drop (with skip_bad) or reject out-of-range labels, then resize and add channels."""
    bad = np.flatnonzero(labels >= len(names))
    if len(bad):
        first = f"item {bad[0] + 1}: label {labels[bad[0]]}, outside 0..{len(names) - 1}"
        if not cfg.skip_bad:
            raise UserError(f"{labels_path}, {first} (set data.skip_bad: true to skip bad items)")
        log.warning("skipped %d of %d items in %s (first: %s)", len(bad), len(labels), labels_path, first)
        keep = labels < len(names)
        images, labels = images[keep], labels[keep]
        if not len(labels):
            raise UserError(f"{labels_path}: every label is outside 0..{len(names) - 1}")
    if images.shape[1:] != (cfg.image_size, cfg.image_size):
        size = (cfg.image_size, cfg.image_size)
        images = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BILINEAR)) for im in images])
    return ImageDataset(
        images=np.repeat(images[..., None], cfg.channels, axis=-1),  # gray -> RGB repeats the plane
        labels=labels.astype(np.int64),
        class_names=names,
    )
