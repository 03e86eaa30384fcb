"""Image augmentation pipelines (albumentations) and the uint8 -> tensor conversion.

(`fedssl.data.batch_augment` draws the same three strengths a batch at a time in
torch, on the training device: `data.augment_backend`.)

Three strengths, as semi-supervised methods use them:

- ``eval`` (alias ``none``): identity.
- ``weak``: random horizontal flip and a random translation of up to 12.5% of the
  side on each axis with reflected borders, the weak augmentation of FixMatch (Sohn
  et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
  Confidence", NeurIPS 2020).
- ``strong``: ``weak``, then RandAugment (Cubuk et al., "RandAugment: Practical
  automated data augmentation with a reduced search space", CVPR Workshops 2020) in
  FixMatch's variant: 2 operations drawn uniformly from a list of photometric and
  geometric ones, each at a magnitude sampled per image (no global magnitude to
  tune), followed by Cutout (one square-ish hole of up to half the image side,
  filled with gray).

Colour ops of RandAugment (Color/saturation) are left out: the pipelines must work
identically on grayscale (H, W, 1) faces, where they are no-ops.

Reproducibility: albumentations 2.x draws from the Compose's own generators, not
from numpy's or Python's global state. With `seed`, two pipelines built alike give
identical sequences. (albumentations' own `Compose(seed=...)` seeds every transform's
generator with the same seed, so their draws would be correlated; this module gives
all transforms of a pipeline one shared pair of generators instead.)
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

import albumentations as A
import cv2

from fedssl.errors import UserError
from fedssl.registry import did_you_mean

__all__ = ["AUGMENTATIONS", "KINDS", "build_transform", "check_augmentation", "reseed",
           "augment_batch", "to_tensor", "normalize", "is_default_normalization"]

AUGMENTATIONS = ("none", "weak", "strong")  # what data.augment (and personalize --augment) may name
KINDS = ("eval", *AUGMENTATIONS)

_BORDER = cv2.BORDER_REFLECT_101
_GRAY = 127  # Cutout fill, mid-gray on 8-bit images
_WEAK_SHIFT = 0.125  # FixMatch: translate by up to 12.5% of the side


def check_augmentation(kind: str, key: str = "data.augment") -> str:
    """`kind` if it is one of `AUGMENTATIONS`, else a `UserError` naming `key`."""
    if kind not in AUGMENTATIONS:
        raise UserError(f"{key}: unknown augmentation {kind!r}{did_you_mean(str(kind), list(AUGMENTATIONS))}; "
                        f"choose one of {', '.join(AUGMENTATIONS)}")
    return kind


def build_transform(kind: str, image_size: int, seed: int | None = None) -> A.Compose:
    """The augmentation pipeline of strength `kind` for `image_size`-sided images.

    Args:
        kind: "eval" (or "none"), "weak" or "strong" (see the module docstring).
        image_size: side of the images the pipeline will see; sets the Cutout size.
        seed: makes the random sequence reproducible (None: fresh OS entropy).

    Raises:
        UserError: unknown `kind` (named as data.augment).
    """
    if kind != "eval":
        check_augmentation(kind)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if kind in ("eval", "none"):
        transforms: list = []
    elif kind == "weak":
        transforms = _weak()
    else:
        transforms = _weak() + [A.SomeOf(_randaugment_ops(), n=2, replace=False, p=1.0), _cutout(image_size)]
    compose = A.Compose(transforms, seed=seed)
    reseed(compose, seed)
    return compose


def reseed(transform: A.Compose, seed: int | None) -> None:
    """Restart `transform`'s random sequence from `seed`, with one generator pair
    shared by every transform (see the module docstring)."""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def _weak() -> list:
    return [
        A.HorizontalFlip(p=0.5),
        A.Affine(
            translate_percent={"x": (-_WEAK_SHIFT, _WEAK_SHIFT), "y": (-_WEAK_SHIFT, _WEAK_SHIFT)},
            border_mode=_BORDER,
            p=1.0,
        ),
    ]


def _randaugment_ops() -> list:
    """RandAugment operations as FixMatch lists them (Sohn et al. 2020, appendix), magnitudes drawn per image.

    Magnitude ranges follow FixMatch where albumentations has the same operation;
    brightness/contrast/sharpness are albumentations' additive/blend versions of
    PIL's enhance factors, so their ranges are comparable, not identical.
    """
    shear = 16.7  # degrees: FixMatch's shear factor 0.3 = tan(16.7 deg)
    return [
        A.NoOp(p=1.0),  # Identity
        A.AutoContrast(p=1.0),
        A.RandomBrightnessContrast(brightness_limit=(-0.45, 0.45), contrast_limit=(0.0, 0.0), p=1.0),  # Brightness
        A.RandomBrightnessContrast(brightness_limit=(0.0, 0.0), contrast_limit=(-0.45, 0.45), p=1.0),  # Contrast
        A.Equalize(p=1.0),
        A.Posterize(num_bits=(4, 8), p=1.0),
        A.Solarize(threshold_range=(0.0, 1.0), p=1.0),
        A.Sharpen(alpha=(0.05, 0.95), lightness=(1.0, 1.0), p=1.0),  # Sharpness
        A.Affine(rotate=(-30, 30), border_mode=_BORDER, p=1.0),  # Rotate
        A.Affine(shear={"x": (-shear, shear), "y": (0, 0)}, border_mode=_BORDER, p=1.0),  # ShearX
        A.Affine(shear={"x": (0, 0), "y": (-shear, shear)}, border_mode=_BORDER, p=1.0),  # ShearY
        A.Affine(translate_percent={"x": (-0.3, 0.3), "y": (0, 0)}, border_mode=_BORDER, p=1.0),  # TranslateX
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.3, 0.3)}, border_mode=_BORDER, p=1.0),  # TranslateY
    ]


def _cutout(image_size: int) -> A.CoarseDropout:
    half = max(1, image_size // 2)
    return A.CoarseDropout(
        num_holes_range=(1, 1),
        hole_height_range=(1, half),
        hole_width_range=(1, half),
        fill=_GRAY,
        p=1.0,
    )


def augment_batch(transform: A.Compose, images: np.ndarray) -> np.ndarray:
    """Apply `transform` to each image of a uint8 (N, H, W, C) batch, independently.

    Returns a new uint8 array of the same shape (a grayscale channel albumentations
    drops is restored). Each image gets its own random draw.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if not transform.transforms:  # eval: nothing to draw, skip the per-image calls
        return images.copy()
    images = np.ascontiguousarray(images)
    out = np.empty_like(images)
    for i in range(len(images)):
        image = transform(image=images[i])["image"]
        if image.ndim == 2:
            image = image[..., None]
        if image.shape != images.shape[1:]:
            raise ValueError(f"transform changed the image shape from {images.shape[1:]} to {image.shape}")
        out[i] = image if image.dtype == np.uint8 else np.clip(np.rint(image), 0, 255)
    return out


def to_tensor(images: np.ndarray, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W), (x / 255 - mean) / std per channel.

    Without `mean` and `std` (or with 0.5 and 0.5, fedssl's default), values are in
    [-1, 1], computed as x / 127.5 - 1; a pretrained model's mean and std come from
    `fedssl.models.factory.input_normalization`.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    return normalize(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), mean, std)


def normalize(images: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) on any device -> float32 there, scaled as `to_tensor` scales."""
    x = images.to(torch.float32, memory_format=torch.contiguous_format)
    if is_default_normalization(mean, std):
        return x.div_(127.5).sub_(1.0)
    channels = x.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need one value per channel ({channels}), got {list(mean)} and {list(std)}")
    mean, std = torch.tensor(mean, device=x.device).view(1, -1, 1, 1), torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.div_(255.0).sub_(mean).div_(std)


def is_default_normalization(mean: Sequence[float] | None, std: Sequence[float] | None) -> bool:
    """Whether (`mean`, `std`) is fedssl's own scaling to [-1, 1] (None: the default)."""
    return (mean is None and std is None) or (set(mean or ()) == {0.5} and set(std or ()) == {0.5})
