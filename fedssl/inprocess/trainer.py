"""Local training of one client at a time on one reused learner, through Lightning Fabric.

The loop trains thousands of short client rounds, so it does not build a Lightning
Trainer per client (DESIGN.md measured that at 1.26x an ideal loop on a CPU, 1.49x
on an H100).
It builds one `Fabric` per run instead, and per client only copies the weights in
and makes the optimizer anew. Fabric supplies what a Trainer would: the device,
the precision (`train.precision`: autocast around `training_step`, float16 loss
scaling in `backward` and the optimizer step), `self.log` inside a learner, and the
LR schedulers `configure_optimizers` returns, stepped as Lightning's dict says. The
batches come from the same `ClientDataModule` a Trainer can fit one client on.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from lightning_fabric import Fabric
from pytorch_lightning.core.optimizer import _configure_optimizers, _configure_schedulers_automatic_opt
from pytorch_lightning.utilities.types import LRSchedulerConfig

from fedssl.config.schema import SSLConfig, TrainConfig
from fedssl.errors import UserError
from fedssl.inprocess.client_data import Augmentations, BatchSource, ClientDataModule, round_steps
from fedssl.messages import Payload, Update
from fedssl.data.tensors import TensorPool
from fedssl.learners.base import Batch, FederatedLearner

__all__ = ["Augmentations", "ClientTrainer", "RoundFabric", "Tally", "client_fabric", "round_steps"]

# Metrics the loop itself computes for every update; a learner's `self.log` of the
# same name does not replace them (the loop's `train_loss` is the returned loss).
LOOP_METRICS = ("train_loss", "pl_seen", "pl_masked", "pl_correct")


class RoundFabric(Fabric):
    """Lightning Fabric that keeps what a learner logs during a client's round.

    A LightningModule attached to Fabric sends `self.log(name, value)` to
    `Fabric.log_dict`, which would turn every value into a Python number at once:
    on a GPU that waits for the device at every step. Here values are kept as they
    are (detached) and averaged once, when the round ends (`logged_means`).
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.logged: dict[str, list[torch.Tensor | float]] = {}

    def log_dict(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"self.log({name!r}): a metric is one number, got a tensor of shape {tuple(value.shape)}")
                value = value.detach()
            self.logged.setdefault(name, []).append(value)

    def last(self, name: str) -> float | None:
        """The latest value logged under `name` (None: never logged), as a Trainer's
        `callback_metrics` holds a metric logged per step."""
        values = self.logged.get(name)
        return float(values[-1]) if values else None

    def logged_means(self) -> dict[str, float]:
        """Each name's mean over the values logged since the last call, which starts anew."""
        means = {name: float(torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()).to("cpu") for v in values])
                             .mean()) for name, values in self.logged.items()}
        self.logged = {}
        return means


def client_fabric(device: torch.device, precision: str) -> RoundFabric:
    """The run's one Fabric on `device` (`federation.execution.device`) at `precision`
    (`train.precision`), or a `UserError` where the device cannot train at it."""
    if precision == "16-mixed" and device.type != "cuda":
        # Lightning would silently train at bf16-mixed instead: say so rather than run what was not asked for.
        raise UserError(f"train.precision: 16-mixed (float16 autocast with loss scaling) needs a CUDA device, and "
                        f"federation.execution.device is {device.type}; use bf16-mixed or 32 there")
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"train.precision: bf16-mixed needs a GPU with bfloat16 support, and "
                        f"{torch.cuda.get_device_name(device)} has none; use 16-mixed or 32")
    devices = [device.index] if device.index is not None else 1
    return RoundFabric(accelerator=device.type, devices=devices, precision=precision)


class Schedules:
    """The LR schedulers `configure_optimizers` returned, stepped where a Lightning
    Trainer steps them: "step" ones after every `frequency`-th batch of an epoch,
    "epoch" ones after every `frequency`-th epoch, ReduceLROnPlateau with the latest
    logged value of its `monitor`, all through the learner's `lr_scheduler_step`.
    An epoch is `ClientDataModule`'s (a local epoch). The optimizer and schedulers
    live for one client's round: a schedule spans a round's local steps."""

    def __init__(self, learner: FederatedLearner, configs: list[LRSchedulerConfig], fabric: RoundFabric):
        self.learner, self.configs, self.fabric = learner, configs, fabric

    def after_batch(self, batch_idx: int) -> None:
        self._update("step", batch_idx + 1)

    def after_epoch(self, epoch: int) -> None:
        self._update("epoch", epoch + 1)

    def _update(self, interval: str, count: int) -> None:
        for config in self.configs:
            if config.interval != interval or count % config.frequency:
                continue
            metric = None
            if config.reduce_on_plateau:
                metric = self.fabric.last(config.monitor)
                if metric is None:
                    if config.strict:
                        raise ValueError(f"ReduceLROnPlateau monitors {config.monitor!r}, which the learner's "
                                         "training_step never logged (self.log)")
                    continue
            self.learner.lr_scheduler_step(config.scheduler, metric)


class ClientTrainer:
    """Runs a learner's `training_step` over one client's batches, through Fabric.

    The model, learner, data tensors and Fabric are built once per run; for each
    client only the weights are copied in and the optimizer is made anew. Every
    random draw comes from (seed, round, client), so the order clients run in never
    matters. At `train.precision: 32` the arithmetic is exactly that of a plain
    PyTorch loop over weights in the same layout (Fabric's full precision adds no
    casts; `train.memory_format` picks channels-last on a CPU, see `training_layout`).
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
        if not learner.automatic_optimization:
            raise ValueError(f"{type(learner).__name__} uses manual optimization, which the client loop does not drive")
        self.learner = learner
        self.pool = pool
        self.train_cfg = train_cfg
        self.shared_names = shared_names
        self.seed = seed
        self.augmentations = augmentations
        self.source = BatchSource(pool, augmentations, train_cfg, ssl_cfg.unlabeled_ratio, seed)
        self.fabric = client_fabric(pool.labels.device, train_cfg.precision)
        self.fabric.to_device(learner)  # already there when the loop built it; Fabric's device is the one that counts
        scaler = getattr(self.fabric.strategy.precision, "scaler", None)
        self.scaler_start = scaler.state_dict() if scaler is not None else None

    def client_data(self, client_id: int, labeled: np.ndarray, unlabeled: np.ndarray, payload: Payload,
                    state: dict[str, torch.Tensor] | None = None, steps: int | None = None) -> ClientDataModule:
        """One client's round as a LightningDataModule (see `fedssl.inprocess.client_data`)."""
        return ClientDataModule(self.source, client_id, labeled, unlabeled, payload, state, steps)

    def optimizer(self) -> tuple[torch.optim.Optimizer, Schedules]:
        """The learner's optimizer, set up with Fabric, and its LR schedulers, as
        Lightning reads what `configure_optimizers` returns."""
        optimizers, schedulers, monitor = _configure_optimizers(self.learner.configure_optimizers())
        if len(optimizers) != 1:
            raise ValueError(f"{type(self.learner).__name__}.configure_optimizers returned {len(optimizers)} optimizers; "
                             "with automatic optimization a learner has exactly one")
        configs = _configure_schedulers_automatic_opt(schedulers, monitor)
        return self.fabric.setup_optimizers(optimizers[0]), Schedules(self.learner, configs, self.fabric)

    def fit(self, client_id: int, labeled: np.ndarray, unlabeled: np.ndarray, payload: Payload,
            state: dict[str, torch.Tensor] | None = None, steps: int | None = None) -> tuple[Update, dict[str, torch.Tensor]]:
        """Train from the payload's weights (`steps` steps, default: the recipe's
        budget); the update and what the client keeps."""
        data = self.client_data(client_id, labeled, unlabeled, payload, state, steps)
        learner, fabric = self.learner, self.fabric
        data.begin(learner)
        optimizer, schedules = self.optimizer()
        if self.scaler_start is not None:  # float16's loss scale starts afresh: a client's result never depends on who ran before
            fabric.strategy.precision.load_state_dict(self.scaler_start)
        tally = Tally()
        device = self.pool.labels.device
        truth = self.pool.labels[torch.from_numpy(data.unlabeled).to(device)] if len(data.unlabeled) else None
        fabric.logged = {}
        learner.fabric = fabric  # `self.log` in training_step now reaches `fabric.log_dict`
        try:
            loader = data.train_dataloader()
            for epoch in range(data.epochs):
                for batch_idx, batch in enumerate(loader):
                    optimizer.zero_grad(set_to_none=True)
                    with fabric.autocast():
                        out = learner.training_step(batch, batch_idx)
                    loss = out["loss"] if isinstance(out, dict) else out
                    fabric.backward(loss)
                    optimizer.step()
                    schedules.after_batch(batch_idx)
                    tally.add(loss, out if isinstance(out, dict) else {}, batch, truth)
                schedules.after_epoch(epoch)
        finally:
            learner.fabric = None  # a Trainer that fits this learner later logs through itself
            learner.to(memory_format=torch.contiguous_format)  # as `finish` leaves it, should a step raise
        # Not finite (a ratio of nothing): not sent, as the server refuses such metrics; train_loss still tells divergence.
        logged = {name: value for name, value in fabric.logged_means().items()
                  if name not in LOOP_METRICS and math.isfinite(value)}
        return data.finish(learner, logged | tally.metrics(), self.shared_names)


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
