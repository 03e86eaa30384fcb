"""The fer2013, image-folder and IDX loaders, on small files written by each test."""

from __future__ import annotations

import gzip
import logging
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from fedssl.config.schema import DataConfig
from fedssl.data.dataset import FER2013_CLASSES
from fedssl.data.sources import fer2013, idx, image_folder
from fedssl.errors import UserError

FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def cfg(source: str, path, **kwargs) -> DataConfig:
    kwargs.setdefault("image_size", 48)
    kwargs.setdefault("channels", 1)
    return DataConfig(source=source, path=str(path), **kwargs)


# ----------------------------------------------------------------------------- FER2013


def pixels(value: int = 0, count: int = 48 * 48) -> str:
    return " ".join(str((value + i) % 256) for i in range(count))


def write_csv(path: Path, rows: list[str], header: str = "emotion,pixels,Usage") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture
def fer_csv(tmp_path) -> Path:
    return write_csv(
        tmp_path / "fer2013.csv",
        [
            f"0,{pixels(0)},Training",
            f"3,{pixels(1)},Training",
            f"6,{pixels(2)},Training",
            f"5,{pixels(3)},PublicTest",
            f"1,{pixels(4)},PrivateTest",
        ],
    )


def test_fer2013_splits_by_usage(fer_csv):
    data = fer2013.load(cfg("fer2013", fer_csv))
    assert data.train.images.shape == (3, 48, 48, 1) and data.train.images.dtype == np.uint8
    assert data.train.labels.tolist() == [0, 3, 6] and data.train.labels.dtype == np.int64
    assert data.test.labels.tolist() == [5, 1]
    assert data.train.class_names == FER2013_CLASSES
    expected = (np.arange(48 * 48) + 1) % 256
    assert (data.train.images[1, ..., 0].ravel() == expected).all()  # row-major, unchanged


def test_fer2013_without_usage_column_is_all_training(tmp_path):
    path = write_csv(tmp_path / "train.csv", [f"2,{pixels()}", f"4,{pixels()}"], header="emotion,pixels")
    data = fer2013.load(cfg("fer2013", path))
    assert len(data.train) == 2 and data.test is None


def test_fer2013_resizes_and_replicates_gray(fer_csv):
    data = fer2013.load(cfg("fer2013", fer_csv, image_size=32, channels=3))
    assert data.train.images.shape == (3, 32, 32, 3) and data.test.images.shape == (2, 32, 32, 3)
    assert (data.train.images[..., 0] == data.train.images[..., 2]).all()


@pytest.mark.parametrize(
    "row, problem",
    [
        (f"0,{pixels(count=2303)},Training", "line 3: 2303 pixels, expected 2304"),
        (f"0,{pixels(count=2305)},Training", "line 3: 2305 pixels, expected 2304"),
        (f"0,{pixels()} x,Training", "line 3: pixel 2305 is 'x', not an integer"),
        (f"0,7 {pixels(count=2303)},Training".replace("7 0", "7 1.5", 1), "line 3: pixel 2 is '1.5', not an integer"),
        (f"0,256 {pixels(count=2303)},Training", "line 3: pixel 1 is 256, outside 0..255"),
        (f"0,-1 {pixels(count=2303)},Training", "line 3: pixel 1 is -1, outside 0..255"),
        (f"7,{pixels()},Training", "line 3: emotion 7 is out of range 0..6"),
        (f"-1,{pixels()},Training", "line 3: emotion -1 is out of range 0..6"),
        (f"happy,{pixels()},Training", "line 3: emotion 'happy' is not an integer"),
        (f"0,{pixels()},Validation", "line 3: Usage 'Validation' is not one of Training, PublicTest, PrivateTest"),
        (f"0,{pixels()}", "line 3: 2 fields, expected 3"),
    ],
)
def test_fer2013_malformed_row_names_file_and_line(tmp_path, row, problem):
    path = write_csv(tmp_path / "data.csv", [f"0,{pixels()},Training", row, f"1,{pixels()},Training"])
    with pytest.raises(UserError) as e:
        fer2013.load(cfg("fer2013", path))
    assert str(path) in str(e.value) and problem in str(e.value)


def test_fer2013_line_numbers_count_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(f"emotion,pixels,Usage\r\n0,{pixels()},Training\r\n\r\n9,{pixels()},Training\r\n".encode())
    with pytest.raises(UserError, match="line 4: emotion 9"):
        fer2013.load(cfg("fer2013", path))


def test_fer2013_skip_bad_skips_and_reports(tmp_path, caplog):
    rows = [f"{i % 7},{pixels(i)},Training" for i in range(6)]
    rows[1] = f"0,{pixels(count=2000)},Training"  # line 3
    rows[4] = f"8,{pixels()},Training"  # line 6
    path = write_csv(tmp_path / "data.csv", rows)
    with caplog.at_level(logging.WARNING, logger="fedssl"):
        data = fer2013.load(cfg("fer2013", path, skip_bad=True))
    assert data.train.labels.tolist() == [0, 2, 3, 5]
    assert f"skipped 2 of 6 rows in {path} (first: line 3: 2000 pixels, expected 2304)" in caplog.text


def test_fer2013_skip_bad_with_nothing_left_raises(tmp_path):
    path = write_csv(tmp_path / "data.csv", [f"9,{pixels()},Training"])
    with pytest.raises(UserError, match="no usable Training rows"):
        fer2013.load(cfg("fer2013", path, skip_bad=True))


def test_fer2013_missing_columns_are_named(tmp_path):
    path = write_csv(tmp_path / "data.csv", [f"0,{pixels()}"], header="label,pixels")
    expected = f"{path}, line 1: missing column(s) emotion; the header has 'label', 'pixels'"
    with pytest.raises(UserError, match=re.escape(expected)):
        fer2013.load(cfg("fer2013", path))


def test_fer2013_without_a_header_says_so_in_a_short_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(f"0,{pixels()},Training\n3,{pixels()},Training\n")
    with pytest.raises(UserError, match="looks like a data row: the file has no header") as error:
        fer2013.load(cfg("fer2013", path))
    assert len(str(error.value)) < 200 + len(str(path))  # not the row's 2,304 pixels


def test_fer2013_missing_or_empty_path(tmp_path):
    with pytest.raises(UserError, match=r"data\.path: .*nope\.csv does not exist"):
        fer2013.load(cfg("fer2013", tmp_path / "nope.csv"))
    with pytest.raises(UserError, match=r"data\.path is empty"):
        fer2013.load(cfg("fer2013", ""))
    with pytest.raises(UserError, match=r"is not a file"):
        fer2013.load(cfg("fer2013", tmp_path))


# ------------------------------------------------------------------------ image folder


def save(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), value=128) -> Path:
    """Write a solid image of `mode` and (width, height) `size`; format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    """Two classes, with every supported format and a variety of sizes and modes."""
    root = tmp_path / "faces"
    save(root / "happy" / "a.png", "L", (48, 48), 200)
    save(root / "happy" / "b.JPG", "RGB", (120, 90), (255, 0, 0))
    save(root / "happy" / "nested" / "c.bmp", "P", (17, 33), 3)
    save(root / "sad" / "d.gif", "L", (64, 64), 10)
    save(root / "sad" / "e.tiff", "RGB", (30, 30), (0, 0, 255))
    save(root / "sad" / "f.jpeg", "L", (300, 200), 90)
    if features.check("webp"):
        save(root / "sad" / "g.webp", "RGB", (50, 50), (0, 255, 0))
    return root


def test_image_folder_reads_classes_formats_and_modes(tree):
    data = image_folder.load(cfg("folder", tree, image_size=32, channels=3))
    n_sad = 4 if features.check("webp") else 3
    assert data.test is None
    assert data.train.class_names == ("happy", "sad")
    assert data.train.images.shape == (3 + n_sad, 32, 32, 3) and data.train.images.dtype == np.uint8
    assert data.train.labels.tolist() == [0] * 3 + [1] * n_sad
    red = data.train.images[1]  # happy/b.JPG; JPEG is lossy
    assert abs(int(red[..., 0].mean()) - 255) < 4 and red[..., 1].mean() < 4


def test_image_folder_converts_to_gray(tree):
    data = image_folder.load(cfg("folder", tree, image_size=20, channels=1))
    assert data.train.images.shape[1:] == (20, 20, 1)
    assert data.train.images[0].min() == data.train.images[0].max() == 200  # a.png, L, resized


def test_image_folder_scales_16_bit_and_flattens_alpha_on_white(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").mkdir()
    Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16)).save(root / "a" / "white16.png")
    Image.fromarray(np.full((10, 10), 32896, dtype=np.uint16)).save(root / "a" / "gray16.png")
    save(root / "b" / "clear.png", "RGBA", (10, 10), (0, 0, 0, 0))
    data = image_folder.load(cfg("folder", root, image_size=10, channels=1))
    assert data.train.images[:, 0, 0, 0].tolist() == [128, 255, 255]  # gray16, white16, clear


def test_image_folder_pre_split_train_and_test(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("angry", "calm"):
            for i in range(n):
                save(tmp_path / split / cls / f"{i}.png", "L", (48, 48), i)
    data = image_folder.load(cfg("folder", tmp_path))
    assert data.train.images.shape == (6, 48, 48, 1) and data.test.images.shape == (4, 48, 48, 1)
    assert data.train.class_names == data.test.class_names == ("angry", "calm")
    assert data.test.labels.tolist() == [0, 0, 1, 1]


def test_image_folder_pre_split_class_sets_must_match(tmp_path):
    save(tmp_path / "train" / "angry" / "0.png")
    save(tmp_path / "train" / "calm" / "0.png")
    save(tmp_path / "test" / "angry" / "0.png")
    with pytest.raises(UserError) as e:
        image_folder.load(cfg("folder", tmp_path))
    message = str(e.value)
    assert str(tmp_path / "train") in message and str(tmp_path / "test") in message and "differ" in message


def test_image_folder_ignores_hidden_and_reports_other_files(tree, caplog):
    (tree / "happy" / ".DS_Store").write_bytes(b"\0\1")
    save(tree / ".cache" / "x.png")  # a hidden folder is not a class
    save(tree / "sad" / ".thumbs" / "y.png")
    (tree / "sad" / "notes.txt").write_text("not an image")
    (tree / "happy" / "list.csv").write_text("a,b")
    with caplog.at_level(logging.WARNING, logger="fedssl"):
        data = image_folder.load(cfg("folder", tree))
    assert data.train.class_names == ("happy", "sad")
    assert len(data.train) == (7 if features.check("webp") else 6)
    assert f"not loading 2 files under {tree}" in caplog.text and "list.csv" in caplog.text


def test_image_folder_empty_class_folder_is_named(tree):
    (tree / "surprise").mkdir()
    (tree / "surprise" / ".keep").write_text("")
    with pytest.raises(UserError, match=re.escape(f"class folder {tree / 'surprise'} holds no images")):
        image_folder.load(cfg("folder", tree))


@pytest.mark.parametrize("content", [b"this is not a png", "truncated"])
def test_image_folder_unreadable_image_is_named(tree, content):
    bad = tree / "sad" / "broken.png"
    if content == "truncated":
        content = (tree / "happy" / "a.png").read_bytes()[:60]
    bad.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(f"{bad}: unreadable image")):
        image_folder.load(cfg("folder", tree))


def test_image_folder_skip_bad_skips_and_reports(tree, caplog):
    (tree / "sad" / "broken.png").write_bytes(b"garbage")
    (tree / "happy" / "broken.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="fedssl"):
        data = image_folder.load(cfg("folder", tree, skip_bad=True))
    total = 9 if features.check("webp") else 8
    assert len(data.train) == total - 2
    assert f"skipped 2 of {total} images under {tree} (first: {tree / 'happy' / 'broken.jpg'}:" in caplog.text


def test_image_folder_skip_bad_with_nothing_left_raises(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no readable images"):
        image_folder.load(cfg("folder", tmp_path, skip_bad=True))


def test_image_folder_missing_root_or_classes(tmp_path):
    with pytest.raises(UserError, match=r"data\.path: .*missing does not exist"):
        image_folder.load(cfg("folder", tmp_path / "missing"))
    with pytest.raises(UserError, match=r"data\.path is empty"):
        image_folder.load(cfg("folder", ""))
    save(tmp_path / "loose.png")
    with pytest.raises(UserError, match="has no class subfolders"):
        image_folder.load(cfg("folder", tmp_path))


# --------------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    if magic is None:
        magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, name: str, content: bytes, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"{name}.gz" if gz else name)
    path.write_bytes(gzip.compress(content) if gz else content)
    return path


def write_mnist(folder: Path, n_train: int = 5, n_test: int = 3, gz: bool = True, labels=None) -> Path:
    """A tiny MNIST-layout folder; image i of each split is filled with the value i."""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.stack([np.full((28, 28), i, dtype=np.uint8) for i in range(n)])
        ys = np.arange(n) % 10 if labels is None else np.asarray(labels[prefix])
        write_idx(folder, f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write_idx(folder, f"{prefix}-labels-idx1-ubyte", idx_bytes(ys), gz)
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reads_train_and_t10k(tmp_path, gz):
    folder = write_mnist(tmp_path / "mnist", gz=gz)
    data = idx.load(cfg("idx", folder, image_size=28))
    assert data.train.images.shape == (5, 28, 28, 1) and data.test.images.shape == (3, 28, 28, 1)
    assert data.train.labels.tolist() == [0, 1, 2, 3, 4] and data.train.labels.dtype == np.int64
    assert data.train.images[3].min() == data.train.images[3].max() == 3
    assert data.train.class_names == tuple("0123456789")


def test_idx_class_names_follow_the_largest_label(tmp_path):
    folder = write_mnist(tmp_path / "letters", labels={"train": [1, 2, 12, 3, 4], "t10k": [0, 1, 2]})
    assert idx.load(cfg("idx", folder)).train.class_names == tuple(str(i) for i in range(13))


def test_idx_fashion_names_resize_and_channels(tmp_path):
    folder = write_mnist(tmp_path / "Fashion-MNIST")
    data = idx.load(cfg("idx", folder, image_size=32, channels=3))
    assert data.train.class_names[0] == "T-shirt/top" and data.train.class_names[9] == "Ankle boot"
    assert data.train.images.shape == (5, 32, 32, 3) and data.test.images.shape == (3, 32, 32, 3)
    assert data.train.images[2].min() == data.train.images[2].max() == 2


def test_idx_requires_t10k_files(tmp_path):
    folder = write_mnist(tmp_path / "mnist")
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(UserError, match=r"lacks t10k-images-idx3-ubyte\[\.gz\]; .*train and the t10k"):
        idx.load(cfg("idx", folder))


def test_idx_missing_folder_or_path(tmp_path):
    with pytest.raises(UserError, match=r"data\.path: .*nowhere does not exist"):
        idx.load(cfg("idx", tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"data\.path is empty"):
        idx.load(cfg("idx", ""))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated_file_names_file_and_sizes(tmp_path, gz):
    folder = write_mnist(tmp_path / "mnist", gz=gz)
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    path = write_idx(folder, "train-images-idx3-ubyte", idx_bytes(images)[:-100], gz)
    expected = f"{path}: truncated: expected 3936 bytes (16-byte header + 5x28x28 values), found 3836"
    with pytest.raises(UserError, match=re.escape(expected)):
        idx.load(cfg("idx", folder))


def test_idx_truncated_gzip_stream(tmp_path):
    folder = write_mnist(tmp_path / "mnist")
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(UserError, match=re.escape(f"{path}: corrupt or truncated gzip")):
        idx.load(cfg("idx", folder))


def test_idx_bad_magic(tmp_path):
    folder = write_mnist(tmp_path / "mnist", gz=False)
    path = write_idx(folder, "train-labels-idx1-ubyte", idx_bytes(np.zeros(5), magic=0x0803))
    with pytest.raises(UserError, match=re.escape(f"{path}: bad magic number 0x00000803, expected 0x00000801")):
        idx.load(cfg("idx", folder))


def test_idx_count_mismatch_names_both_files(tmp_path):
    folder = write_mnist(tmp_path / "mnist", gz=False)
    write_idx(folder, "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(4)))
    with pytest.raises(UserError) as e:
        idx.load(cfg("idx", folder))
    assert "t10k-images-idx3-ubyte holds 3 images but" in str(e.value)
    assert "t10k-labels-idx1-ubyte holds 4 labels" in str(e.value)


def test_idx_label_out_of_range(tmp_path, caplog):
    labels = {"train": [0, 1, 10, 3, 11], "t10k": [0, 1, 2]}
    folder = write_mnist(tmp_path / "fashion", labels=labels)
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte\.gz, item 3: label 10, outside 0\.\.9"):
        idx.load(cfg("idx", folder))
    with caplog.at_level(logging.WARNING, logger="fedssl"):
        data = idx.load(cfg("idx", folder, skip_bad=True))
    assert data.train.labels.tolist() == [0, 1, 3] and len(data.train.images) == 3
    assert "skipped 2 of 5 items in" in caplog.text and "(first: item 3: label 10" in caplog.text


@pytest.mark.skipif(not FASHION_DEBIAN.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_idx_reads_debian_fashion_mnist():
    data = idx.load(cfg("idx", FASHION_DEBIAN, image_size=28))
    assert data.train.images.shape == (60000, 28, 28, 1) and data.test.images.shape == (10000, 28, 28, 1)
    assert data.train.class_names == idx.FASHION_MNIST_CLASSES
    assert np.bincount(data.train.labels).tolist() == [6000] * 10
    assert np.bincount(data.test.labels).tolist() == [1000] * 10
