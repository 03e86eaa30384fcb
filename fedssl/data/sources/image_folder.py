"""A class-per-folder image tree, as AffectNet, CK+, JAFFE or RAF-DB are often exported.

Two layouts are read::

    root/<class_name>/<image>                     everything is the training pool
    root/train/<class_name>/<image>               train/ is the training pool,
    root/test/<class_name>/<image>                test/ (or val/) the test set

Class names are the sorted subfolder names; images may sit in nested folders below
their class folder. PNG, JPEG, BMP, GIF (first frame), TIFF and WebP files of any size
and mode are read with Pillow, converted to `channels` and stretched to
`image_size` x `image_size`. Names starting with '.' are ignored; other files are
counted and reported, not loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fedssl.config.schema import DataConfig
from fedssl.data.dataset import ImageDataset, SourceData
from fedssl.errors import UserError

log = logging.getLogger("fedssl")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TEST_FOLDERS = ("test", "val")  # in order of preference


def load(cfg: DataConfig) -> SourceData:
    """Read the image tree under `cfg.path`.

    Args:
        cfg: the data section of a recipe; uses `path`, `image_size`, `channels`
            and `skip_bad`.

    Returns:
        The training pool and, for a pre-split tree, the test set (else None).

    Raises:
        UserError: a missing root, no or empty class folders, mismatched train/test
            classes, or an unreadable image (unless `skip_bad`).
    """
    root = _root(cfg.path)
    train_dir, test_dir = split_folders(root)
    if test_dir is None:
        return SourceData(train=_load_tree(root, cfg))
    train_classes, test_classes = class_folders(train_dir), class_folders(test_dir)
    if [p.name for p in train_classes] != [p.name for p in test_classes]:
        raise UserError(
            f"data.path: the class folders of {train_dir} ({', '.join(p.name for p in train_classes)}) and "
            f"{test_dir} ({', '.join(p.name for p in test_classes)}) differ; they must hold the same classes"
        )
    return SourceData(train=_load_tree(train_dir, cfg), test=_load_tree(test_dir, cfg))


def _root(text: str) -> Path:
    if not text:
        raise UserError("data.path is empty; set it to the folder that holds one subfolder per class")
    root = Path(text)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise UserError(f"data.path: {root} {what} (expected a folder with one subfolder per class)")
    return root


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def split_folders(root: Path) -> tuple[Path, Path | None]:
    """(train, test) folders of a pre-split tree, or (root, None) for a plain tree."""
    folders = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir() and _visible(p)}
    test_name = next((name for name in TEST_FOLDERS if name in folders), None)
    if "train" not in folders or test_name is None:
        return root, None
    unused = [p for p in sorted(root.iterdir()) if _visible(p) and p not in (folders["train"], folders[test_name])]
    if unused:
        # A val/ beside test/, or a stray folder or file: say so rather than drop it unseen.
        log.warning("%s is split into train/ and %s/; not loading %s", root, test_name, ", ".join(map(str, unused)))
    return folders["train"], folders[test_name]


def class_folders(root: Path) -> list[Path]:
    """The class subfolders of `root`, sorted by name; UserError if there are none."""
    classes = sorted((p for p in root.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)
    if not classes:
        raise UserError(f"data.path: {root} has no class subfolders (expected {root}/<class_name>/<image>.png)")
    return classes


def _image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(images, other files) under `folder`, recursively, skipping hidden names."""
    images, others = [], []
    for path in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if hidden or not path.is_file():
            continue
        (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return images, others


def _load_tree(root: Path, cfg: DataConfig) -> ImageDataset:
    """Decode every image under `root`'s class folders."""
    classes = class_folders(root)
    images, labels, skipped, total = [], [], [], 0
    # Files beside the class folders have no class: report them with the rest.
    others = [p for p in sorted(root.iterdir()) if p.is_file() and _visible(p)]
    for label, folder in enumerate(classes):
        files, not_images = _image_files(folder)
        others += not_images
        if not files:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise UserError(f"data.path: class folder {folder} holds no images ({extensions})")
        total += len(files)
        for path in files:
            try:
                images.append(read_image(path, cfg.image_size, cfg.channels))
            except BadImage as e:
                if not cfg.skip_bad:
                    hint = "set data.skip_bad: true to skip bad images"
                    raise UserError(f"{path}: unreadable image ({e}); {hint}") from None
                skipped.append(f"{path}: {e}")
                continue
            labels.append(label)
    if others:
        log.warning(
            "not loading %d files under %s that are not images in a class folder (e.g. %s)",
            len(others),
            root,
            others[0],
        )
    if skipped:
        log.warning("skipped %d of %d images under %s (first: %s)", len(skipped), total, root, skipped[0])
    if not images:
        raise UserError(f"data.path: no readable images under {root} ({len(skipped)} skipped)")
    return ImageDataset(
        images=np.stack(images),
        labels=np.array(labels, dtype=np.int64),
        class_names=tuple(p.name for p in classes),
    )


class BadImage(ValueError):
    """An image file Pillow cannot decode."""


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode one image file.

    Args:
        path: the image file.
        size: output side length; the image is stretched to size x size.
        channels: 1 (grayscale) or 3 (RGB).

    Returns:
        uint8 array of shape (size, size, channels).

    Raises:
        BadImage: the file is corrupt, truncated or not an image.
    """
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as file:
            # A JPEG can be decoded at 1/2..1/8 scale; big photos load much faster.
            file.draft(mode, (size, size))
            file.load()
            upright = ImageOps.exif_transpose(file)  # phone JPEGs store rotation in EXIF
            image = _to_8bit(upright).convert(mode)
    except UnidentifiedImageError:  # its message repeats the path
        raise BadImage("not an image format Pillow recognizes") from None
    # Pillow's decoders raise many exception types on corrupt data (OSError,
    # SyntaxError, struct.error, DecompressionBombError, ...), all meaning "bad file".
    except Exception as e:
        raise BadImage(str(e) or type(e).__name__) from None
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).reshape(size, size, channels)


def _to_8bit(im: Image.Image) -> Image.Image:
    """`im` in a mode that converts to L/RGB without losing its range or alpha."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # Pillow clips these to 0..255 when converting to L, so a 16-bit scan would be
        # almost all white: scale 16-bit values down (wider ones by their maximum).
        values = np.asarray(im, dtype=np.float64)
        top = 255.0 if values.max() <= 255 else 65535.0 if values.max() <= 65535 else values.max()
        return Image.fromarray(np.rint(np.clip(values / top * 255.0, 0, 255)).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        # Transparent pixels become white rather than whatever colour they hide.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im
