"""The practitioner's labeled images: class matching by name and the held-out split."""

import numpy as np
import pytest

from fedssl.data.dataset import FER2013_CLASSES, ImageDataset, SourceData
from fedssl.data.labeled_subset import holdout_split, match_classes, minimum_samples
from fedssl.errors import UserError


def dataset(labels, names) -> ImageDataset:
    labels = np.asarray(labels, dtype=np.int64)
    # each image's pixels hold its own index, so a split can be traced back
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2)
    return ImageDataset(images=images, labels=labels, class_names=tuple(names))


def test_folder_classes_are_put_in_the_models_order_by_name():
    # a folder's classes come sorted: angry, happy, neutral; FER2013 puts neutral last (6) and happy at 3
    data = SourceData(train=dataset([0, 1, 2, 1], ["angry", "Happy", "neutral"]), test=dataset([2], ["angry", "Happy", "neutral"]))
    matched = match_classes(data, FER2013_CLASSES)
    assert matched.train.labels.tolist() == [0, 3, 6, 3]
    assert matched.test.labels.tolist() == [6]
    assert matched.train.class_names == FER2013_CLASSES


def test_a_class_the_model_does_not_know_is_named():
    data = SourceData(train=dataset([0, 1], ["happy", "contempt"]))
    with pytest.raises(UserError, match="'contempt'"):
        match_classes(data, FER2013_CLASSES)


def test_holdout_is_stratified_exact_and_disjoint():
    labels = [0] * 10 + [1] * 5 + [2] * 5  # 20% of 20 = 4: 2 + 1 + 1
    train, held = holdout_split(dataset(labels, "abc"), 0.2, seed=3)
    assert len(held) == 4 and len(train) == 16
    assert np.bincount(held.labels, minlength=3).tolist() == [2, 1, 1]
    assert set(train.images[:, 0, 0, 0]).isdisjoint(held.images[:, 0, 0, 0])
    again = holdout_split(dataset(labels, "abc"), 0.2, seed=3)[1]
    assert np.array_equal(again.images, held.images)  # the seed decides


def test_too_few_images_say_how_many_are_needed():
    assert minimum_samples(0.2) == 3  # round(0.6) = 1 held out, 2 to train on
    assert minimum_samples(0.5) == 2
    assert minimum_samples(0.05) == 10
    with pytest.raises(UserError, match="at least 3 are needed"):
        holdout_split(dataset([0, 1], "ab"), 0.2, seed=0)
    holdout_split(dataset([0, 1, 1], "ab"), 0.2, seed=0)  # three are enough
    with pytest.raises(UserError, match="--holdout"):
        holdout_split(dataset([0, 1, 1], "ab"), 1.0, seed=0)
