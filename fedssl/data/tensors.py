"""Image pools decoded once into tensors on the training device, and batching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from fedssl.data.dataset import ImageDataset
from fedssl.data.transforms import to_tensor


@dataclass(frozen=True)
class TensorPool:
    """One dataset as normalized float tensors on `device`, plus its raw uint8 images
    for augmentation. Clients index into it; nothing is decoded or copied per round."""

    images: torch.Tensor  # float32 (N, C, H, W), normalized (`to_tensor`): in [-1, 1] unless the model's weights say otherwise
    labels: torch.Tensor  # int64 (N,)
    raw: np.ndarray  # uint8 (N, H, W, C)
    mean: tuple[float, ...] | None = None  # the normalization (`fedssl.models.factory.input_normalization`)
    std: tuple[float, ...] | None = None

    @classmethod
    def from_dataset(cls, dataset: ImageDataset, device: torch.device,
                     normalization: tuple[Sequence[float], Sequence[float]] | None = None) -> TensorPool:
        mean, std = (tuple(normalization[0]), tuple(normalization[1])) if normalization else (None, None)
        return cls(
            images=to_tensor(dataset.images, mean, std).to(device),
            labels=torch.from_numpy(dataset.labels).to(device),
            raw=dataset.images,
            mean=mean,
            std=std,
        )

    def tensor(self, raw: np.ndarray) -> torch.Tensor:
        """uint8 images (augmented copies of the pool's) normalized as the pool is, on the CPU."""
        return to_tensor(raw, self.mean, self.std)

    def __len__(self) -> int:
        return len(self.labels)


def batches_per_pass(count: int, batch_size: int, drop_last: bool) -> int:
    """Mini-batches in one pass over `count` samples. With `drop_last` a pass ends at
    its last full batch (`train.drop_last`): a short remainder is never a step of
    its own. A set smaller than one batch is still one (short) batch, so that every
    client trains."""
    if drop_last and count >= batch_size:
        return count // batch_size
    return -(-count // batch_size)


def cycle_batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator, *,
                  drop_last: bool) -> Iterator[np.ndarray]:
    """Endless shuffled mini-batches of `indices`, reshuffled at every pass: the
    `batches_per_pass` batches of each pass. Without `drop_last` the last batch of a
    pass may be short; with it, the samples left over wait for a later pass's
    shuffle (as torch's `DataLoader(drop_last=True)` leaves them)."""
    per_pass = batches_per_pass(len(indices), batch_size, drop_last)
    while True:
        order = rng.permutation(indices)
        for start in range(0, per_pass * batch_size, batch_size):
            yield order[start : start + batch_size]


def client_seed(seed: int, round_index: int, client_id: int) -> int:
    """A seed for one client's work in one round, independent of who ran before it,
    so that resumed runs and other backends draw the same numbers."""
    return int(np.random.SeedSequence([seed, round_index, client_id + 1]).generate_state(1)[0])  # the server is -1
