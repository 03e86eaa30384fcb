"""The in-process federation loop, fedssl's default backend.

One round: sample clients -> payload down -> local fit -> updates up -> aggregate
-> evaluate -> log -> checkpoint. All randomness is drawn from (seed, round,
client), so a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedssl.config.load import to_dict
from fedssl.config.schema import RecipeConfig
from fedssl.data.federated import FederatedData, build_federated_data
from fedssl.data.sources import load_source
from fedssl.data.transforms import build_transform
from fedssl.errors import UserError
from fedssl.federation.aggregate import ServerState
from fedssl.federation.algorithm import Algorithm, build_algorithm
from fedssl.federation.checkpoint import load_checkpoint, restore_rng_states, save_checkpoint
from fedssl.federation.client import Augmentations, ClientTrainer
from fedssl.federation.evaluate import score
from fedssl.federation.messages import Payload, Update
from fedssl.federation.metrics import client_kind, mean_acc, round_metrics
from fedssl.federation.sampling import clients_per_round, sample_clients
from fedssl.federation.state import ClientStateStore
from fedssl.federation.tensors import TensorPool
from fedssl.launch import CHECKPOINT
from fedssl.logging.run_logger import RunLogger
from fedssl.models.factory import build_model

SERVER_ID = -1  # the server's "client id" when it trains on its own labeled data
# Keys that may differ between a killed run and its resumption.
RESUMABLE_CHANGES = ("federation.rounds", "federation.eval_every", "logging.", "output_dir")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("federation.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


@dataclass
class Federation:
    """Everything a run builds once and reuses every round."""

    cfg: RecipeConfig
    data: FederatedData
    algorithm: Algorithm
    trainer: ClientTrainer
    test: TensorPool
    store: ClientStateStore

    @classmethod
    def build(cls, cfg: RecipeConfig, data: FederatedData | None = None) -> Federation:
        """Build from the recipe; `data` replaces the recipe's data source (benchmarks)."""
        device = resolve_device(cfg.federation.device)
        if data is None:
            data = build_federated_data(load_source(cfg.data), cfg.data, cfg.federation.clients, cfg.seed)
        torch.manual_seed(cfg.seed)  # the initial weights
        model = build_model(cfg.model, data.pool.num_classes, data.pool.channels, cfg.data.image_size)
        algorithm = build_algorithm(cfg)
        learner = algorithm.make_learner(model).to(device)
        pool = TensorPool.from_dataset(data.pool, device)
        size = cfg.data.image_size
        augmentations = Augmentations(
            labeled=None if cfg.data.augment == "none" else build_transform(cfg.data.augment, size),
            weak=build_transform("weak", size),
            strong=build_transform("strong", size),
        )
        trainer = ClientTrainer(learner, pool, cfg.train, cfg.algorithm.ssl, algorithm.shared_names(learner),
                                cfg.seed, augmentations)
        return cls(cfg, data, algorithm, trainer, TensorPool.from_dataset(data.test, device), ClientStateStore())

    @property
    def pool(self) -> TensorPool:
        return self.trainer.pool

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.learner.model

    @property
    def kinds(self) -> dict[int, str]:
        return {c.client_id: client_kind(c) for c in self.data.clients}

    def initial_state(self) -> ServerState:
        return self.algorithm.init_server_state(self.trainer.learner.arrays(self.trainer.shared_names))

    def train_on_server(self, payload: Payload) -> Update:
        steps = self.cfg.algorithm.ssl.server_steps
        update, _ = self.trainer.fit(SERVER_ID, self.data.server_labeled, self.data.server_labeled[:0], payload, steps=steps)
        return update

    def fit_round(self, round_index: int, state: ServerState) -> tuple[ServerState, dict[str, float]]:
        fed = self.cfg.federation
        has_server_labels = len(self.data.server_labeled) > 0 and self.cfg.algorithm.ssl.server_steps > 0
        state = self.algorithm.server_round(round_index, state, self.train_on_server if has_server_labels else None)
        sampled = sample_clients(fed.clients, clients_per_round(fed), self.cfg.seed, round_index)
        updates, bytes_down = [], 0
        for client_id in sampled:
            client = self.data.clients[client_id]
            payload = self.algorithm.payload(round_index, state, client_id)
            bytes_down += payload.num_bytes
            try:
                update, kept = self.trainer.fit(client_id, client.labeled, client.unlabeled, payload, self.store.get(client_id))
            except Exception as error:
                raise RuntimeError(f"client {client_id} failed in round {round_index}: {type(error).__name__}: {error}") from error
            if kept:
                self.store.put(client_id, kept)
            updates.append(update)
        metrics = round_metrics(updates, self.kinds) | {"bytes_down": bytes_down}
        return self.algorithm.aggregate(updates, state), metrics

    def evaluate(self, state: ServerState) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The global model on the server test set and on every client's local test split."""
        self.trainer.learner.load_arrays(self.algorithm.global_weights(state))
        server = score(self.model, self.test.images, self.test.labels)
        rows = []
        for client in self.data.clients:
            index = torch.from_numpy(client.test).to(self.pool.labels.device)
            local = score(self.model, self.pool.images[index], self.pool.labels[index])
            rows.append({"client": client.client_id, "kind": client_kind(client), "test_samples": local.count,
                         "acc": local.accuracy, "loss": local.loss})
        metrics = {"global_acc": server.accuracy, "global_loss": server.loss, "client_acc_mean": mean_acc(rows)}
        kinds = sorted({row["kind"] for row in rows})
        if len(kinds) > 1:
            metrics |= {f"client_acc_mean/{kind}": mean_acc([r for r in rows if r["kind"] == kind]) for kind in kinds}
        return metrics, rows


def check_resumable(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> None:
    """Refuse to resume a run under a recipe that would change its results."""
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            check_resumable(old, new, f"{dotted}.")
        elif old != new and not dotted.startswith(RESUMABLE_CHANGES):
            raise UserError(f"cannot resume: {dotted} was {old!r} in the killed run and is {new!r} now")


def run_federation(cfg: RecipeConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a federation; returns the summary also written to summary.json."""
    config_dict = to_dict(cfg)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT) if resume else None
    if checkpoint:
        check_resumable(checkpoint["config"], config_dict)
    federation = Federation.build(cfg)
    federation.data.save(run_dir / "partition.npz")
    state, start, elapsed, wandb_id = federation.initial_state(), 1, 0.0, None
    totals = {"bytes_up": 0, "bytes_down": 0}
    if checkpoint:
        state = ServerState(**checkpoint["server_state"])
        federation.store.load_state_dict(checkpoint["client_states"])
        restore_rng_states(checkpoint["rng"])
        start, elapsed, wandb_id = checkpoint["round"] + 1, checkpoint["seconds"], checkpoint["wandb_id"]
        totals = checkpoint["totals"]

    fed = cfg.federation
    logger = RunLogger(cfg, run_dir, config_dict, resume_after=start - 1, wandb_id=wandb_id)
    progress = tqdm(range(start, fed.rounds + 1), desc=cfg.name, unit="round", disable=not cfg.logging.progress,
                    initial=start - 1, total=fed.rounds)
    metrics, rows = {}, []
    try:
        for round_index in progress:
            began = time.perf_counter()
            state, metrics = federation.fit_round(round_index, state)
            totals["bytes_up"] += metrics["bytes_up"]
            totals["bytes_down"] += metrics["bytes_down"]
            if round_index % fed.eval_every == 0 or round_index == fed.rounds:
                evaluated, rows = federation.evaluate(state)
                metrics |= evaluated
                progress.set_postfix(acc=f"{evaluated['global_acc']:.3f}")
            elapsed += time.perf_counter() - began
            metrics["seconds"] = elapsed
            logger.log_round(round_index, metrics)
            save_checkpoint(run_dir / CHECKPOINT, {
                "round": round_index,
                "config": config_dict,
                "server_state": {"params": state.params, "momentum": state.momentum},
                "client_states": federation.store.state_dict(),
                "seconds": elapsed,
                "totals": totals,
                "wandb_id": logger.wandb_id,
            })
    except BaseException:
        logger.abort()
        raise
    if not rows:  # resumed after the last round: nothing trained, evaluate what is there
        evaluated, rows = federation.evaluate(state)
        metrics |= evaluated
    summary = {
        "name": cfg.name,
        "algorithm": cfg.algorithm.name,
        "rounds": fed.rounds,
        "global_acc": metrics["global_acc"],
        "global_loss": metrics["global_loss"],
        "client_acc_mean": metrics["client_acc_mean"],
        **{k: v for k, v in metrics.items() if k.startswith(("client_acc_mean/", "pl_"))},
        **totals,
        "seconds": elapsed,
    }
    logger.finish(summary, rows, last_round=fed.rounds)
    return summary
