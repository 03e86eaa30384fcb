"""How `InProcessClients.fit` trains a round's clients: one after another
(`Sequential`), a cohort at once with torch.func.vmap (`Vmap`,
`federation.execution.concurrency`, `fedssl.inprocess.vmap`), or in worker processes
(`Workers`, `federation.execution.workers`, `fedssl.inprocess.workers`).

Each yields (client, its update as it travels back or the exception it raised,
what it would keep) in the payloads' order, whichever: the engine aggregates in
that order, so an executor changes how fast a round trains, never what it sums
(vmap aside, which rounds floating point differently). Every client's round runs
through `InProcessClients.train` (or, for an update trained together,
`InProcessClients.round`), so the codecs and kept state are those of one client
trained alone.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from fedssl.config.schema import RecipeConfig
from fedssl.data.federated import FederatedData
from fedssl.errors import UserError
from fedssl.inprocess.state import ClientStateStore
from fedssl.inprocess.trainer import ClientTrainer, round_steps
from fedssl.inprocess.vmap import CohortTrainer, cohort_trainer
from fedssl.inprocess.workers import Kept, WorkerPool, worker_count
from fedssl.messages import Payload, Update
from fedssl.sampling import clients_per_round

log = logging.getLogger(__name__)

Fitted = tuple[int, Update | Exception, Kept]  # a client, its update (or the exception it raised), what it would keep


class InProcessClients(Protocol):
    """What an executor needs of the clients it trains (`fedssl.inprocess.clients.InProcessClients`)."""

    cfg: RecipeConfig
    data: FederatedData
    trainer: ClientTrainer
    store: ClientStateStore
    held_out: frozenset[int]

    def train(self, client_id: int, payload: Payload, state: Kept | None = None) -> tuple[Update | Exception, Kept]:
        """One client's round from its payload as it travelled."""

    def round(self, client_id: int, payload: Payload, fit: Callable[[Payload, Kept], tuple[Update, Kept]],
              state: Kept | None = None) -> tuple[Update, Kept]:
        """A client's round around `fit`: its payload decoded, its update encoded."""

    def open_payload(self, client_id: int, payload: Payload) -> Payload:
        """The payload with the weights the client decodes from it."""


class Executor(Protocol):
    def fit(self, round_index: int, payloads: dict[int, Payload]) -> Iterator[Fitted]:
        """Train each client from its payload as it travelled, in the payloads' order."""

    def close(self) -> None:
        """Release what the executor holds outside this process (the run is over)."""


@dataclass
class Sequential:
    """One client after another in this process, on the run's one learner."""

    clients: InProcessClients

    def fit(self, round_index: int, payloads: dict[int, Payload]) -> Iterator[Fitted]:
        for client_id, payload in payloads.items():
            yield client_id, *self.clients.train(client_id, payload)

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class Vmap:
    """`chunk` clients at a time trained together by `cohort`; those it cannot train
    (no labeled data, or the chunk raised) one at a time, as `Sequential` does."""

    clients: InProcessClients
    cohort: CohortTrainer
    chunk: int  # federation.execution.concurrent_clients: how many clients one cohort stacks

    def fit(self, round_index: int, payloads: dict[int, Payload]) -> Iterator[Fitted]:
        ids = list(payloads)
        for start in range(0, len(ids), self.chunk):
            chunk = {c: payloads[c] for c in ids[start : start + self.chunk]}
            together = self.together(round_index, chunk)
            for client_id, payload in chunk.items():
                if client_id in together:  # trained from the decoded payload; encoded as `train` would
                    trained = lambda opened, own: (together[client_id], {})
                    yield client_id, *self.clients.round(client_id, payload, trained)
                else:
                    yield client_id, *self.clients.train(client_id, payload)

    def together(self, round_index: int, payloads: dict[int, Payload]) -> dict[int, Update]:
        """The updates of the clients the cohort trainer trains at once. Clients without
        labeled data are left to `train` (they have nothing to stack); so is the whole
        chunk if training it together raises, for `train` to isolate a faulty client."""
        data = self.clients.data
        cohort = [(c, data.clients[c].labeled, self.clients.open_payload(c, p)) for c, p in payloads.items()
                  if len(data.clients[c].labeled)]
        if not cohort:
            return {}
        try:
            return {u.client_id: u for u in self.cohort.fit(cohort)}
        except UserError:
            raise
        except Exception as error:
            log.warning("round %d: training %d clients together raised %s: %s; training them one at a time",
                        round_index, len(cohort), type(error).__name__, error)
            return {}

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class Workers:
    """Each client trained by `InProcessClients.train` in one of `pool`'s worker
    processes, sent its payload and its kept state from this process's store."""

    clients: InProcessClients
    pool: WorkerPool

    def fit(self, round_index: int, payloads: dict[int, Payload]) -> Iterator[Fitted]:
        return self.pool.map(list(payloads), lambda c: (payloads[c], self.clients.store.get(c)))

    def close(self) -> None:
        """End the worker processes."""
        self.pool.close()


def executor_for(clients: InProcessClients, device: torch.device) -> Executor:
    """The executor `federation.execution.concurrency` and `federation.execution.workers` ask for; asking
    for both, or for workers where they cannot train, is a `UserError`."""
    cohort = cohort_trainer(clients.cfg, clients.trainer, device)
    count = workers_for(clients, device, cohort)
    if cohort is not None:
        return Vmap(clients, cohort, clients.cfg.federation.execution.concurrent_clients)
    if count:  # forked when the first round trains (a Flower node, which never calls `fit`, starts none)
        return Workers(clients, WorkerPool(clients.train, count))
    return Sequential(clients)


def workers_for(clients: InProcessClients, device: torch.device, cohort: CohortTrainer | None) -> int:
    """`federation.execution.workers` resolved (`fedssl.inprocess.workers.worker_count`), 0: in
    this process; a count above 1 where workers cannot train is a `UserError`."""
    fed, execution = clients.cfg.federation, clients.cfg.federation.execution
    per_round = min(clients_per_round(fed), fed.clients - len(clients.held_out))
    count = worker_count(execution.workers, device, per_round, mean_round_steps(clients, per_round))
    if count > 1 and device.type != "cpu":
        raise UserError(f"federation.execution.workers: {count} worker processes train on the CPU, and "
                        f"federation.execution.device is {device.type}; there, federation.execution.concurrency: vmap trains clients together (or set workers: 0)")
    if count > 1 and multiprocessing.current_process().daemon:  # which multiprocessing forbids children
        if execution.workers == "auto":
            return 0
        raise UserError(f"federation.execution.workers: {count} worker processes cannot be started from a daemonic process "
                        f"(a multiprocessing pool's worker); set workers: 0 there")
    if count > 1 and cohort is not None:
        raise UserError(f"federation.execution.workers: {count} worker processes train clients one at a time, and "
                        f"federation.execution.concurrency is {execution.concurrency}, which trains them together; set one of the two")
    return count if count > 1 else 0


def mean_round_steps(clients: InProcessClients, per_round: int) -> int:
    """The SGD steps of a round of `per_round` clients of average size (what decides
    whether workers pay for their start under `federation.execution.workers: auto`)."""
    learner, data, train = clients.trainer.learner, clients.data, clients.cfg.train
    unlabeled_batch = clients.trainer.source.unlabeled_batch(learner)
    steps = sum(round_steps(len(c.labeled), len(c.unlabeled) if learner.uses_unlabeled else 0, train, unlabeled_batch)
                for c in data.clients)
    return steps * per_round // max(len(data.clients), 1)
