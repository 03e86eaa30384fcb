"""The in-process federation loop, fedssl's default backend.

One round: sample clients -> payload down -> local fit -> updates up -> aggregate
-> evaluate -> log -> checkpoint. All randomness is drawn from (seed, round,
client), so a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from fedssl.config.load import to_dict, to_yaml
from fedssl.config.schema import RecipeConfig
from fedssl.data.federated import FederatedData, build_federated_data
from fedssl.data.sources import load_source
from fedssl.data.transforms import build_transform
from fedssl.errors import UserError
from fedssl.algorithms.aggregate import RunningAverage, ServerState
from fedssl.algorithms.base import Algorithm, build_algorithm
from fedssl.federation.checkpoint import load_checkpoint, restore_rng_states, save_checkpoint
from fedssl.federation.client import Augmentations, ClientTrainer
from fedssl.federation.concurrent import CohortTrainer, cohort_trainer
from fedssl.federation.evaluate import Score, score
from fedssl.federation.faults import Holding, check_update
from fedssl.messages import Arrays, Payload, Update, array_bytes
from fedssl.federation.metrics import client_kind, mean_acc, round_metrics
from fedssl.algorithms.base import LocalClient
from fedssl.federation.personal_eval import labeled_batches, personal_metrics, personal_summary
from fedssl.algorithms.robust import minimum_updates
from fedssl.sampling import clients_per_round, poisson_sample, sample_clients
from fedssl.federation.state import ClientStateStore
from fedssl.federation.tensors import TensorPool
from fedssl.io import atomic_write_text
from fedssl.run_dir import CHECKPOINT, CONFIG
from fedssl.models.factory import build_model
from fedssl.privacy.mechanism import CentralDP
from fedssl.tracking.run_logger import RunLogger, read_metrics

log = logging.getLogger(__name__)

SERVER_ID = -1  # the server's "client id" when it trains on its own labeled data
# What a round sent, received and dropped, training and evaluation together; summed over the run.
TRAFFIC = ("bytes_up", "bytes_down", "dropped_clients")
# Keys that may differ between a killed run and its resumption.
RESUMABLE_CHANGES = ("federation.rounds", "federation.eval_every", "logging.", "output_dir",
                     "federation.states_in_memory", "federation.state_dir")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("federation.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


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
            weigh (retried draws included; see `messages.array_bytes`).
        dropped: clients whose update was unusable.
    """

    updates: list[Update]
    receipts: list[Update]
    bytes_up: int
    bytes_down: int
    dropped: int


def data_holdings(data: FederatedData) -> dict[int, Holding]:
    """What each client of `data` holds: its training examples, local test samples and kind."""
    return {c.client_id: Holding(len(c.labeled) + len(c.unlabeled), len(c.test), client_kind(c)) for c in data.clients}


@dataclass(frozen=True)
class Scored:
    """Clients' evaluation rows, and what scoring them cost: the bytes of the arrays
    sent to the nodes that scored them (in process, as if each client were its own
    node; the rows that come back are scalars, no arrays), and `dropped`, the rows
    that were unusable or never came."""

    rows: list[dict[str, Any]]
    bytes_down: int = 0
    dropped: int = 0


@dataclass
class Federation:
    """Everything a run builds once and reuses every round."""

    cfg: RecipeConfig
    data: FederatedData
    algorithm: Algorithm
    trainer: ClientTrainer
    test: TensorPool
    store: ClientStateStore
    privacy: CentralDP | None = None  # user-level DP (privacy.mechanism: central)
    cohort: CohortTrainer | None = None  # trains clients together (federation.concurrency), None: one at a time

    @classmethod
    def build(cls, cfg: RecipeConfig, data: FederatedData | None = None) -> Federation:
        """Build from the recipe; `data` replaces the recipe's data source (benchmarks)."""
        device = resolve_device(cfg.federation.device)
        if data is None:
            data = build_federated_data(load_source(cfg.data), cfg.data, cfg.federation.clients, cfg.seed)
        torch.manual_seed(cfg.seed)  # the initial weights
        model = build_model(cfg.model, data.pool.num_classes, data.pool.channels, cfg.data.image_size)
        algorithm = build_algorithm(cfg)
        if cfg.federation.aggregator != "mean" and not algorithm.averages_updates:
            raise UserError(f"federation.aggregator: {cfg.federation.aggregator} is not available for "
                            f"algorithm.name={cfg.algorithm.name}, whose server does not average full client weights")
        privacy = CentralDP.build(cfg, cfg.algorithm.name, algorithm.averages_updates and algorithm.dense_updates)
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
        store = ClientStateStore(cfg.federation.states_in_memory, cfg.federation.state_dir or None)
        return cls(cfg, data, algorithm, trainer, TensorPool.from_dataset(data.test, device), store, privacy,
                   cohort_trainer(cfg, trainer, device))

    @property
    def pool(self) -> TensorPool:
        return self.trainer.pool

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.learner.model

    @property
    def kinds(self) -> dict[int, str]:
        return {c: holding.kind for c, holding in self.holdings.items()}

    @cached_property
    def holdings(self) -> dict[int, Holding]:
        """What the server knows each client holds (the updates and evaluation rows
        it accepts are checked against it)."""
        return data_holdings(self.data)

    def check(self, client_id: int, update: Update, payload: Payload) -> str | None:
        """Why the server cannot use client `client_id`'s `update` to `payload`
        (None if it can): `faults.check_update` against what the client holds."""
        return check_update(update, payload.arrays, dense=self.algorithm.dense_updates,
                            max_examples=self.holdings[client_id].examples,
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
        collected = self.collect(round_index, state)
        metrics = round_metrics(collected.receipts, self.kinds) | {
            "bytes_up": collected.bytes_up, "bytes_down": collected.bytes_down, "dropped_clients": collected.dropped}
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
        candidates = [c for c in range(fed.clients) if c not in failed]
        if self.privacy is not None:
            return poisson_sample(candidates, self.privacy.sampling_rate, self.cfg.seed, round_index, attempt)
        count = min(clients_per_round(fed), len(candidates))
        return [candidates[i] for i in sample_clients(len(candidates), count, self.cfg.seed, round_index, attempt)]

    def fit_client(self, client_id: int, payload: Payload) -> tuple[Update | Exception, dict[str, torch.Tensor], str | None]:
        """One client's round: its update (or the exception it raised), what it keeps,
        and why its update is unusable (None if it is usable)."""
        client = self.data.clients[client_id]
        try:
            update, kept = self.trainer.fit(client_id, client.labeled, client.unlabeled, payload, self.store.get(client_id))
        except UserError:
            raise  # a mistake in the recipe, not a faulty client
        except Exception as error:
            log.debug("client %d raised", client_id, exc_info=True)
            return error, {}, f"it raised {type(error).__name__}: {error}"
        return update, kept, self.check(client_id, update, payload)

    def fit_clients(self, round_index: int, state: ServerState, sampled: list[int]
                    ) -> Iterator[tuple[int, Payload, tuple[Update | Exception, dict[str, torch.Tensor], str | None]]]:
        """Each sampled client's payload and `fit_client` result: one after another, or
        with a cohort trainer `federation.concurrent_clients` at a time.
        A backend whose clients train elsewhere (Flower) overrides this alone."""
        chunk = self.cfg.federation.concurrent_clients if self.cohort else 1
        for start in range(0, len(sampled), chunk):
            payloads = {c: self.algorithm.payload(round_index, state, c) for c in sampled[start : start + chunk]}
            together = self.fit_together(round_index, payloads) if self.cohort else {}
            for client_id, payload in payloads.items():
                yield client_id, payload, together.get(client_id) or self.fit_client(client_id, payload)

    def fit_together(self, round_index: int, payloads: dict[int, Payload]
                     ) -> dict[int, tuple[Update, dict[str, torch.Tensor], str | None]]:
        """`fit_client`'s results for the clients the cohort trainer trains at once.
        Clients without labeled data are left to `fit_client` (they have nothing to
        stack); so is the whole chunk if training it together raises, for
        `fit_client` to isolate a faulty client."""
        clients = [(c, self.data.clients[c].labeled, p) for c, p in payloads.items() if len(self.data.clients[c].labeled)]
        if not clients:
            return {}
        try:
            updates = self.cohort.fit(clients)
        except UserError:
            raise
        except Exception as error:
            log.warning("round %d: training %d clients together raised %s: %s; training them one at a time",
                        round_index, len(clients), type(error).__name__, error)
            return {}
        return {u.client_id: (u, {}, self.check(u.client_id, u, payloads[u.client_id])) for u in updates}

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
        than min_clients: that is no fault, and the round is released as drawn.
        """
        fed = self.cfg.federation
        needed = max(fed.min_clients, minimum_updates(fed))
        failed: dict[int, str] = {}
        raised: list[Exception] = []
        bytes_down, bytes_up = 0, 0
        for attempt in range(fed.round_retries + 1):
            sampled = self.sample(round_index, attempt, set(failed))
            updates, kept = [], {}
            running = RunningAverage() if self.averages_as_they_come else None
            for client_id, payload, (update, keep, problem) in self.fit_clients(round_index, state, sampled):
                bytes_down += payload.num_bytes
                if isinstance(update, Update):  # it came, usable or not
                    bytes_up += update.num_bytes
                if problem:
                    log.warning("round %d: dropped the update of client %d: %s", round_index, client_id, problem)
                    failed[client_id] = problem
                    if isinstance(update, Exception):
                        raised.append(update)
                else:
                    if running is not None:
                        running.add(update)
                        update = replace(update, arrays={})  # folded in: only its counts and metrics stay
                    updates.append(update)
                    kept[client_id] = keep
            if len(updates) >= (min(needed, len(sampled)) if self.privacy else needed):
                break
            if attempt < fed.round_retries:
                log.warning("round %d: %d usable updates of %d sampled clients, fewer than %d; drawing the round again "
                            "(retry %d of %d)", round_index, len(updates), len(sampled), needed, attempt + 1, fed.round_retries)
        else:
            reasons = "; ".join(f"client {c}: {why}" for c, why in failed.items()) or "no client failed"
            retried = f" after {fed.round_retries} retries" if fed.round_retries else ""
            # chained to a client's exception, so that a bug in a learner keeps its traceback in Python
            raise UserError(f"federation.min_clients: round {round_index} got {len(updates)} usable updates of "
                            f"{len(sampled)} sampled clients{retried}, fewer than the {needed} it needs ({reasons})"
                            ) from (raised[0] if raised else None)
        for client_id, keep in kept.items():  # only the accepted draw's clients keep what they learned
            if keep:
                self.store.put(client_id, keep)
        aggregated = updates
        if running is not None:  # the average as one update, weighted by the examples it stands for
            aggregated = [Update(SERVER_ID, running.average(), running.total)] if running.total else []
        return Collected(aggregated, updates, bytes_up, bytes_down, len(failed))

    def evaluate(self, state: ServerState) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The global model on the server test set, and each client's row (see
        `score_clients`). The metrics include what the evaluation cost and dropped
        (`bytes_down`, `bytes_up`, `dropped_clients`), for the round to add to its own."""
        weights = self.algorithm.global_weights(state)
        self.trainer.learner.load_arrays(weights)
        server = score(self.model, self.test.images, self.test.labels)
        scored = self.evaluate_clients(weights, [client.client_id for client in self.data.clients])
        rows = scored.rows
        metrics = {"global_acc": server.accuracy, "global_loss": server.loss, "client_acc_mean": mean_acc(rows)}
        kinds = sorted({row["kind"] for row in rows})
        if len(kinds) > 1:
            metrics |= {f"client_acc_mean/{kind}": mean_acc([r for r in rows if r["kind"] == kind]) for kind in kinds}
        traffic = {"bytes_down": scored.bytes_down, "bytes_up": 0, "dropped_clients": scored.dropped}
        return metrics | personal_metrics(rows) | traffic, rows

    def evaluate_clients(self, weights: Arrays, client_ids: list[int]) -> Scored:
        """Every client's row (`score_clients`), counting the global weights as sent to
        each client, as to a node of its own. A backend whose clients hold their data
        elsewhere (Flower) overrides this, as it does `fit_clients`."""
        return Scored(self.score_clients(weights, client_ids), bytes_down=len(client_ids) * array_bytes(weights))

    def score_clients(self, weights: Arrays, client_ids: list[int]) -> list[dict[str, Any]]:
        """Per client, the global model (`weights`, the algorithm's `global_weights`)
        and the client's personalized model on the client's own local test split.
        This is all a node needs to score its clients: the global weights, not the
        server's state."""
        self.trainer.learner.load_arrays(weights)
        rows = []
        for client_id in client_ids:
            local = self.score_local(client_id)
            rows.append({"client": client_id, "kind": client_kind(self.data.clients[client_id]),
                         "test_samples": local.count, "acc": local.accuracy, "loss": local.loss})
        self.score_personal(weights, rows)
        return rows

    def score_local(self, client_id: int) -> Score:
        """The live model on the client's own local test split."""
        index = torch.from_numpy(self.data.clients[client_id].test).to(self.pool.labels.device)
        return score(self.model, self.pool.images[index], self.pool.labels[index])

    def local_client(self, client_id: int) -> LocalClient:
        """What the client's personalization may use: its kept state and its labeled training data."""
        labeled = self.data.clients[client_id].labeled
        batches = lambda steps: labeled_batches(self.pool.images, self.pool.labels, labeled, self.cfg.train.batch_size,
                                                self.cfg.seed, client_id, steps)
        return LocalClient(client_id, self.store.peek(client_id), batches)

    def score_personal(self, weights: Arrays, rows: list[dict[str, Any]]) -> None:
        """Add each client's personalized model's scores on its own local test split to
        its row (without personalization that model is the global one, scored already)."""
        for row in rows:
            if self.algorithm.personalized:
                client = self.local_client(row["client"])
                self.trainer.learner.load_arrays(self.algorithm.personal_weights(weights, client))
                local = self.score_local(row["client"])
                row |= {"personal_acc": local.accuracy, "personal_loss": local.loss}
            else:
                row |= {"personal_acc": row["acc"], "personal_loss": row["loss"]}


def check_resumable(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> None:
    """Refuse to resume a run under a recipe that would change its results."""
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            check_resumable(old, new, f"{dotted}.")
        elif old != new and not dotted.startswith(RESUMABLE_CHANGES):
            raise UserError(f"cannot resume: {dotted} was {old!r} in the killed run and is {new!r} now")


def check_privacy_resumable(saved: dict[str, Any], cfg: RecipeConfig) -> None:
    """A target epsilon is spread over the rounds the run started with: refuse more."""
    saved_rounds = saved["federation"]["rounds"]
    if cfg.privacy.mechanism != "none" and cfg.privacy.target_epsilon is not None and saved_rounds != cfg.federation.rounds:
        raise UserError(f"cannot resume: federation.rounds was {saved_rounds}, over which privacy.target_epsilon="
                        f"{cfg.privacy.target_epsilon} is spent; it cannot change to {cfg.federation.rounds}")


def privacy_summary(privacy: CentralDP | None, rounds: int) -> dict[str, Any]:
    """The (epsilon, delta) the released global model satisfies, for summary.json."""
    if privacy is None:
        return {}
    return {"epsilon": privacy.epsilon(rounds), "delta": privacy.cfg.delta, "noise_multiplier": privacy.noise_multiplier}


def add_evaluation(metrics: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
    """A round's metrics with its evaluation's: the traffic and drops add up."""
    return metrics | evaluated | {key: metrics[key] + evaluated[key] for key in TRAFFIC}


def run_federation(cfg: RecipeConfig, run_dir: Path, resume: bool = False,
                   build: Callable[[RecipeConfig], Federation] = Federation.build) -> dict[str, Any]:
    """Run (or resume) a federation; returns the summary also written to summary.json.
    `build` makes the federation (a backend passes one whose clients train elsewhere).

    The resolved recipe is written to config.yaml only once a resume is known to be
    allowed: a refused resume leaves the run directory as it was."""
    config_dict = to_dict(cfg)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT) if resume else None
    if checkpoint:
        check_resumable(checkpoint["config"], config_dict)
        check_privacy_resumable(checkpoint["config"], cfg)
    atomic_write_text(run_dir / CONFIG, to_yaml(cfg))
    federation = build(cfg)
    federation.data.save(run_dir / "partition.npz")
    state, start, elapsed, wandb_id = federation.initial_state(), 1, 0.0, None
    totals = dict.fromkeys(TRAFFIC, 0)
    if checkpoint:
        state = ServerState(**checkpoint["server_state"])
        federation.store.load_state_dict(checkpoint["client_states"])
        restore_rng_states(checkpoint["rng"])
        start, elapsed, wandb_id = checkpoint["round"] + 1, checkpoint["seconds"], checkpoint["wandb_id"]
        totals = {"dropped_clients": 0, **checkpoint["totals"]}
        if federation.privacy is not None:
            federation.privacy.load_state_dict(checkpoint["privacy"])

    fed = cfg.federation
    logger = RunLogger(cfg, run_dir, config_dict, resume_after=start - 1, wandb_id=wandb_id)
    progress = tqdm(range(start, fed.rounds + 1), desc=cfg.name, unit="round", disable=not cfg.logging.progress,
                    initial=start - 1, total=fed.rounds)
    metrics, rows = {}, []
    try:
        for round_index in progress:
            began = time.perf_counter()
            state, metrics = federation.fit_round(round_index, state)
            if round_index % fed.eval_every == 0 or round_index == fed.rounds:
                evaluated, rows = federation.evaluate(state)
                metrics = add_evaluation(metrics, evaluated)
                progress.set_postfix(acc=f"{evaluated['global_acc']:.3f}")
            for key in TRAFFIC:
                totals[key] += metrics[key]
            elapsed += time.perf_counter() - began
            metrics["seconds"] = elapsed
            logger.log_round(round_index, metrics)
            save_checkpoint(run_dir / CHECKPOINT, {
                "round": round_index,
                "config": config_dict,
                "class_names": list(federation.data.class_names),
                "server_state": {"params": state.params, "momentum": state.momentum, "extras": state.extras},
                "client_states": federation.store.state_dict(),
                "seconds": elapsed,
                "totals": totals,
                "wandb_id": logger.wandb_id,
                "privacy": federation.privacy.state_dict() if federation.privacy else None,
            })
    except BaseException:
        logger.abort()
        raise
    if not rows:  # resumed after the last round: nothing trained, evaluate what is there
        evaluated, rows = federation.evaluate(state)  # outside any round: its traffic is in no round's total
        metrics |= evaluated
    summary = {
        "name": cfg.name,
        "algorithm": cfg.algorithm.name,
        "rounds": fed.rounds,
        "global_acc": metrics["global_acc"],
        "global_loss": metrics["global_loss"],
        "client_acc_mean": metrics["client_acc_mean"],
        **{k: v for k, v in metrics.items() if k.startswith(("client_acc_mean/", "pl_"))},
        **personal_summary(metrics, read_metrics(logger.metrics_path)),
        **totals,
        **privacy_summary(federation.privacy, fed.rounds),
        "seconds": elapsed,
    }
    logger.finish(summary, rows, last_round=fed.rounds)
    return summary
