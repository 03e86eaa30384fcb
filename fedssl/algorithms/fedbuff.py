"""FedBuff: asynchronous clients, buffered aggregation with staleness weights.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022. Up to `concurrency` clients train at once, each on the model version
it was sent; whenever one finishes, another starts on the current model. The server
adds each arriving change Delta_i = w_i - w_sent to a buffer, weighted by its
staleness tau_i (model versions published since it was sent),

    s(tau) = 1 / sqrt(1 + tau),

and once `buffer_size` (K) changes are in, publishes a new version:

    w <- w + server_lr * (1 / K) * sum_i s(tau_i) Delta_i.

In fedssl one round is one such flush; evaluation, logging and checkpoints
follow rounds as usual. FedBuff brings its own round (`FedBuff.round`), on
simulated time: clients start (are sent the current model) one at a time until
`concurrency` are in flight; each finishes at its start time plus its simulated
download, steps and upload (its device profile; without profiles every client
takes no time and they finish in the order they started). The server takes
arrivals in order of finish time, starts a new client after each, and after
`buffer_size` arrivals publishes a new model version.

A client is trained when it starts, on the model it was sent, and its change
waits in the server's state until its simulated arrival, so the order of events
is decided by simulated time alone. Everything in flight (each client's id, model
version, arrival time and change) is tensors in `ServerState.extras`, checkpointed
with every round: a killed run resumes with the same clients in flight and the
same arrival order. A client is started at most once per round; which one is a
draw from (seed, round, start count) among those not in flight. Each update
passes the engine's codecs, lossy link, checks and norm bound as a synchronous
round's would (`fedssl.algorithms.rounds.RoundEngine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fedssl.algorithms.aggregate import ServerState
from fedssl.algorithms.base import ALGORITHMS
from fedssl.algorithms.capabilities import Capabilities
from fedssl.algorithms.fedavg import FedAvg
from fedssl.algorithms.rounds import RoundEngine
from fedssl.config.schema import ALGORITHM_SECTIONS, RecipeConfig
from fedssl.config.validate import require
from fedssl.errors import UserError
from fedssl.messages import Arrays, Update
from fedssl.sampling import clients_per_round, nth_remaining


@ALGORITHM_SECTIONS.register("fedbuff")
@dataclass
class FedBuffConfig:
    """`algorithm.fedbuff`: the buffer and how many clients train at once."""

    buffer_size: int = 2  # K: client changes per published model version (one round)
    concurrency: int = 0  # clients training at the same time (0: federation.clients_per_round); a finished one is replaced at once

    def check(self, cfg: RecipeConfig) -> None:
        require(self.buffer_size >= 1, "algorithm.fedbuff.buffer_size", f"must be >= 1, got {self.buffer_size}")
        require(self.concurrency >= 0, "algorithm.fedbuff.concurrency", f"must be >= 0, got {self.concurrency}")
        if cfg.algorithm.name != "fedbuff":
            return
        fed = cfg.federation
        require(self.concurrency <= fed.clients, "algorithm.fedbuff.concurrency",
                f"must be at most federation.clients ({fed.clients}), got {self.concurrency}")


def staleness_weight(staleness: int) -> float:
    """FedBuff's s(tau) = 1 / sqrt(1 + tau)."""
    return 1.0 / math.sqrt(1.0 + staleness)


def flush(params: Arrays, changes: Sequence[tuple[Arrays, int]], lr: float) -> Arrays:
    """The next model version from `params` and the buffer's (Delta_i, tau_i):
    params + lr / K * sum_i s(tau_i) Delta_i. Integer arrays (counters) take the
    rounded weighted change."""
    k = len(changes)
    out = {}
    for name, current in params.items():
        step = torch.zeros_like(current, dtype=current.dtype if current.is_floating_point() else torch.float64)
        for delta, staleness in changes:
            step.add_(delta[name].to(step.dtype), alpha=staleness_weight(staleness) / k)
        out[name] = current + lr * step if current.is_floating_point() else current + (lr * step).round().to(current.dtype)
    return out


PREFIX = "fedbuff/"
# A client in flight: [client, version it was sent, arrival time, examples, train_loss]
META = ("client", "version", "arrival", "examples", "train_loss")


@dataclass
class InFlight:
    """One client between its start and its arrival."""

    client: int
    version: int
    arrival: float
    examples: int
    train_loss: float
    delta: Arrays


@dataclass
class Buffer:
    """The asynchronous server's state: simulated clock, published version, starts so far, clients in flight."""

    clock: float
    version: int
    started: int
    flying: dict[int, InFlight]  # start number -> client

    @classmethod
    def from_extras(cls, extras: Arrays) -> Buffer:
        if f"{PREFIX}clock" not in extras:
            return cls(0.0, 0, 0, {})
        flying: dict[int, InFlight] = {}
        for key in extras:
            if key.startswith(f"{PREFIX}slot/") and key.endswith("/meta"):
                order = int(key.split("/")[2])
                meta = extras[key].tolist()
                prefix = f"{PREFIX}slot/{order}/delta/"
                delta = {k[len(prefix):]: v for k, v in extras.items() if k.startswith(prefix)}
                flying[order] = InFlight(int(meta[0]), int(meta[1]), meta[2], int(meta[3]), meta[4], delta)
        return cls(float(extras[f"{PREFIX}clock"]), int(extras[f"{PREFIX}version"]), int(extras[f"{PREFIX}started"]),
                   flying)

    def to_extras(self) -> Arrays:
        extras = {f"{PREFIX}clock": torch.tensor(self.clock, dtype=torch.float64),
                  f"{PREFIX}version": torch.tensor(self.version, dtype=torch.int64),
                  f"{PREFIX}started": torch.tensor(self.started, dtype=torch.int64)}
        for order, slot in sorted(self.flying.items()):
            extras[f"{PREFIX}slot/{order}/meta"] = torch.tensor(
                [slot.client, slot.version, slot.arrival, slot.examples, slot.train_loss], dtype=torch.float64)
            extras |= {f"{PREFIX}slot/{order}/delta/{name}": d for name, d in slot.delta.items()}
        return extras


def next_arrival(flying: dict[int, InFlight]) -> int:
    """The start number of the client that arrives first (ties: the one started first)."""
    return min(flying, key=lambda order: (flying[order].arrival, order))


def zeros(delta: Arrays) -> Arrays:
    return {name: torch.zeros_like(d) for name, d in delta.items() if d.is_floating_point()}


@ALGORITHMS.register("fedbuff")
class FedBuff(FedAvg):
    """FedBuff (Nguyen et al., AISTATS 2022): FedAvg's clients, asynchronous buffered server."""

    # each arrival is weighted by its own staleness
    capabilities = Capabilities(dense_updates=True, asynchronous=True, server_momentum=False,
                                reads_each_update="FedBuff weights each arrival by its staleness")

    def aggregate(self, updates: Sequence[Update], state: ServerState) -> ServerState:
        """One flush: each update's arrays are its change Delta_i, its metrics its `staleness`."""
        changes = [(u.arrays, int(u.metrics["staleness"])) for u in updates]
        if not changes:
            return state
        return ServerState(params=flush(state.params, changes, self.cfg.algorithm.server_lr), extras=state.extras)

    def round(self, engine: RoundEngine, round_index: int, state: ServerState) -> tuple[ServerState, dict[str, float]]:
        """One flush: start clients up to the concurrency, take arrivals until the
        buffer holds `buffer_size`, publish the next version (see the module docstring)."""
        fedbuff = self.cfg.algorithm.fedbuff
        buffer = Buffer.from_extras(state.extras)
        began, started_now, offline = buffer.clock, set(), 0

        def start_clients() -> None:
            nonlocal offline
            while len(buffer.flying) < (fedbuff.concurrency or clients_per_round(self.cfg.federation)):
                client = self.next_client(round_index, buffer, started_now)
                if client is None:
                    return
                order, buffer.started = buffer.started, buffer.started + 1
                started_now.add(client)
                if not engine.online(client, order):
                    offline += 1
                    continue
                payload = self.payload(round_index, ServerState(state.params), client)
                trained = engine.train(client, payload)
                if trained is not None:
                    update, sent = trained
                    delta = {name: update.arrays[name] - weights for name, weights in sent.items()}
                    buffer.flying[order] = InFlight(client, buffer.version, buffer.clock + engine.seconds(client, payload),
                                                    update.num_examples, update.metrics.get("train_loss", float("nan")),
                                                    delta)

        arrived: list[Update] = []
        start_clients()  # at the time of the last flush, on its model
        while len(arrived) < fedbuff.buffer_size:
            if not buffer.flying:
                raise UserError(f"algorithm.fedbuff: round {round_index} has no client in flight after {len(arrived)} "
                                f"of buffer_size={fedbuff.buffer_size} arrivals (every client failed or was offline)")
            slot = buffer.flying.pop(next_arrival(buffer.flying))
            buffer.clock = max(buffer.clock, slot.arrival)
            arrived.append(Update(slot.client, slot.delta, slot.examples,
                                  {"staleness": float(buffer.version - slot.version), "train_loss": slot.train_loss}))
            if len(arrived) < fedbuff.buffer_size:
                start_clients()
        arrived = engine.bound(arrived, [zeros(u.arrays) for u in arrived])  # a change is a move from zero
        state = self.aggregate(arrived, ServerState(state.params))
        buffer.version += 1
        staleness = [u.metrics["staleness"] for u in arrived]
        metrics = engine.metrics([Update(u.client_id, {}, u.num_examples, {"train_loss": u.metrics["train_loss"]})
                                  for u in arrived])
        metrics |= {"offline_clients": offline, "staleness_mean": float(np.mean(staleness)),
                    "staleness_max": float(max(staleness))}
        if engine.timed:
            metrics["sim_seconds"] = buffer.clock - began
        return ServerState(params=state.params, extras=buffer.to_extras()), metrics

    def next_client(self, round_index: int, buffer: Buffer, started_now: set[int]) -> int | None:
        """The next client to start: a draw among those neither in flight nor started
        this round, found without listing the population; None when none is idle."""
        busy = np.unique(np.fromiter({slot.client for slot in buffer.flying.values()} | started_now, np.int64))
        idle = self.cfg.federation.clients - len(busy)
        if not idle:
            return None
        rng = np.random.default_rng([self.cfg.seed, round_index, 0xFB0F, buffer.started])
        return int(nth_remaining(np.array([rng.integers(idle)]), busy)[0])
