"""The stages of a round, each with one job.

    draw -> plan -> send -> fit -> receive -> check -> bound -> fold -> aggregate -> evaluate

`draw` picks the cohort, `plan` applies the device profiles' round policy, `send`
encodes each payload for the downlink, `fit` is the clients' (`Clients.fit`),
`receive` passes an update through the simulated uplink and decodes it, `check`
refuses what the server must not use, `bound` clips each update's norm, `fold`
combines the usable updates (a running average where the aggregate is a plain
mean), and `aggregate` applies privacy and the algorithm's server step.
`fedssl.engine.synchronous` composes them into a synchronous round; an algorithm
that brings its own round (FedBuff) sends every update through the same send,
receive, check and bound stages (`fedssl.engine.round_context`).

Secure aggregation shows the server only a sum of the updates: the stages named
in `READS_EACH_UPDATE` read each update on its own, so such a mode must refuse
them or move them to the client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from fedssl.algorithms.aggregate import RunningAverage, ServerState
from fedssl.config.validate import lossy
from fedssl.engine.checks import check_update
from fedssl.engine.server import Server
from fedssl.messages import Arrays, Payload, Update
from fedssl.sampling import clients_per_round, poisson_sample, sample_cohort
from fedssl.simulation.channel import Delivery, MaskedAverage, Tally, arrived, fill, transmit


log = logging.getLogger(__name__)

SERVER_ID = -1  # the server's "client id": the folded average, and training on the server's labeled data

# The stages that read each client's update on its own, and what for.
READS_EACH_UPDATE = {
    "check": "each update's names, shapes, values, example count and distance are checked (federation.robust.max_update_ratio)",
    "bound": "each update's norm is clipped to the recent rounds' median (federation.robust.update_clip)",
    "receive": "a lossy uplink places each update's delivered coordinates (federation.uplink.channel)",
    "fold": "a robust federation.robust.aggregator compares the updates (anything but mean)",
}


@dataclass
class Traffic:
    """What a round sent, received, dropped and clipped, over all its draws."""

    bytes_up: int = 0
    bytes_down: int = 0
    dropped: int = 0
    clipped: int = 0
    tally: Tally = field(default_factory=Tally)  # the lossy uplink's packets and coordinates

    def metrics(self, lossy_link: bool) -> dict[str, float]:
        link = self.tally.metrics() if lossy_link else {}
        return link | {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "dropped_clients": self.dropped,
                       "clipped_clients": self.clipped}


def draw(server: Server, round_index: int, attempt: int, failed: set[int]) -> list[int]:
    """The round's clients: a uniform draw of clients_per_round, or under DP a
    Poisson draw (each client independently, at the rate the accountant assumes).
    A retried round (attempt > 0) draws afresh from the clients that have not failed."""
    fed, seed = server.cfg.federation, server.cfg.seed
    if server.privacy is not None:  # a draw per client: Poisson sampling is O(population) by nature
        candidates = [c for c in range(fed.clients) if c not in failed and c not in server.held_out]
        return poisson_sample(candidates, server.privacy.sampling_rate, seed, round_index, attempt)
    count = clients_per_round(fed)
    count = server.system.sample_count(count) if server.system else count
    return sample_cohort(fed.clients, count, seed, round_index, attempt, server.held_out | failed)


def send(server: Server, payloads: dict[int, Payload]) -> tuple[dict[int, Payload], dict[int, Payload]]:
    """The payloads as they travel (`federation.downlink`), and each with the weights
    its client decodes from it (what its update is checked against)."""
    encoded, sent = {}, {}
    for client_id, payload in payloads.items():
        encoded[client_id], weights = server.links.send_payload(payload, client_id)
        sent[client_id] = replace(payload, arrays=weights)
    return encoded, sent


def check(server: Server, client_id: int, update: Update, payload: Payload) -> str | None:
    """Why the server cannot use client `client_id`'s decoded `update` to `payload`
    (with the weights the client decoded from it), None if it can."""
    if update.client_id != client_id:
        return f"its node answered for client {update.client_id}"
    return check_update(update, payload.arrays, dense=server.algorithm.capabilities.dense_updates,
                        max_examples=server.clients.holdings[client_id].examples,
                        max_ratio=server.cfg.federation.robust.max_update_ratio)


@dataclass(frozen=True)
class Received:
    """An update as the server uses it, why it is unusable (None: usable), and which
    of its coordinates arrived over a lossy uplink (None without one)."""

    update: Update
    problem: str | None = None
    masks: dict | None = None


def receive(server: Server, round_index: int, client_id: int, update: Update, payload: Payload,
            traffic: Traffic) -> Received:
    """A received update through the simulated uplink channel (if lossy), decoded
    (`Links.open_update`) and checked. `payload`: what the client was sent, with the
    weights it decodes from it. The channel's packets go into `traffic`."""
    channel, sent = server.cfg.federation.uplink.channel, payload.arrays
    delivery = transmit(update.arrays, channel, server.cfg.seed, round_index, client_id) if lossy(channel) else None
    opened, problem = server.links.open_update(update, sent, round_index, client_id)
    problem = problem or check(server, client_id, opened, payload)
    received = Received(opened, problem) if problem or delivery is None else place(opened, delivery, payload,
                                                                                   server)
    if delivery is not None:
        traffic.bytes_up += delivery.retransmitted_bytes
        traffic.tally.add(delivery, received.masks)  # None: unusable for another reason than the channel
    return received


def place(update: Update, delivery: Delivery, payload: Payload, server: Server) -> Received:
    """A checked update as its lossy delivery leaves it (`federation.uplink.channel.strategy`)."""
    channel, sent = server.cfg.federation.uplink.channel, payload.arrays
    masks = arrived(delivery, sent, elementwise=server.links.up.elementwise)
    if delivery.lost_packets and channel.strategy == "drop":  # it arrived, and none of it is used
        unused = {name: mask.new_zeros(mask.shape) for name, mask in masks.items()}
        return Received(update, f"{delivery.lost_packets} of its {delivery.packets} packets were lost "
                                f"(federation.uplink.channel.strategy=drop)", unused)
    if channel.strategy == "fill":
        update = replace(update, arrays=fill(update.arrays, masks, sent))
    return Received(update, None, masks)


class Fold:
    """A round's usable updates as the server aggregates them: held whole, or where
    the aggregate is the plain weighted mean (`averages_as_they_come`), folded into a
    running average as they come (per coordinate over the clients it reached, on a
    lossy uplink with strategy mean), each keeping only its counts and metrics."""

    def __init__(self, as_they_come: bool, masked: bool):
        self.running = (MaskedAverage() if masked else RunningAverage()) if as_they_come else None
        self.masked = masked
        self.receipts: list[Update] = []

    def add(self, update: Update, masks: dict | None) -> None:
        if self.running is not None:
            if self.masked:
                self.running.add(update.arrays, masks, update.num_examples)
            else:
                self.running.add(update)
            update = replace(update, arrays={})  # folded in: only its counts and metrics stay
        self.receipts.append(update)

    def updates(self, params: Arrays) -> list[Update]:
        """What the algorithm aggregates: every update, or their average as one
        (weighted by the examples it stands for; `params`: the global weights a
        coordinate no update reached keeps)."""
        if self.running is None:
            return self.receipts
        if not self.running.total:
            return []
        average = self.running.average(params) if self.masked else self.running.average()
        return [Update(SERVER_ID, average, self.running.total)]


def aggregate(server: Server, updates: list[Update], state: ServerState,
              round_index: int) -> tuple[ServerState, dict[str, Any]]:
    """The algorithm's server step on the round's updates; under DP-FedAvg, on the one
    private update they become (see `fedssl.privacy.mechanism`)."""
    if server.privacy is None:
        return server.algorithm.aggregate(updates, state), {}
    private, privacy_metrics = server.privacy.aggregate(updates, state.params, round_index)
    return server.algorithm.aggregate([private], state), privacy_metrics
