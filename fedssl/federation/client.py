"""Local training of one client at a time on one reused model."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch

from fedssl.config.schema import TrainConfig
from fedssl.data.transforms import augment_batch, reseed, to_tensor
from fedssl.federation.messages import Payload, Update
from fedssl.federation.tensors import TensorPool, batch_indices, client_seed


class ClientTrainer:
    """Runs a learner's `training_step` over a client's batches.

    The model, learner and the views of its weights are built once per run; for
    each client only the weights are copied in and the optimizer is made anew (its
    state belongs to no one across rounds). This is the light path the federation
    loop uses instead of a Lightning Trainer per client.
    """

    def __init__(
        self,
        learner: pl.LightningModule,
        pool: TensorPool,
        train_cfg: TrainConfig,
        shared_names: list[str],
        seed: int,
        transform: A.Compose | None = None,
    ):
        self.learner = learner
        self.pool = pool
        self.train_cfg = train_cfg
        self.shared_names = shared_names
        self.seed = seed
        self.transform = transform
        # state_dict() tensors share storage with the live parameters and buffers
        self.weights = learner.model.state_dict()

    def load(self, arrays: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in arrays.items():
                self.weights[name].copy_(value)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(indices).to(self.pool.labels.device)
        if self.transform is None:
            images = self.pool.images[index]
        else:
            images = to_tensor(augment_batch(self.transform, self.pool.raw[indices])).to(index.device)
        return images, self.pool.labels[index]

    def fit(self, client_id: int, labeled: np.ndarray, payload: Payload) -> Update:
        seed = client_seed(self.seed, payload.round, client_id)
        torch.manual_seed(seed)
        if self.transform is not None:
            reseed(self.transform, seed)
        self.load(payload.arrays)
        self.learner.start_round(payload.arrays)
        self.learner.train()
        optimizer = self.learner.configure_optimizers()
        cfg = self.train_cfg
        losses = []
        batches = batch_indices(labeled, cfg.batch_size, cfg.local_epochs, cfg.local_steps, np.random.default_rng(seed))
        for step, indices in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            loss = self.learner.training_step(self.batch(indices), step)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        metrics = {"train_loss": float(torch.stack(losses).mean())} if losses else {}
        arrays = {name: self.weights[name].detach().clone() for name in self.shared_names}
        return Update(client_id=client_id, arrays=arrays, num_examples=len(labeled), metrics=metrics)
