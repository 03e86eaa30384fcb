"""Asynchronous rounds on simulated time (FedBuff, fedssl.algorithms.fedbuff).

Clients start (are sent the current model) one at a time until
`algorithm.fedbuff.concurrency` are in flight; each finishes at its start time plus
its simulated download, steps and upload (its device profile; without profiles
every client takes no time and they finish in the order they started). The
server takes arrivals in order of finish time, starts a new client after each, and
after `buffer_size` arrivals publishes a new model version: that is one round.

A client is trained when it starts, on the model it was sent, and its change
waits in the server's state until its simulated arrival, so the order of events
is decided by simulated time alone. Everything in flight (each client's id, model
version, arrival time and change) is tensors in `ServerState.extras`, checkpointed
with every round: a killed run resumes with the same clients in flight and the
same arrival order. A client is started at most once per round; which one is a draw
from (seed, round, start count) among those not in flight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedssl.algorithms.aggregate import ServerState
from fedssl.errors import UserError
from fedssl.federation.metrics import round_metrics
from fedssl.federation.profiles import is_online
from fedssl.messages import Arrays, Update
from fedssl.sampling import nth_remaining

if TYPE_CHECKING:  # the engine imports this module
    from fedssl.federation.engine import Federation

log = logging.getLogger(__name__)

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


def bounded(federation: Federation, arrived: list[Update]) -> tuple[list[Update], int]:
    """A round's arrived changes through the engine's norm bound, as a synchronous
    round's updates go (`fedssl.federation.update_bound`): a change is a move from
    zero, and the round's arrivals are its own evidence. Returns them and how many
    were clipped."""
    clip = federation.bound.start_round()
    ready = [u for update in arrived for u, _ in clip.admit(update, zeros(update.arrays))]
    ready += [u for u, _ in clip.finish()]
    federation.bound.record(clip.norms)
    return ready, clip.clipped


def zeros(delta: Arrays) -> Arrays:
    return {name: torch.zeros_like(d) for name, d in delta.items() if d.is_floating_point()}


def buffered_round(federation: Federation, round_index: int, state: ServerState) -> tuple[ServerState, dict[str, float]]:
    """One FedBuff round: start clients up to the concurrency, take arrivals until the
    buffer holds `buffer_size`, publish the next version (see the module docstring)."""
    cfg = federation.cfg
    fedbuff, system = cfg.algorithm.fedbuff, federation.system
    concurrency = fedbuff.concurrency or federation.system.keep  # 0: clients_per_round
    buffer = Buffer.from_extras(state.extras)
    began = buffer.clock
    started_now: set[int] = set()
    counts = {"bytes_up": 0, "bytes_down": 0, "dropped_clients": 0, "clipped_clients": 0, "offline_clients": 0}

    def start_clients() -> None:
        while len(buffer.flying) < concurrency:
            busy = np.unique(np.fromiter({slot.client for slot in buffer.flying.values()} | started_now, np.int64))
            idle = cfg.federation.clients - len(busy)
            if not idle:
                return
            rng = np.random.default_rng([cfg.seed, round_index, 0xFB0F, buffer.started])
            # the k-th idle client, found without listing the population
            client = int(nth_remaining(np.array([rng.integers(idle)]), busy)[0])
            order, buffer.started = buffer.started, buffer.started + 1
            started_now.add(client)
            if system.timed and not is_online(system.profiles[client], cfg.seed, round_index, client, order):
                counts["offline_clients"] += 1
                continue
            start(client, order)

    def start(client: int, order: int) -> None:
        payload = federation.algorithm.payload(round_index, ServerState(state.params), client)
        counts["bytes_down"] += payload.num_bytes
        for _, update, problem in federation.clients.fit(round_index, {client: payload}):
            if isinstance(update, Update):
                counts["bytes_up"] += update.num_bytes
                problem = problem or federation.check(client, update, payload)
            if problem:
                log.warning("round %d: dropped the update of client %d: %s", round_index, client, problem)
                counts["dropped_clients"] += 1
                return
            federation.clients.accept([client])
            seconds = system.work(client, payload).seconds() if system.timed else 0.0
            delta = {name: update.arrays[name] - sent for name, sent in payload.arrays.items()}
            buffer.flying[order] = InFlight(client, buffer.version, buffer.clock + seconds, update.num_examples,
                                            update.metrics.get("train_loss", float("nan")), delta)

    arrived: list[Update] = []
    start_clients()  # at the time of the last flush, on its model
    while len(arrived) < fedbuff.buffer_size:
        if not buffer.flying:
            raise UserError(f"algorithm.fedbuff: round {round_index} has no client in flight after "
                            f"{len(arrived)} of buffer_size={fedbuff.buffer_size} arrivals (every client failed or was offline)")
        slot = buffer.flying.pop(next_arrival(buffer.flying))
        buffer.clock = max(buffer.clock, slot.arrival)
        arrived.append(Update(slot.client, slot.delta, slot.examples,
                              {"staleness": float(buffer.version - slot.version), "train_loss": slot.train_loss}))
        if len(arrived) < fedbuff.buffer_size:
            start_clients()
    arrived, counts["clipped_clients"] = bounded(federation, arrived)
    state = federation.algorithm.aggregate(arrived, ServerState(state.params))
    buffer.version += 1
    staleness = [u.metrics["staleness"] for u in arrived]
    metrics = round_metrics([Update(u.client_id, {}, u.num_examples, {"train_loss": u.metrics["train_loss"]})
                             for u in arrived], federation.kinds)
    metrics |= counts | {"staleness_mean": float(np.mean(staleness)), "staleness_max": float(max(staleness))}
    if system.timed:
        metrics["sim_seconds"] = buffer.clock - began
    return ServerState(params=state.params, extras=buffer.to_extras()), metrics
