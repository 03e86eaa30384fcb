"""The in-memory form every data source produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@dataclass(frozen=True)
class ImageDataset:
    """Decoded images with their labels.

    Attributes:
        images: uint8 array of shape (N, H, W, C), C in {1, 3}.
        labels: int64 array of shape (N,), values in [0, len(class_names)).
        class_names: one name per class index.
        identities: optional int64 array of shape (N,): who is in the picture
            (a person, a device); enables the natural partition.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    identities: np.ndarray | None = None

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels shape {self.labels.shape} does not match {len(self.images)} images")
        if self.identities is not None and self.identities.shape != self.labels.shape:
            raise ValueError("identities must have one entry per image")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """The images at `indices`, in that order."""
        return ImageDataset(
            images=self.images[indices],
            labels=self.labels[indices],
            class_names=self.class_names,
            identities=None if self.identities is None else self.identities[indices],
        )


@dataclass(frozen=True)
class SourceData:
    """What a data source returns: a training pool and, when the source defines
    one (FER2013's PublicTest/PrivateTest, Fashion-MNIST's t10k files), a test set."""

    train: ImageDataset
    test: ImageDataset | None = None
