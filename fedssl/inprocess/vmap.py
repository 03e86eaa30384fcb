"""Training a cohort of clients at once: `torch.func.vmap` over stacked client weights.

A batch-10 SGD step of a small CNN leaves a GPU nearly idle: the sequential loop
runs at about 5k images/s on an H100 that trains the same model at >600k images/s
with large batches (DESIGN.md). Clients that share an architecture can instead be
trained together: their weights are stacked along a new leading dimension (one
slice per client), each client's mini-batch is stacked likewise, and one
`vmap(grad(loss))` computes every client's gradient in one set of kernels. This is
the "model ensembling" recipe of torch.func (PyTorch's tutorial of that name,
after JAX's `vmap`); FedJAX (Ro et al., "FedJAX: Federated learning simulation
with JAX", 2021) vectorizes client training the same way.

The results equal the sequential `ClientTrainer`'s (Lightning Fabric at
`train.precision: 32`) up to floating point: each
client draws exactly its sequential batches (the same per-(seed, round, client)
streams, and its own copy of the augmentation pipeline reseeded alike), and the
update is `torch.optim.SGD`'s (weight decay, then momentum) written out per
client. Clients with fewer steps finish early: the cohort is sorted by step count,
so the clients still training are always a prefix and finished ones are left alone.

Only what this can reproduce exactly is vectorized (`blocker` says why not): the
plain supervised learner (FedAvg, FedProx) with SGD at full precision (the step
keeps its own torch.func arithmetic, without Fabric's autocast), on a model without buffers
(BatchNorm's running statistics are updated in place) and without random layers
in training mode (dropout would draw differently). Everything else trains one
client at a time.
"""

from __future__ import annotations

import copy
import logging
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from fedssl.config.schema import RecipeConfig
from fedssl.inprocess.trainer import ClientTrainer, round_steps
from fedssl.inprocess.client_data import capped
from fedssl.messages import Payload, Update
from fedssl.data.tensors import client_seed, cycle_batches
from fedssl.learners.supervised import SupervisedLearner

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


def blocker(cfg: RecipeConfig, trainer: ClientTrainer) -> str | None:
    """Why this run's clients cannot be trained together, or None if they can."""
    learner = trainer.learner
    if cfg.train.precision != "32":
        return f"train.precision={cfg.train.precision}; only 32 is vectorized (the cohort step runs without autocast)"
    if type(learner) is not SupervisedLearner:
        return (f"algorithm.name={cfg.algorithm.name} trains with {type(learner).__name__}; only the plain "
                "supervised learner (fedavg, fedprox) is vectorized")
    if cfg.train.optimizer != "sgd":
        return f"train.optimizer={cfg.train.optimizer}; only sgd is vectorized"
    buffers = [name for name, _ in learner.model.named_buffers()]
    if buffers:
        return (f"model {cfg.model.name} has buffers ({buffers[0]}, ...), such as BatchNorm running statistics, "
                "which one vectorized step cannot update per client")
    names = [name for name, _ in learner.model.named_parameters()]
    if sorted(names) != sorted(trainer.shared_names):
        return "the model's parameters are not exactly the arrays the clients send"
    try:  # a random layer (dropout) or an op without a batching rule raises here
        CohortTrainer(trainer, cfg).probe()
    except Exception as error:  # noqa: BLE001 - any failure means: train one at a time
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"the model's training step cannot be vectorized ({type(error).__name__}: {first_line})"
    return None


class CohortTrainer:
    """Trains clients at once with the sequential path's batches and SGD; the
    supervised learner's loss (cross-entropy, plus FedProx's proximal term) is
    re-expressed as a function of one client's weights."""

    def __init__(self, trainer: ClientTrainer, cfg: RecipeConfig):
        self.trainer = trainer
        self.cfg = cfg
        self.model = trainer.learner.model
        self.mu = trainer.learner.proximal_mu
        self.names = [name for name, _ in self.model.named_parameters()]
        # in_dims 0 throughout: weights, images, labels, sample weights and each
        # client's own global weights (FedProx's anchor) are all stacked per client.
        self.step = vmap(grad_and_value(self.loss))

    def loss(self, params: Tensors, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
             anchor: Tensors) -> torch.Tensor:
        """One client's loss on its batch; `weight` is 0 for padding (a short last
        batch of a pass is padded to the batch size), so the loss is the batch mean."""
        logits = functional_call(self.model, params, (x,))
        loss = (F.cross_entropy(logits, y, reduction="none") * weight).sum() / weight.sum()
        if self.mu > 0:  # as SupervisedLearner.proximal_term
            squared = [(params[name] - anchor[name]).pow(2).sum() for name in self.names]
            loss = loss + 0.5 * self.mu * torch.stack(squared).sum()
        return loss

    def probe(self) -> None:
        """One vectorized step of two clients on a dummy batch (raises if impossible)."""
        self.model.train()
        params = {n: torch.stack([p.detach()] * 2) for n, p in self.model.named_parameters()}
        index = torch.zeros(2, self.cfg.train.batch_size, dtype=torch.long, device=self.trainer.pool.labels.device)
        x, y = self.trainer.pool.images[index], self.trainer.pool.labels[index]
        self.step(params, x, y, torch.ones(index.shape, device=x.device), params)

    def fit(self, clients: list[tuple[int, np.ndarray, Payload]]) -> list[Update]:
        """Train every (client id, labeled indices, payload) at once; their updates, in
        the given order, as `ClientTrainer.fit` makes them (the caller chunks a large
        cohort, `federation.execution.concurrent_clients`)."""
        train, pool = self.cfg.train, self.trainer.pool
        device = pool.labels.device
        steps = [capped(round_steps(len(labeled), 0, train, 0), payload) for _, labeled, payload in clients]
        # Longest first: at step t the clients still training are the first `active[t]`.
        order = sorted(range(len(clients)), key=lambda k: -steps[k])
        given = [client_id for client_id, _, _ in clients]
        clients, steps = [clients[k] for k in order], [steps[k] for k in order]
        seeds = [client_seed(self.trainer.seed, payload.round, client_id) for client_id, _, payload in clients]
        rows, weight, real = self.batch_indices(clients, seeds, steps)
        index, weight = torch.from_numpy(rows).to(device), torch.from_numpy(weight).to(device)
        augment = self.augmenters(seeds)
        active = [sum(s > t for s in steps) for t in range(max(steps, default=0))]

        model_params = dict(self.model.named_parameters())
        params = {n: torch.stack([payload.arrays[n] for _, _, payload in clients]).to(device, model_params[n].dtype)
                  for n in self.names}
        anchor = {n: p.clone() for n, p in params.items()} if self.mu > 0 else {}
        momentum = {n: torch.zeros_like(p) for n, p in params.items()} if train.momentum else {}
        losses = torch.zeros(len(active), len(clients), device=device)  # stays on the device: no sync per step
        self.model.train()
        for t, n in enumerate(active):
            x = self.images(index[:n, t], rows[:n, t], real[:n, t], augment)
            grads, loss = self.step({k: p[:n] for k, p in params.items()}, x, pool.labels[index[:n, t]],
                                    weight[:n, t], {k: a[:n] for k, a in anchor.items()})
            losses[t, :n] = loss.detach()
            with torch.no_grad():
                for name, p in params.items():
                    self.sgd(p[:n], grads[name], momentum[name][:n] if momentum else None)

        losses = losses.cpu()  # one transfer, not one per client
        updates = {}
        for k, (client_id, labeled, _) in enumerate(clients):
            arrays = {name: params[name][k].clone() for name in self.trainer.shared_names}
            metrics = {"train_loss": float(losses[: steps[k], k].mean())} if steps[k] else {}
            updates[client_id] = Update(client_id=client_id, arrays=arrays,
                                        num_examples=len(labeled) if steps[k] else 0, metrics=metrics)
        return [updates[client_id] for client_id in given]

    def sgd(self, param: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None) -> None:
        """`torch.optim.SGD`'s step in place (no dampening or Nesterov: the recipe has
        neither); its first momentum step copies the gradient, the same as 0 * m + g."""
        train = self.cfg.train
        if train.weight_decay:
            grad = grad.add(param, alpha=train.weight_decay)
        if buffer is not None:
            buffer.mul_(train.momentum).add_(grad)
            grad = buffer
        param.add_(grad, alpha=-train.lr)

    def batch_indices(self, clients: list[tuple[int, np.ndarray, Payload]], seeds: list[int],
                      steps: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every client's batches, as pool indices (clients, steps, batch), sample
        weights (1 real, 0 padding) and real sizes (clients, steps), drawn exactly
        as `ClientTrainer.batches` does.
        A finished client's steps hold its first sample with weight 1: never trained
        on, but a finite loss."""
        batch = self.cfg.train.batch_size
        shape = (len(clients), max(steps, default=0), batch)
        index, weight = np.zeros(shape, dtype=np.int64), np.ones(shape, dtype=np.float32)
        real = np.full(shape[:2], batch)
        for k, ((_, labeled, _), seed) in enumerate(zip(clients, seeds)):
            if not steps[k]:
                continue
            index[k] = labeled[0]
            stream = cycle_batches(labeled, batch, np.random.default_rng(seed), drop_last=self.cfg.train.drop_last)
            for t, drawn in enumerate(islice(stream, steps[k])):
                index[k, t, : len(drawn)] = drawn
                weight[k, t, len(drawn) :] = 0.0
                real[k, t] = len(drawn)
        return index, weight, real

    def augmenters(self, seeds: list[int]) -> list | None:
        """Each client's own copy of the labeled augmentation, reseeded as the
        sequential path reseeds the shared one (None: no augmentation)."""
        if self.trainer.augmentations.labeled is None:
            return None
        copies = [copy.deepcopy(self.trainer.augmentations) for _ in seeds]
        for augmentations, seed in zip(copies, seeds):
            augmentations.reseed(seed)
        return [augmentations.labeled for augmentations in copies]

    def images(self, index: torch.Tensor, rows: np.ndarray, real: np.ndarray, augment: list | None) -> torch.Tensor:
        """The stacked batch (clients, batch, C, H, W) at `index` (`rows`: the same on the
        host, `real`: each client's batch size before padding), augmented per client as
        in the sequential path (padding is left as is)."""
        x = self.trainer.pool.images[index]  # a gather: a new tensor
        if augment is None:
            return x
        for k, size in enumerate(real):
            x[k, :size] = self.trainer.source.augmented(augment[k], rows[k, :size], index[k, :size])
        return x


def cohort_trainer(cfg: RecipeConfig, trainer: ClientTrainer, device: torch.device) -> CohortTrainer | None:
    """The cohort trainer `federation.execution.concurrency` asks for, or None (one client at a
    time). Where vmap is asked for but cannot be used, one log line says why."""
    mode = cfg.federation.execution.concurrency
    if mode == "sequential" or (mode == "auto" and device.type != "cuda"):
        return None  # auto: on a CPU the sequential loop already matches an ideal loop (BENCHMARKS.md)
    reason = blocker(cfg, trainer)
    if reason:
        log.log(logging.WARNING if mode == "vmap" else logging.INFO,
                "federation.execution.concurrency=%s: training clients one at a time: %s", mode, reason)
        return None
    return CohortTrainer(trainer, cfg)
