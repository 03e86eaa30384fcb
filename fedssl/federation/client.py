"""Local training of one client at a time on one reused learner."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import albumentations as A
import numpy as np
import torch

from fedssl.config.schema import SSLConfig, TrainConfig
from fedssl.data.transforms import augment_batch, reseed, to_tensor
from fedssl.messages import Payload, Update
from fedssl.federation.tensors import TensorPool, client_seed, cycle_batches
from fedssl.learners.base import Batch, ClientContext, FederatedLearner


@dataclass(frozen=True)
class Augmentations:
    """The pipelines a client applies: to labeled images (None: none), and the weak
    and strong views of unlabeled images for pseudo-labeling learners."""

    labeled: A.Compose | None
    weak: A.Compose
    strong: A.Compose

    def reseed(self, seed: int) -> None:
        for offset, transform in enumerate((self.labeled, self.weak, self.strong)):
            if transform is not None:
                reseed(transform, seed + offset)


def round_steps(num_labeled: int, num_unlabeled: int, cfg: TrainConfig, unlabeled_batch: int) -> int:
    """SGD steps in one round: `local_steps`, or `local_epochs` passes over whichever
    of the labeled and unlabeled sets takes more batches."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    per_epoch = math.ceil(num_labeled / cfg.batch_size)
    if unlabeled_batch:
        per_epoch = max(per_epoch, math.ceil(num_unlabeled / unlabeled_batch))
    return cfg.local_epochs * per_epoch


class ClientTrainer:
    """Runs a learner's `training_step` over one client's batches.

    The model, learner and data tensors are built once per run; for each client only
    the weights are copied in and the optimizer is made anew. This is the light path
    the federation loop uses instead of a Lightning Trainer per client. Every random
    draw comes from (seed, round, client), so the order clients run in never matters.
    """

    def __init__(
        self,
        learner: FederatedLearner,
        pool: TensorPool,
        train_cfg: TrainConfig,
        ssl_cfg: SSLConfig,
        shared_names: list[str],
        seed: int,
        augmentations: Augmentations,
    ):
        self.learner = learner
        self.pool = pool
        self.train_cfg = train_cfg
        self.unlabeled_batch = train_cfg.batch_size * ssl_cfg.unlabeled_ratio if learner.uses_unlabeled else 0
        self.shared_names = shared_names
        self.seed = seed
        self.augmentations = augmentations

    def images(self, indices: np.ndarray, index: torch.Tensor, transform: A.Compose | None) -> torch.Tensor:
        """The pooled images at `indices` (`index`: the same on the device), augmented."""
        if transform is None:
            return self.pool.images[index]
        return to_tensor(augment_batch(transform, self.pool.raw[indices])).to(index.device)

    def batches(self, labeled: np.ndarray, unlabeled: np.ndarray, rng: np.random.Generator, steps: int) -> Iterator[Batch]:
        cfg, aug, device = self.train_cfg, self.augmentations, self.pool.labels.device
        labeled_stream = cycle_batches(labeled, cfg.batch_size, rng) if len(labeled) else None
        positions = np.arange(len(unlabeled))
        unlabeled_stream = cycle_batches(positions, self.unlabeled_batch, rng) if self.unlabeled_batch and len(unlabeled) else None
        for _ in range(steps):
            batch: Batch = {}
            if labeled_stream is not None:
                indices = next(labeled_stream)
                index = torch.from_numpy(indices).to(device)
                batch["x"] = self.images(indices, index, aug.labeled)
                batch["y"] = self.pool.labels[index]
            if unlabeled_stream is not None:
                picked = next(unlabeled_stream)
                indices = unlabeled[picked]
                index = torch.from_numpy(indices).to(device)
                batch["u_weak"] = self.images(indices, index, aug.weak)
                batch["u_strong"] = self.images(indices, index, aug.strong)
                batch["u_index"] = torch.from_numpy(picked)
            yield batch

    def fit(self, client_id: int, labeled: np.ndarray, unlabeled: np.ndarray, payload: Payload,
            state: dict[str, torch.Tensor] | None = None, steps: int | None = None) -> tuple[Update, dict[str, torch.Tensor]]:
        """Train from the payload's weights (`steps` steps, default: the recipe's
        budget); the update and what the client keeps."""
        seed = client_seed(self.seed, payload.round, client_id)
        torch.manual_seed(seed)
        self.augmentations.reseed(seed)
        unlabeled = unlabeled if self.learner.uses_unlabeled else unlabeled[:0]
        learner = self.learner
        learner.load_arrays(payload.arrays)
        learner.start_round(payload, ClientContext(client_id, len(labeled), len(unlabeled), state or {}))
        learner.train()
        optimizer = learner.configure_optimizers()
        tally = Tally()
        device = self.pool.labels.device
        truth = self.pool.labels[torch.from_numpy(unlabeled).to(device)] if len(unlabeled) else None
        if steps is None:
            steps = round_steps(len(labeled), len(unlabeled), self.train_cfg, self.unlabeled_batch if len(unlabeled) else 0)
            steps = learner.round_steps(steps)
        for step, batch in enumerate(self.batches(labeled, unlabeled, np.random.default_rng(seed), steps)):
            optimizer.zero_grad(set_to_none=True)
            out = learner.training_step(batch, step)
            loss = out["loss"] if isinstance(out, dict) else out
            loss.backward()
            optimizer.step()
            tally.add(loss, out if isinstance(out, dict) else {}, batch, truth)
        update = Update(
            client_id=client_id,
            arrays=learner.arrays(self.shared_names),
            num_examples=len(labeled) + len(unlabeled) if tally.steps else 0,
            metrics=tally.metrics(),
        )
        return update, learner.end_round()


class Tally:
    """Running training metrics of one client's round: the loss, and how many
    pseudo-labels passed the threshold and how many of those were right."""

    def __init__(self):
        self.steps, self.masked, self.correct, self.unlabeled = 0, 0, 0, 0
        self.losses: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, out: dict, batch: Batch, unlabeled_labels: torch.Tensor | None) -> None:
        self.steps += 1
        self.losses.append(loss.detach())
        if "mask" in out:
            # The true labels are looked up here, by the loop: the learner never sees them.
            truth = unlabeled_labels[batch["u_index"].to(unlabeled_labels.device)]
            mask = out["mask"].detach().bool()
            self.unlabeled += len(mask)
            self.masked += int(mask.sum())
            self.correct += int((out["pseudo_labels"].detach()[mask] == truth[mask]).sum())

    def metrics(self) -> dict[str, float]:
        metrics = {"train_loss": float(torch.stack(self.losses).mean())} if self.losses else {}
        if self.unlabeled:
            metrics |= {"pl_seen": self.unlabeled, "pl_masked": self.masked, "pl_correct": self.correct}
        return metrics
