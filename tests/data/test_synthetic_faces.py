"""The synthetic faces source: format, determinism, identities and learnable signal."""

from __future__ import annotations

import numpy as np
import pytest

from fedssl.config.schema import DataConfig
from fedssl.data.dataset import FER2013_CLASSES
from fedssl.data.sources.synthetic_faces import DATASET_SEED, generate_synthetic_faces, load
from fedssl.errors import UserError

@pytest.fixture(scope="module")
def faces():
    return generate_synthetic_faces(2100, 10, seed=3)


def test_format(faces):
    assert faces.images.shape == (2100, 48, 48, 1) and faces.images.dtype == np.uint8
    assert faces.labels.dtype == np.int64 and faces.identities.dtype == np.int64
    assert faces.class_names == FER2013_CLASSES
    assert faces.labels.min() >= 0 and faces.labels.max() < 7
    assert set(np.unique(faces.identities)) == set(range(10))
    # The full grey range is used, and no image is blank.
    assert faces.images.min() < 30 and faces.images.max() > 225
    assert faces.images.reshape(len(faces), -1).std(axis=1).min() > 5


def test_all_classes_present(faces):
    assert set(np.unique(faces.labels)) == set(range(7))


def test_deterministic_from_seed():
    a, b = generate_synthetic_faces(300, 7, seed=11), generate_synthetic_faces(300, 7, seed=11)
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.identities, b.identities)
    c = generate_synthetic_faces(300, 7, seed=12)
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.labels, c.labels)


def test_identities_share_samples_evenly():
    ds = generate_synthetic_faces(1003, 10, seed=0)
    assert sorted(np.bincount(ds.identities).tolist()) == [100] * 7 + [101] * 3
    one_each = generate_synthetic_faces(25, 25, seed=0)
    assert np.array_equal(np.sort(one_each.identities), np.arange(25))


def test_identities_have_their_own_class_distributions(faces):
    hist = np.stack([np.bincount(faces.labels[faces.identities == i], minlength=7) for i in range(10)]).astype(float)
    hist /= hist.sum(axis=1, keepdims=True)
    tv = [0.5 * np.abs(hist[i] - hist[j]).sum() for i in range(10) for j in range(i + 1, 10)]
    # Same distribution with 210 samples each would give a total variation near 0.1.
    assert np.mean(tv) > 0.25


def test_classes_differ_on_average(faces):
    """The class-mean images spread far more than under shuffled labels.

    Each image is normalized and each person's mean image subtracted first, so
    the spread measures expression, not which people show a class most.
    """
    x = faces.images[..., 0].reshape(len(faces), -1).astype(float)
    x = (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True)
    for i in range(10):
        x[faces.identities == i] -= x[faces.identities == i].mean(axis=0)

    def spread(labels):
        means = np.stack([x[labels == c].mean(axis=0) for c in range(7)])
        return ((means - means.mean(axis=0)) ** 2).sum()

    rng = np.random.default_rng(0)
    shuffled = max(spread(rng.permutation(faces.labels)) for _ in range(5))
    assert spread(faces.labels) > 1.5 * shuffled


def test_rgb_and_other_sizes():
    grey = generate_synthetic_faces(200, 5, seed=1)
    rgb = generate_synthetic_faces(200, 5, seed=1, channels=3)
    assert rgb.images.shape == (200, 48, 48, 3) and rgb.images.dtype == np.uint8
    # Same people and expressions, now with colour: the channels differ.
    assert np.array_equal(grey.labels, rgb.labels) and np.array_equal(grey.identities, rgb.identities)
    r, g, b = (rgb.images[..., k].astype(float) for k in range(3))
    assert np.abs(r - g).mean() > 3 and np.abs(g - b).mean() > 3
    for size in (24, 32, 64):
        assert generate_synthetic_faces(50, 5, seed=1, image_size=size).images.shape == (50, size, size, 1)


def test_load_uses_fixed_dataset_seed():
    cfg = DataConfig(num_samples=120, num_identities=6, image_size=32, channels=3)
    source = load(cfg)
    assert source.test is None
    expected = generate_synthetic_faces(120, 6, seed=DATASET_SEED, image_size=32, channels=3)
    assert np.array_equal(source.train.images, expected.images)
    assert np.array_equal(source.train.identities, expected.identities)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"num_samples": 0}, "data.num_samples"),
        ({"num_identities": 0}, "data.num_identities"),
        ({"num_samples": 10, "num_identities": 11}, "data.num_identities"),
        ({"image_size": 16}, "data.image_size"),
        ({"channels": 2}, "data.channels"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    cfg = DataConfig(**{"num_samples": 100, "num_identities": 10, **overrides})
    with pytest.raises(UserError, match=key):
        load(cfg)
