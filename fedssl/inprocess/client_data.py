"""One client's round as Lightning data: the batches a learner trains on, in order.

The federation loop (`fedssl.inprocess.trainer.ClientTrainer`) and a plain Lightning
Trainer read the same `ClientDataModule`, so one client trains the same way inside
and outside the federation:

    data = federation.trainer.client_data(client_id, client.labeled, client.unlabeled, payload)
    steps = data.begin(learner)                 # the payload's weights in, `start_round`
    pl.Trainer(max_steps=steps, ...).fit(learner, datamodule=data)
    update, kept = data.finish(learner)         # what the client sends, and keeps

Every random draw of a client's round (batch order, augmentation, torch's generator)
is seeded from (seed, round, client) when the round begins, so the order clients
run in never matters and a resumed run draws the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch

from fedssl.config.schema import DataConfig, TrainConfig
from fedssl.data.batch_augment import TorchAugment
from fedssl.data.transforms import augment_batch, build_transform, normalize, reseed
from fedssl.messages import Payload, Update
from fedssl.data.tensors import TensorPool, batches_per_pass, client_seed, cycle_batches
from fedssl.learners.base import Batch, ClientContext, FederatedLearner

# Payload config key: at most this many local steps this round (a round policy's
# partial work, fedssl.simulation.policies); absent, the recipe's budget.
STEP_BUDGET = "step_budget"


# An augmentation: albumentations per uint8 (H, W, C) image on the CPU, or torch a
# uint8 (N, C, H, W) batch at a time on the pool's device (`data.augment_backend`).
Transform = A.Compose | TorchAugment


@dataclass(frozen=True)
class Augmentations:
    """The pipelines a client applies: to labeled images (None: none), and the weak
    and strong views of unlabeled images for pseudo-labeling learners."""

    labeled: Transform | None
    weak: Transform
    strong: Transform

    @classmethod
    def build(cls, cfg: DataConfig) -> Augmentations:
        """The recipe's augmentations, by `data.augment_backend`."""
        if cfg.augment_backend == "torch":
            return cls(None if cfg.augment == "none" else TorchAugment(cfg.augment), TorchAugment("weak"),
                       TorchAugment("strong"))
        size = cfg.image_size
        return cls(None if cfg.augment == "none" else build_transform(cfg.augment, size), build_transform("weak", size),
                   build_transform("strong", size))

    def reseed(self, seed: int) -> None:
        for offset, transform in enumerate((self.labeled, self.weak, self.strong)):
            if isinstance(transform, TorchAugment):
                transform.reseed(seed + offset)
            elif transform is not None:
                reseed(transform, seed + offset)


def epoch_steps(num_labeled: int, num_unlabeled: int, cfg: TrainConfig, unlabeled_batch: int) -> int:
    """SGD steps in one local epoch: one pass over whichever of the labeled and
    unlabeled sets takes more batches (`batches_per_pass`, whose last short batch
    `train.drop_last` drops); with `local_steps` set, the whole budget."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    per_epoch = batches_per_pass(num_labeled, cfg.batch_size, cfg.drop_last)
    if unlabeled_batch:
        per_epoch = max(per_epoch, batches_per_pass(num_unlabeled, unlabeled_batch, cfg.drop_last))
    return per_epoch


def round_steps(num_labeled: int, num_unlabeled: int, cfg: TrainConfig, unlabeled_batch: int) -> int:
    """SGD steps in one round: `local_steps`, or `local_epochs` epochs (`epoch_steps`)."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    return cfg.local_epochs * epoch_steps(num_labeled, num_unlabeled, cfg, unlabeled_batch)


def capped(steps: int, payload: Payload) -> int:
    """`steps`, at most the payload's `STEP_BUDGET` where it carries one."""
    return min(steps, int(payload.config[STEP_BUDGET])) if STEP_BUDGET in payload.config else steps


def training_layout(device: torch.device, memory_format: str) -> torch.memory_format:
    """The layout a client's 4-d weights train in (`train.memory_format`). On a CPU,
    oneDNN's convolutions make an SGD step 1.1-1.5x faster on channels-last weights
    and activations (FedAvg CNN on one thread, batches of 10 to 448:
    `tools/bench_layout.py`, BENCHMARKS.md), so `auto` takes it there; on CUDA it is
    unmeasured, so `auto` stays contiguous."""
    if memory_format == "auto":
        memory_format = "channels_last" if device.type == "cpu" else "contiguous"
    return torch.channels_last if memory_format == "channels_last" else torch.contiguous_format


@dataclass(frozen=True)
class BatchSource:
    """What every client's batches are cut from, built once per run: the image pool
    on the training device, the augmentations, the batch sizes and the run's seed.

    Attributes:
        unlabeled_ratio: unlabeled images per labeled one in a step (FixMatch's mu),
            for learners that use unlabeled data.
    """

    pool: TensorPool
    augmentations: Augmentations
    train: TrainConfig
    unlabeled_ratio: int
    seed: int

    @cached_property
    def layout(self) -> torch.memory_format:
        return training_layout(self.pool.labels.device, self.train.memory_format)

    def unlabeled_batch(self, learner: FederatedLearner) -> int:
        return self.train.batch_size * self.unlabeled_ratio if learner.uses_unlabeled else 0

    @cached_property
    def raw(self) -> torch.Tensor:
        """The pool's uint8 images as (N, C, H, W) on its device, for the torch augmentations
        (made on first use: a run that augments with albumentations never holds it)."""
        return torch.from_numpy(self.pool.raw).permute(0, 3, 1, 2).contiguous().to(self.pool.labels.device)

    def augmented(self, transform: Transform, indices: np.ndarray, index: torch.Tensor) -> torch.Tensor:
        """The pooled images at `indices` (`index`: the same on the pool's device) through
        `transform`, normalized as the pool is, on the pool's device."""
        pool = self.pool
        if isinstance(transform, TorchAugment):  # the whole batch at once, where the pool lives
            return normalize(transform(self.raw[index]), pool.mean, pool.std)
        return pool.tensor(augment_batch(transform, pool.raw[indices])).to(index.device)


class RoundBatches:
    """A round's batches as a Lightning train loader: each pass (`iter`) is one
    epoch, the next `epoch_steps` batches of one stream that runs on across epochs,
    until the round's `steps` are spent (the last epoch may be short).

    It has no `len`: Lightning then finds an epoch's end by its last batch, as the
    loop does. A batch counts as spent when it is read, not when a pass starts
    (Lightning calls `iter` once just to check the loader)."""

    def __init__(self, stream: Iterator[Batch], steps: int, epoch_steps: int):
        self.stream, self.left, self.epoch_steps = stream, steps, max(epoch_steps, 1)

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(min(self.epoch_steps, self.left)):
            self.left -= 1
            yield next(self.stream)


class ClientDataModule(pl.LightningDataModule):
    """One client's round: its batches (dicts, see `fedssl.learners.base.Batch`), and
    the round's start (`begin`) and end (`finish`) on a learner.

    `begin` seeds the round, loads the payload's weights and calls the learner's
    `start_round`; under a Trainer that has not been begun, `setup("fit")` does it.
    One epoch of `train_dataloader` is one local epoch (`epoch_steps`; with
    `train.local_steps`, the whole round), so epoch-interval LR schedulers step
    where the federation loop steps them.

    Args:
        source: the run's pool, augmentations, batch sizes and seed.
        client_id: the client (the server trains as client -1).
        labeled, unlabeled: the client's pool indices.
        payload: what it received this round.
        state: what it kept from earlier rounds.
        steps: the round's SGD steps; default: the recipe's budget, as the
            learner's `round_steps` extends it, capped by the payload's `STEP_BUDGET`.
    """

    def __init__(self, source: BatchSource, client_id: int, labeled: np.ndarray, unlabeled: np.ndarray,
                 payload: Payload, state: dict[str, torch.Tensor] | None = None, steps: int | None = None):
        super().__init__()
        self.source = source
        self.client_id, self.labeled, self.unlabeled = client_id, labeled, unlabeled
        self.payload, self.state, self.steps = payload, state or {}, steps
        self.unlabeled_batch = 0
        self.loader: RoundBatches | None = None

    @property
    def seed(self) -> int:
        return client_seed(self.source.seed, self.payload.round, self.client_id)

    def begin(self, learner: FederatedLearner) -> int:
        """Start the round on `learner`: seed every draw, load the payload's weights,
        `start_round`, training mode. Returns the round's SGD steps."""
        seed = self.seed
        torch.manual_seed(seed)
        self.source.augmentations.reseed(seed)
        labels, unlabeled = learner.inputs(self.payload)
        if not labels:  # a self-supervised round: the learner gets the images, never their labels
            self.labeled, self.unlabeled = self.labeled[:0], np.sort(np.concatenate([self.labeled, self.unlabeled]))
        if not unlabeled:
            self.unlabeled = self.unlabeled[:0]
        learner.load_arrays(self.payload.arrays)
        learner.start_round(self.payload, ClientContext(self.client_id, len(self.labeled), len(self.unlabeled), self.state))
        learner.train()
        learner.to(memory_format=self.source.layout)  # back to contiguous in `finish`
        self.unlabeled_batch = self.source.unlabeled_batch(learner) if len(self.unlabeled) else 0
        if self.steps is None:
            budget = round_steps(len(self.labeled), len(self.unlabeled), self.source.train, self.unlabeled_batch)
            self.steps = capped(learner.round_steps(budget), self.payload)
        per_epoch = epoch_steps(len(self.labeled), len(self.unlabeled), self.source.train, self.unlabeled_batch)
        stream = self.batches(np.random.default_rng(seed), self.steps)
        self.loader = RoundBatches(stream, self.steps, per_epoch)
        return self.steps

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.loader is None and self.trainer is not None:
            self.begin(self.trainer.lightning_module)

    def train_dataloader(self) -> RoundBatches:
        if self.loader is None:
            raise RuntimeError("ClientDataModule.begin(learner) must run before its batches are read")
        return self.loader

    @property
    def epochs(self) -> int:
        """Epochs in the round (after `begin`)."""
        return math.ceil(self.steps / self.loader.epoch_steps) if self.loader else 0

    def finish(self, learner: FederatedLearner, metrics: dict[str, float] | None = None,
               shared_names: list[str] | None = None) -> tuple[Update, dict[str, torch.Tensor]]:
        """End the round: the update (the arrays `shared_names`, default every model
        array; a round of no steps stands for no examples) and what the client
        keeps (`end_round`)."""
        # Only the steps see the training layout: updates, states and evaluation read contiguous weights.
        learner.to(memory_format=torch.contiguous_format)
        names = list(learner.model.state_dict()) if shared_names is None else shared_names
        update = Update(
            client_id=self.client_id,
            arrays=learner.arrays(names),
            num_examples=len(self.labeled) + len(self.unlabeled) if self.steps else 0,
            metrics=metrics or {},
        )
        return update, learner.end_round()

    def images(self, indices: np.ndarray, index: torch.Tensor, transform: Transform | None) -> torch.Tensor:
        """The pooled images at `indices` (`index`: the same on the device), augmented."""
        if transform is None:
            return self.source.pool.images[index]
        return self.source.augmented(transform, indices, index)

    def batches(self, rng: np.random.Generator, steps: int) -> Iterator[Batch]:
        """The round's `steps` batches: labeled ("x", "y") and unlabeled ("u_weak",
        "u_strong", "u_index": positions in the client's unlabeled list), each from an
        endless stream reshuffled at every pass. Draws happen as batches are read."""
        cfg, aug, pool = self.source.train, self.source.augmentations, self.source.pool
        device = pool.labels.device
        labeled, unlabeled = self.labeled, self.unlabeled
        labeled_stream = cycle_batches(labeled, cfg.batch_size, rng, drop_last=cfg.drop_last) if len(labeled) else None
        positions = np.arange(len(unlabeled))
        unlabeled_stream = (cycle_batches(positions, self.unlabeled_batch, rng, drop_last=cfg.drop_last)
                            if self.unlabeled_batch and len(unlabeled) else None)
        for _ in range(steps):
            batch: Batch = {}
            if labeled_stream is not None:
                indices = next(labeled_stream)
                index = torch.from_numpy(indices).to(device)
                batch["x"] = self.images(indices, index, aug.labeled)
                batch["y"] = pool.labels[index]
            if unlabeled_stream is not None:
                picked = next(unlabeled_stream)
                indices = unlabeled[picked]
                index = torch.from_numpy(indices).to(device)
                batch["u_weak"] = self.images(indices, index, aug.weak)
                batch["u_strong"] = self.images(indices, index, aug.strong)
                batch["u_index"] = torch.from_numpy(picked)
            yield batch
