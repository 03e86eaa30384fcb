"""Augmentation pipelines and the uint8 -> tensor conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedssl.data.transforms import KINDS, augment_batch, build_transform, to_tensor
from fedssl.errors import UserError

# after fedssl.data.transforms, which keeps albumentations from checking PyPI on import
import albumentations as A  # noqa: E402, I001


def faces(n: int = 16, size: int = 32, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Structured images (a gradient plus noise), so flips and shifts change them."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size, dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 55, (n, size, size, channels))
    return (ramp + noise).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_dtypes(kind, channels):
    images = faces(channels=channels)
    out = augment_batch(build_transform(kind, 32, seed=0), images)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert out is not images


@pytest.mark.parametrize("kind", ["eval", "none"])
def test_eval_is_identity(kind):
    images = faces(channels=3)
    assert np.array_equal(augment_batch(build_transform(kind, 32), images), images)


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_augmentation_changes_images(kind):
    images = faces(n=32)
    out = augment_batch(build_transform(kind, 32, seed=1), images)
    changed = (out != images).reshape(len(images), -1).any(axis=1)
    assert changed.mean() > 0.5
    assert np.array_equal(images, faces(n=32))  # the input is left alone


def test_strong_differs_from_weak():
    images = faces(n=32)
    weak = augment_batch(build_transform("weak", 32, seed=3), images)
    strong = augment_batch(build_transform("strong", 32, seed=3), images)
    assert not np.array_equal(weak, strong)


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_seed_makes_runs_reproducible(kind):
    images = faces(n=24, channels=3)
    first = augment_batch(build_transform(kind, 32, seed=7), images)
    again = augment_batch(build_transform(kind, 32, seed=7), images)
    other = augment_batch(build_transform(kind, 32, seed=8), images)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    # a pipeline keeps drawing: the next batch is augmented differently
    transform = build_transform(kind, 32, seed=7)
    assert not np.array_equal(augment_batch(transform, images), augment_batch(transform, images))


def test_unknown_kind():
    with pytest.raises(UserError, match=r"data\.augment: unknown augmentation 'strnog' \(did you mean 'strong'\?\)"):
        build_transform("strnog", 32)


def _squeeze_channel(image: np.ndarray, **kwargs) -> np.ndarray:
    return image[..., 0]


def test_grayscale_channel_is_restored():
    drop_channel = A.Compose([A.Lambda(image=_squeeze_channel)])
    images = faces(n=3)
    out = augment_batch(drop_channel, images)
    assert out.shape == images.shape and np.array_equal(out, images)


def test_augment_batch_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(build_transform("weak", 32), faces().astype(np.float32))


def test_to_tensor():
    images = np.array([0, 255, 51, 127], dtype=np.uint8).reshape(1, 2, 2, 1).repeat(3, axis=-1)
    images[..., 1] = 255
    x = to_tensor(images)
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32 and x.is_contiguous()
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    assert torch.allclose(x, expected, atol=1e-6)
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(x[0, 1], torch.ones(2, 2))
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(images[0])
