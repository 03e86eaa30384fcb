"""The run's clients in this process (`fedssl.clients.Clients`): one learner reused
for every client, trained by an executor (`fedssl.inprocess.executors`: one client
after another, a cohort at once with `federation.execution.concurrency: vmap`, or in worker
processes with `federation.execution.workers`) and scored on it (`fedssl.inprocess.scoring`).
Each client's round decodes its payload and encodes its update as it would on a
node of its own (`federation.downlink`, `federation.uplink`). A Flower node runs one
of these over its own clients and nothing of the server's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping

import numpy as np
import torch

from fedssl.algorithms.base import Algorithm, build_algorithm
from fedssl.clients import Holding, Scored
from fedssl.codecs.links import Links, split_state
from fedssl.config.schema import RecipeConfig
from fedssl.data.federated import FederatedData
from fedssl.data.tensors import TensorPool
from fedssl.errors import UserError
from fedssl.evaluation.metrics import client_kind
from fedssl.evaluation.unseen import scored_indices
from fedssl.inprocess.executors import Executor, Sequential, executor_for
from fedssl.inprocess.scoring import Scorer
from fedssl.inprocess.state import ClientStateStore
from fedssl.inprocess.trainer import Augmentations, ClientTrainer
from fedssl.inprocess.workers import Kept
from fedssl.messages import Arrays, Payload, Update, array_bytes
from fedssl.models.factory import build_model, input_normalization
from fedssl.sampling import held_out_clients

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("federation.execution.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def build_trainer(cfg: RecipeConfig, data: FederatedData, device: torch.device) -> tuple[Algorithm, ClientTrainer]:
    """The run's algorithm and the trainer of its learner over `data`'s image pool
    (the initial weights drawn from the run seed, wherever this is built)."""
    algorithm = build_algorithm(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.pool.num_classes, data.pool.channels, cfg.data.image_size)
    learner = algorithm.make_learner(model).to(device)
    augmentations = Augmentations.build(cfg.data)
    normalization = input_normalization(cfg.model, cfg.data.channels)
    trainer = ClientTrainer(learner, TensorPool.from_dataset(data.pool, device, normalization), cfg.train, cfg.algorithm.ssl,
                            algorithm.shared_names(learner), cfg.seed, augmentations)
    return algorithm, trainer


class DataHoldings(Mapping[int, Holding]):
    """What each client of `data` holds: its training examples, the samples it is
    scored on (its local test split; a held-out client's, all but its labeled ones)
    and kind. Worked out for a client when it is asked for, so that a population of
    100,000 costs nothing until its clients are sampled."""

    def __init__(self, data: FederatedData, held_out: Collection[int] = ()):
        self.data, self.held_out = data, held_out

    def __getitem__(self, client_id: int) -> Holding:
        if isinstance(client_id, bool) or not isinstance(client_id, (int, np.integer)) \
                or not 0 <= client_id < len(self.data.clients):
            raise KeyError(client_id)
        c = self.data.clients[client_id]
        return Holding(len(c.labeled) + len(c.unlabeled),
                       len(scored_indices(c.labeled, c.unlabeled, c.test, c.client_id in self.held_out)), client_kind(c))

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.data.clients)))

    def __len__(self) -> int:
        return len(self.data.clients)


def data_holdings(data: FederatedData, held_out: Collection[int] = ()) -> DataHoldings:
    """What each client of `data` holds (`DataHoldings`)."""
    return DataHoldings(data, held_out)


@dataclass
class InProcessClients:
    """The clients of `data`, trained in this process on one reused learner by an
    executor (`fedssl.inprocess.executors`) and scored on it (`fedssl.inprocess.scoring`)."""

    cfg: RecipeConfig
    data: FederatedData
    algorithm: Algorithm
    trainer: ClientTrainer
    store: ClientStateStore
    links: Links  # the codecs on each link: payloads are decoded here, updates encoded
    executor: Executor | None = None  # how `fit` trains the clients; None: one after another (`Sequential`)
    pending: dict[int, Kept] = field(default_factory=dict)  # what the last fit's clients would keep

    def __post_init__(self) -> None:
        """Clients built without `build` (a test's) train one after another."""
        if self.executor is None:
            self.executor = Sequential(self)

    @classmethod
    def build(cls, cfg: RecipeConfig, data: FederatedData, algorithm: Algorithm | None = None,
              trainer: ClientTrainer | None = None) -> InProcessClients:
        """The clients of `data`; `algorithm` and `trainer` are the server's where it
        shares them (in process), else built here (a Flower node)."""
        device = resolve_device(cfg.federation.execution.device)
        if trainer is None:
            algorithm, trainer = build_trainer(cfg, data, device)
        store = ClientStateStore(cfg.federation.execution.states_in_memory, cfg.federation.execution.state_dir or None)
        clients = cls(cfg, data, algorithm, trainer, store, Links.build(cfg))
        clients.executor = executor_for(clients, device)
        return clients

    @cached_property
    def held_out(self) -> frozenset[int]:
        """Clients that never train, scored as unseen people (`federation.evaluation.holdout_clients`)."""
        return held_out_clients(self.cfg.federation, self.cfg.seed)

    @cached_property
    def holdings(self) -> Mapping[int, Holding]:
        return data_holdings(self.data, self.held_out)

    @cached_property
    def scorer(self) -> Scorer:
        """Scores clients on the same learner and with the same kept state as they train."""
        return Scorer(self.cfg, self.data, self.algorithm, self.trainer, self.store, self.held_out)

    @property
    def pool(self) -> TensorPool:
        return self.trainer.pool

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.learner.model

    def train(self, client_id: int, payload: Payload, state: Kept | None = None) -> tuple[Update | Exception, Kept]:
        """One client's round from its payload as it travelled: its update as it
        travels back (or the exception it raised) and what it would keep. `state`:
        what it kept from earlier rounds (default: read from the store; a worker
        process is sent it)."""
        client = self.data.clients[client_id]
        fit = lambda opened, own: self.trainer.fit(client_id, client.labeled, client.unlabeled, opened, own)
        try:
            return self.round(client_id, payload, fit, state)
        except UserError:
            raise  # a mistake in the recipe, not a faulty client
        except Exception as error:
            log.debug("client %d raised", client_id, exc_info=True)
            return error, {}

    def round(self, client_id: int, payload: Payload, fit: Callable[[Payload, Kept], tuple[Update, Kept]],
              state: Kept | None = None) -> tuple[Update, Kept]:
        """A client's round around `fit(decoded payload, own state) -> (update, kept)`:
        the payload decoded as the client decodes it, the update encoded as it travels
        back, and what the client keeps (`send`). `state` as for `train`."""
        payload = self.open_payload(client_id, payload)
        own, residuals = split_state(self.store.get(client_id) if state is None else state)
        update, kept = fit(payload, own)
        return self.send(update, payload, kept, own, residuals)

    def open_payload(self, client_id: int, payload: Payload) -> Payload:
        """The payload with the weights the client decodes from it (`federation.downlink`)."""
        if not self.links.down:
            return payload
        return self.links.open_payload(payload, client_id, self.trainer.learner.arrays(self.trainer.shared_names))

    def send(self, update: Update, payload: Payload, kept: Kept, own: Kept, residuals: Kept) -> tuple[Update, Kept]:
        """The update encoded for the uplink (its delta from the payload's weights), and
        what the client keeps: its learner's new state (`kept`; nothing: its earlier
        state `own` stays) and, with error feedback, its new residuals."""
        if not self.links.up:
            return update, kept
        encoded, new_residuals = self.links.send_update(update, payload.arrays, payload.round, residuals)
        return encoded, (kept or own) | new_residuals if new_residuals else kept

    def fit(self, round_index: int, payloads: dict[int, Payload]) -> Iterator[tuple[int, Update | Exception, str | None]]:
        """Each client trained by the executor, in the payloads' order; what each would
        keep waits for `accept`."""
        self.pending = {}
        for client_id, update, kept in self.executor.fit(round_index, payloads):
            self.pending[client_id] = kept
            yield client_id, update, raised(update)

    def accept(self, client_ids: Collection[int]) -> None:
        for client_id in client_ids:
            if self.pending.get(client_id):
                self.store.put(client_id, self.pending[client_id])
        self.pending = {}

    def score(self, weights: Arrays, client_ids: list[int]) -> Scored:
        """Every client's row, counting the global weights as sent to each client, as
        to a node of its own."""
        return Scored(self.score_rows(weights, client_ids), bytes_down=len(client_ids) * array_bytes(weights))

    def score_rows(self, weights: Arrays, client_ids: list[int]) -> list[dict[str, Any]]:
        """Each client's row (`Scorer.rows`): what a node answers an evaluate message with."""
        return self.scorer.rows(weights, client_ids)

    def state_dict(self, directory: Path | None = None, round_index: int = 0) -> dict:
        return self.store.state_dict(directory, round_index)

    def load_state_dict(self, states: dict, directory: Path | None = None) -> None:
        self.store.load_state_dict(states, directory)

    def close(self) -> None:
        """Release the executor's worker processes, if any (the run is over)."""
        self.executor.close()


def raised(update: Update | Exception) -> str | None:
    """Why a client's reply is unusable where it is an exception (`Clients.fit`)."""
    return f"it raised {type(update).__name__}: {update}" if isinstance(update, Exception) else None
