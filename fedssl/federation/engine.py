"""The round engine: one round of a federation, whatever runs its clients.

One round: sample clients -> payload down -> local fit (`Clients.fit`) -> updates
up, each checked -> aggregate -> evaluate (the server's test set here, clients'
own splits through `Clients.score`). All randomness is drawn from (seed, round,
client), so a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Mapping

import numpy as np
import torch

from fedssl.algorithms.aggregate import RunningAverage, ServerState
from fedssl.algorithms.base import Algorithm
from fedssl.algorithms.robust import minimum_updates
from fedssl.config.schema import RecipeConfig
from fedssl.config.validate import lossy
from fedssl.data.federated import FederatedData, build_federated_data
from fedssl.data.sources import load_source
from fedssl.errors import UserError
from fedssl.federation.class_metrics import global_class_metrics
from fedssl.federation.buffered import buffered_round
from fedssl.federation.channel import Delivery, MaskedAverage, Tally, arrived, fill, transmit
from fedssl.federation.client import ClientTrainer
from fedssl.federation.clients import Clients, InProcessClients, Kinds, build_trainer, resolve_device
from fedssl.federation.evaluate import score
from fedssl.federation.faults import Holding, check_update
from fedssl.federation.links import Links
from fedssl.federation.metrics import mean_acc, pooled_acc, round_metrics
from fedssl.federation.personal_eval import personal_metrics
from fedssl.federation.policies import SystemHeterogeneity, check_system
from fedssl.federation.tensors import TensorPool
from fedssl.federation.unseen import linear_acc, unseen_metrics
from fedssl.federation.update_bound import UpdateBound
from fedssl.messages import Payload, Update
from fedssl.models.factory import input_normalization
from fedssl.privacy.mechanism import CentralDP
from fedssl.sampling import clients_per_round, evaluation_cohort, held_out_clients, poisson_sample, sample_cohort

log = logging.getLogger(__name__)

SERVER_ID = -1  # the server's "client id" when it trains on its own labeled data
# Makes a run's clients from the server's pieces: in process by default; Flower's reach nodes.
ClientsFactory = Callable[["Federation"], Clients]


@dataclass(frozen=True)
class Collected:
    """A round's usable client updates, as the server aggregates them.

    Attributes:
        updates: what the algorithm aggregates: every usable update or, where a round
            averages as they come (`Federation.averages_as_they_come`), their running
            average as one update.
        receipts: every usable update, with its arrays dropped where they were
            folded into the average (its client, examples and metrics stay).
        bytes_up, bytes_down: what every update received and every payload sent
            weigh, as encoded (retried draws and retransmitted packets included; see
            `messages.array_bytes`).
        dropped: clients whose update was unusable.
        clipped: usable updates scaled down to the round's norm bound (`update_bound`).
        link: the lossy uplink's round metrics (empty without one): packets sent,
            lost and retransmitted, and the share of the updates each coordinate
            was used from (its mean and min over coordinates).
    """

    updates: list[Update]
    receipts: list[Update]
    bytes_up: int
    bytes_down: int
    dropped: int
    clipped: int = 0
    system: dict[str, float] = field(default_factory=dict)  # simulated time and late/offline/partial counts
    link: dict[str, float] = field(default_factory=dict)


@dataclass
class Federation:
    """The server's side of a run, built once and reused every round, and its clients."""

    cfg: RecipeConfig
    data: FederatedData  # the server's view of the data: its test and labeled sets, the recipe's partition
    algorithm: Algorithm
    trainer: ClientTrainer  # the server's learner: scores the global model, trains on the server's labels
    test: TensorPool
    clients: Clients
    privacy: CentralDP | None = None  # user-level DP (privacy.mechanism: central)
    system: SystemHeterogeneity | None = None  # device profiles and round policy (federation.system)
    links: Links | None = None  # the codecs on each link (federation.uplink, federation.downlink); default: the recipe's
    bound: UpdateBound | None = None  # the norm bound on every update (federation.update_clip); default: the recipe's

    def __post_init__(self) -> None:
        if self.links is None:
            self.links = Links.build(self.cfg, self.algorithm)
        if self.bound is None:
            # Not under DP: its own clip bounds every update within the accountant, and a
            # bound set by other clients' norms would be a release the accountant does not count.
            clip = self.cfg.federation.update_clip
            self.bound = UpdateBound(0.0 if self.privacy else clip.multiple, clip.window)

    @classmethod
    def build(cls, cfg: RecipeConfig, data: FederatedData | None = None,
              clients: ClientsFactory | None = None) -> Federation:
        """Build from the recipe; `data` replaces the recipe's data source (benchmarks);
        `clients` makes the clients (default: in this process, sharing the server's
        learner and image pool)."""
        device = resolve_device(cfg.federation.device)
        if data is None:
            data = build_federated_data(load_source(cfg.data), cfg.data, cfg.federation.clients, cfg.seed)
        algorithm, trainer = build_trainer(cfg, data, device)
        if cfg.federation.aggregator != "mean" and not algorithm.averages_updates:
            raise UserError(f"federation.aggregator: {cfg.federation.aggregator} is not available for "
                            f"algorithm.name={cfg.algorithm.name}, whose server does not average full client weights")
        privacy = CentralDP.build(cfg, cfg.algorithm.name, algorithm.averages_updates and algorithm.dense_updates)
        if lossy(cfg.federation.uplink.channel) and algorithm.asynchronous:
            raise UserError(f"federation.uplink.channel: algorithm.name={cfg.algorithm.name} runs asynchronous rounds "
                            f"(FedBuff), which do not simulate a lossy link yet")
        if lossy(cfg.federation.uplink.channel) and not (algorithm.averages_updates and algorithm.dense_updates):
            raise UserError(f"federation.uplink.channel: algorithm.name={cfg.algorithm.name} does not average dense "
                            f"updates, so a partly delivered update cannot be placed coordinate by coordinate")
        test = TensorPool.from_dataset(data.test, device, input_normalization(cfg.model, cfg.data.channels))
        federation = cls(cfg, data, algorithm, trainer, test, None, privacy)
        federation.clients = (clients or in_process)(federation)
        check_system(cfg)
        if cfg.federation.system.profile != "none" or algorithm.counts_local_steps or algorithm.asynchronous:
            federation.system = SystemHeterogeneity.build(cfg, data, trainer.learner, clients_per_round(cfg.federation))
        return federation

    @cached_property
    def held_out(self) -> frozenset[int]:
        """Clients that never train (`federation.holdout_clients`): scored as unseen people."""
        return held_out_clients(self.cfg.federation, self.cfg.seed)

    @property
    def pool(self) -> TensorPool:
        return self.trainer.pool

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.learner.model

    @property
    def holdings(self) -> Mapping[int, Holding]:
        return self.clients.holdings

    @property
    def kinds(self) -> Mapping[int, str]:
        return Kinds(self.clients.holdings)

    def check(self, client_id: int, update: Update, payload: Payload) -> str | None:
        """Why the server cannot use client `client_id`'s `update` (decoded) to `payload`
        (with the weights the client decodes from it), None if it can:
        `faults.check_update` against what the client holds."""
        if update.client_id != client_id:
            return f"its node answered for client {update.client_id}"
        return check_update(update, payload.arrays, dense=self.algorithm.dense_updates,
                            max_examples=self.clients.holdings[client_id].examples,
                            max_ratio=self.cfg.federation.max_update_ratio)

    def initial_state(self) -> ServerState:
        return self.algorithm.init_server_state(self.trainer.learner.arrays(self.trainer.shared_names))

    def train_on_server(self, payload: Payload) -> Update:
        steps = self.cfg.algorithm.ssl.server_steps
        update, _ = self.trainer.fit(SERVER_ID, self.data.server_labeled, self.data.server_labeled[:0], payload, steps=steps)
        return update

    def fit_round(self, round_index: int, state: ServerState) -> tuple[ServerState, dict[str, float]]:
        has_server_labels = len(self.data.server_labeled) > 0 and self.cfg.algorithm.ssl.server_steps > 0
        state = self.algorithm.server_round(round_index, state, self.train_on_server if has_server_labels else None)
        if self.algorithm.asynchronous:
            return buffered_round(self, round_index, state)
        collected = self.collect(round_index, state)
        metrics = round_metrics(collected.receipts, self.kinds) | collected.link | {
            "bytes_up": collected.bytes_up, "bytes_down": collected.bytes_down, "dropped_clients": collected.dropped,
            "clipped_clients": collected.clipped} | collected.system
        if self.privacy is None:
            return self.algorithm.aggregate(collected.updates, state), metrics
        # DP-FedAvg: the cohort's updates become one private update, which the
        # algorithm's own server step applies (see fedssl.privacy.mechanism).
        private, privacy_metrics = self.privacy.aggregate(collected.updates, state.params, round_index)
        return self.algorithm.aggregate([private], state), metrics | privacy_metrics

    def sample(self, round_index: int, attempt: int, failed: set[int]) -> list[int]:
        """The round's clients: a uniform draw of clients_per_round, or under DP a
        Poisson draw (each client independently, at the rate the accountant assumes).
        A retried round (attempt > 0) draws afresh from the clients that have not failed."""
        fed = self.cfg.federation
        if self.privacy is not None:  # a draw per client: Poisson sampling is O(population) by nature
            candidates = [c for c in range(fed.clients) if c not in failed and c not in self.held_out]
            return poisson_sample(candidates, self.privacy.sampling_rate, self.cfg.seed, round_index, attempt)
        count = clients_per_round(fed)
        count = self.system.sample_count(count) if self.system else count
        return sample_cohort(fed.clients, count, self.cfg.seed, round_index, attempt, self.held_out | failed)

    def receive(self, round_index: int, client_id: int, update: Update, payload: Payload
                ) -> tuple[Update, str | None, Delivery | None, dict | None]:
        """A received update through the simulated uplink channel (if lossy), decoded
        (`Links.open_update`) and checked: (the update as the server uses it, why it is
        unusable or None, what the channel did, which coordinates arrived). `payload`:
        what the client was sent, with the weights it decodes from it."""
        channel, sent = self.cfg.federation.uplink.channel, payload.arrays
        delivery = transmit(update.arrays, channel, self.cfg.seed, round_index, client_id) if lossy(channel) else None
        opened, problem = self.links.open_update(update, sent, round_index, client_id)
        problem = problem or self.check(client_id, opened, payload)
        if problem or delivery is None:
            return opened, problem, delivery, None
        masks = arrived(delivery, sent, elementwise=self.links.up.elementwise)
        if delivery.lost_packets and channel.strategy == "drop":  # it arrived, and none of it is used
            unused = {name: torch.zeros_like(mask) for name, mask in masks.items()}
            return opened, (f"{delivery.lost_packets} of its {delivery.packets} packets were lost "
                            f"(federation.uplink.channel.strategy=drop)"), delivery, unused
        if channel.strategy == "fill":
            opened = replace(opened, arrays=fill(opened.arrays, masks, sent))
        return opened, None, delivery, masks

    @property
    def averages_as_they_come(self) -> bool:
        """Whether the server's aggregate is the plain weighted mean of the updates
        (an averaging algorithm, `federation.aggregator: mean`, no DP), so that a
        round can fold each update into a running average instead of holding all."""
        return self.algorithm.averages_updates and self.cfg.federation.aggregator == "mean" and self.privacy is None

    def collect(self, round_index: int, state: ServerState) -> Collected:
        """Train the sampled clients; their usable updates (see `Collected`).

        An update that raised or fails `check` (non-finite values, arrays of a wrong
        name, shape or dtype, too many examples, too far from what was sent) is
        dropped with a warning naming the client. With fewer usable updates
        than federation.min_clients (or than the aggregator needs), the round is drawn
        again from the clients that did not fail, up to federation.round_retries
        times, and then the run stops. Under DP a Poisson draw may pick fewer clients
        than min_clients: that is no fault, and the round is released as drawn. Only
        the accepted draw's clients keep what they learned (`Clients.accept`).

        A usable update longer than the norm bound (`update_bound`) is clipped to it and
        counted. The bound comes from the recent rounds' updates; before there are any,
        the round holds its updates until they have all arrived and takes their median.
        """
        fed = self.cfg.federation
        needed = max(fed.min_clients, minimum_updates(fed))
        failed: dict[int, str] = {}
        raised: list[Exception] = []
        bytes_down, bytes_up = 0, 0
        channel = fed.uplink.channel if lossy(fed.uplink.channel) else None
        masked = channel is not None and channel.strategy == "mean"
        tally = Tally()
        plans, received = [], {}  # the system's plan of every draw, and the bytes each client sent
        for attempt in range(fed.round_retries + 1):
            sampled = self.sample(round_index, attempt, set(failed))
            payloads = {c: self.algorithm.payload(round_index, state, c) for c in sampled}
            if self.system is not None:  # who is online, late or partial (federation.system.policy)
                plan, payloads = self.system.plan(round_index, attempt, payloads)
                plans.append((plan, payloads))
            encoded, sent = {}, {}  # the payloads as they travel (federation.downlink), and with what each client decodes
            for c, payload in payloads.items():
                encoded[c], weights = self.links.send_payload(payload, c)
                sent[c] = replace(payload, arrays=weights)
            payloads = encoded
            updates = []
            running = (MaskedAverage() if masked else RunningAverage()) if self.averages_as_they_come else None
            clip = self.bound.start_round()  # the norm bound (update_bound)

            def take(update: Update, masks: dict | None) -> None:
                if running is not None:
                    if masked:
                        running.add(update.arrays, masks, update.num_examples)
                    else:
                        running.add(update)
                    update = replace(update, arrays={})  # folded in: only its counts and metrics stay
                updates.append(update)

            for client_id, update, problem in self.clients.fit(round_index, payloads):
                bytes_down += payloads[client_id].num_bytes
                masks = None
                if isinstance(update, Update):  # it came, usable or not
                    bytes_up += update.num_bytes
                    received[client_id] = update.num_bytes
                    if not problem:
                        update, problem, delivery, masks = self.receive(round_index, client_id, update, sent[client_id])
                        if delivery is not None:
                            bytes_up += delivery.retransmitted_bytes
                            tally.add(delivery, masks)
                if problem:
                    log.warning("round %d: dropped the update of client %d: %s", round_index, client_id, problem)
                    failed[client_id] = problem
                    if isinstance(update, Exception):
                        raised.append(update)
                    continue
                if self.system is not None:
                    update = self.system.annotate(plan, update)
                for update, masks in clip.admit(update, sent[client_id].arrays, masks):
                    take(update, masks)
            for update, masks in clip.finish():
                take(update, masks)
            if len(updates) >= (min(needed, len(sampled)) if self.privacy else needed):
                break
            if attempt < fed.round_retries:
                log.warning("round %d: %d usable updates of %d sampled clients, fewer than %d; drawing the round again "
                            "(retry %d of %d)", round_index, len(updates), len(sampled), needed, attempt + 1, fed.round_retries)
        else:
            reasons = "; ".join(f"client {c}: {why}" for c, why in failed.items()) or "no client failed"
            if plans:  # clients the round policy left out
                reasons += "; " + self.system.left_out(plans)
            retried = f" after {fed.round_retries} retries" if fed.round_retries else ""
            # chained to a client's exception, so that a bug in a learner keeps its traceback in Python
            raise UserError(f"federation.min_clients: round {round_index} got {len(updates)} usable updates of "
                            f"{len(sampled)} sampled clients{retried}, fewer than the {needed} it needs ({reasons})"
                            ) from (raised[0] if raised else None)
        self.clients.accept([u.client_id for u in updates])
        if clip.clipped:
            log.info("round %d: clipped %d of %d updates to the norm bound %.3g", round_index, clip.clipped,
                     len(updates), clip.bound)
        self.bound.record(clip.norms)
        aggregated = updates
        if running is not None:  # the average as one update, weighted by the examples it stands for
            if running.total:
                average = running.average(state.params) if masked else running.average()
                aggregated = [Update(SERVER_ID, average, running.total)]
            else:
                aggregated = []
        system = self.system.finish(plans, received) if self.system is not None else {}
        return Collected(aggregated, updates, bytes_up, bytes_down, len(failed), clip.clipped, system,
                         tally.metrics() if channel else {})

    def evaluate(self, state: ServerState, round_index: int = 0) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The global model on the server test set (accuracy, loss, macro-F1, per-class
        recall and the confusion matrix `global_confusion`, all from one pass), and
        each client's row (`Clients.score`): every client's, or with
        `federation.eval_clients` a sample of the training clients drawn for
        `round_index` (and every held-out client). The metrics include what the evaluation cost and dropped
        (`bytes_down`, `bytes_up`, `dropped_clients`), for the round to add to its own."""
        weights = self.algorithm.global_weights(state)
        self.trainer.learner.load_arrays(weights)
        server = score(self.model, self.test.images, self.test.labels)
        probe = {"linear_acc": self.linear_acc()} if self.cfg.federation.linear_probe else {}
        fed = self.cfg.federation
        scored = self.clients.score(weights, sorted(
            evaluation_cohort(fed.clients, fed.eval_clients, self.cfg.seed, round_index, self.held_out)
            + sorted(self.held_out)))
        # Held-out clients never trained: they are reported apart, as unseen people.
        unseen = unseen_metrics(scored.rows, self.held_out)
        rows = [row for row in scored.rows if row["client"] not in self.held_out]
        metrics = {"global_acc": server.accuracy, "global_loss": server.loss,
                   **global_class_metrics(server.confusion, self.data.class_names),
                   "global_confusion": server.confusion.tolist(), "client_acc_mean": mean_acc(rows),
                   "client_acc_pooled": pooled_acc(rows)}
        kinds = sorted({row["kind"] for row in rows})
        if len(kinds) > 1:
            metrics |= {f"client_acc_mean/{kind}": mean_acc([r for r in rows if r["kind"] == kind]) for kind in kinds}
        traffic = {"bytes_down": scored.bytes_down, "bytes_up": 0, "dropped_clients": scored.dropped}
        metrics |= personal_metrics(rows) | unseen | probe | traffic
        if self.held_out:  # every client's row, each saying whether it was held out
            rows = [row | {"held_out": row["client"] in self.held_out} for row in scored.rows]
        return metrics, rows

    def close(self) -> None:
        """Release what the clients hold outside this process (worker processes), if anything."""
        self.clients.close()

    def linear_acc(self) -> float:
        """The linear probe on the live model's features (`fedssl.federation.unseen`):
        fitted on the training clients' labeled split, scored on the server test set."""
        labeled = [c.labeled for c in self.data.clients if c.client_id not in self.held_out]
        index = torch.from_numpy(np.concatenate(labeled) if labeled else np.empty(0, np.int64)).to(self.pool.labels.device)
        return linear_acc(self.model, self.pool.images[index], self.pool.labels[index], self.test.images,
                          self.test.labels, self.data.num_classes)


def in_process(federation: Federation) -> InProcessClients:
    """The run's clients in this process, sharing the server's learner and image pool."""
    return InProcessClients.build(federation.cfg, federation.data, federation.algorithm, federation.trainer)
