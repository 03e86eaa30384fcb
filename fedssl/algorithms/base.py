"""What an algorithm is, and the registry that names them.

An algorithm is three small things: a client learner (a LightningModule), a pure
server aggregation, and a declaration of which arrays are shared. Backends drive
these and know nothing of the algorithm; algorithms know nothing of transport.
Algorithms that need more (helper models sent to clients, training on the server's
labeled data) override the optional hooks below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from fedssl.config.schema import RecipeConfig
from fedssl.algorithms.aggregate import ServerState
from fedssl.messages import Arrays, Payload, Scalar, Update
from fedssl.learners.base import FederatedLearner
from fedssl.registry import Registry

# A labeled batch: images and labels.
LabeledBatch = tuple[torch.Tensor, torch.Tensor]
# Runs the algorithm's learner on the server's labeled set from a payload.
ServerTrainer = Callable[[Payload], Update]


@dataclass(frozen=True)
class LocalClient:
    """What a client's personalization may use: what it kept from its rounds, and
    `batches(n)`, n mini-batches of its labeled training data (never its test split)."""

    client_id: int
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: Callable[[int], Iterator[LabeledBatch]] = lambda steps: iter(())


class Algorithm:
    """Base class: share everything, override the learner and the aggregation."""

    # Whether a client's personalized model (`personal_weights`) can differ from the
    # global model; when not, the global model's local scores stand for it.
    personalized = False
    # Whether every update holds each shared array densely (the FedAvg family). When
    # not, an update may send arrays as sparse deltas and leave unchanged ones out
    # (FedMatch); `faults.check_update` checks updates accordingly.
    dense_updates = False
    # Whether `aggregate` is `robust.combine` of the updates followed by a server step,
    # so that `federation.aggregator` can replace the average and `privacy.mechanism`
    # can hand it one private update in place of the cohort's.
    averages_updates = False
    # Whether `aggregate` reads each update's `local_steps` metric (FedNova's tau_i),
    # which the server adds from the steps it asked for (fedssl.federation.policies).
    counts_local_steps = False
    # Whether the server runs asynchronously (FedBuff): the engine hands its rounds
    # to `fedssl.federation.buffered` instead of sampling a synchronous cohort.
    asynchronous = False

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg

    @property
    def keeps_client_state(self) -> bool:
        """Whether clients keep state between rounds (their learner's `end_round`):
        a backend that holds it on the clients' side cannot restore it on resume."""
        return self.personalized

    def make_learner(self, model: nn.Module) -> FederatedLearner:
        raise NotImplementedError

    def shared_names(self, learner: FederatedLearner) -> list[str]:
        """Names of the arrays that travel; the rest stay on the client."""
        return list(learner.model.state_dict().keys())

    def init_server_state(self, arrays: Arrays) -> ServerState:
        return ServerState(params=arrays)

    def payload(self, round_index: int, state: ServerState, client_id: int) -> Payload:
        """What client `client_id` receives this round."""
        return Payload(round=round_index, arrays=state.params, config=self.client_config(round_index))

    def client_config(self, round_index: int) -> dict[str, Scalar]:
        """Scalars sent down with the weights each round."""
        return {}

    def server_round(self, round_index: int, state: ServerState, train_on_server: ServerTrainer | None) -> ServerState:
        """Before the broadcast: training on the server's labeled data, where there is
        any (`train_on_server` is None otherwise)."""
        return state

    def aggregate(self, updates: Sequence[Update], state: ServerState) -> ServerState:
        raise NotImplementedError

    def global_weights(self, state: ServerState) -> Arrays:
        """The model weights (state_dict names) that are evaluated and exported."""
        return state.params

    def shape_model(self, model: nn.Module, weights: Arrays) -> None:
        """Give a model built from the recipe the shapes of the run's `weights`, where
        the algorithm changes them (FedMA widens matched layers); nothing otherwise."""

    def personal_weights(self, global_weights: Arrays, client: LocalClient) -> Arrays:
        """The weights of `client`'s personalized model, which is scored on its own local
        test split: the global model (`global_weights`) with its personal layers
        (FedPer), its personal model (Ditto), or the global model adapted on its
        training data (Per-FedAvg). Without personalization, the global model. It is
        built from the global weights alone, which is all a node is sent to score
        its clients: never the server's state."""
        return global_weights

    def unseen_weights(self, global_weights: Arrays, client: LocalClient,
                       fine_tune_head: Callable[[Arrays], Arrays]) -> Arrays:
        """The model of a held-out client (`federation.holdout_clients`), which never
        trained and adapts with its labeled images alone (`client.batches`; its state
        is empty): by default the global model with its classifier fine-tuned on
        them (`fine_tune_head`); an algorithm with an adaptation of its own
        (Per-FedAvg's step) uses that instead."""
        return fine_tune_head(self.personal_weights(global_weights, client))


# Every module of fedssl.algorithms, and any module another package declares in the
# `fedssl.algorithms` entry point group, is imported when an algorithm is looked up.
ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm", entry_points="fedssl.algorithms",
                                                 imports=("fedssl.algorithms",))


def build_algorithm(cfg: RecipeConfig) -> Algorithm:
    return ALGORITHMS.get(cfg.algorithm.name, key="algorithm.name")(cfg)
