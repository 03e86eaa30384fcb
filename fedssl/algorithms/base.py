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
from fedssl.algorithms.capabilities import Capabilities, check_compatible
from fedssl.algorithms.rounds import RoundEngine
from fedssl.messages import Arrays, Payload, Scalar, Update
from fedssl.learners.base import FederatedLearner
from fedssl.registry import Registry

# `Algorithm.smoke` of an algorithm that learns from each client's labeled and unlabeled
# images: 2 labels per class on every client, the rest unlabeled, and 2 unlabeled images
# per labeled one in a step (FixMatch's 7 would make a tiny run slow).
SMOKE_FEW_LABELS_PER_CLIENT = ("data.labels.mode=client", "data.labels.per_class=2", "algorithm.ssl.unlabeled_ratio=2")

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
    """Base class: share everything, override the learner and the aggregation.

    Attributes:
        smoke: The recipe overrides (key=value) that a tiny two-round run of this
            algorithm needs beyond a plain labeled federation, to run at all and to
            take its own paths within two rounds: where its labels are, its
            section's keys made small (FedProx: `("algorithm.proximal_mu=0.01",)`).
            The tests parametrized over the registry read it, so that an algorithm
            is smoke-tested from its own module, with no list kept elsewhere; the
            default, (), runs it on the plain federation.
    """

    # What it needs from a round and allows around it (`capabilities.Capabilities`);
    # a property where the recipe decides (FixMatch's threshold rule keeps state).
    capabilities = Capabilities(reads_each_update="its server step is its own")

    smoke: tuple[str, ...] = ()

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg

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

    def round(self, engine: RoundEngine, round_index: int, state: ServerState) -> tuple[ServerState, dict[str, float]]:
        """One round after `server_round`: the server state it ends with and its
        metrics. By default the engine's synchronous round (a cohort drawn, trained,
        checked and `aggregate`d); an algorithm with rounds of its own (FedBuff)
        drives the engine's stages itself (`fedssl.algorithms.rounds`)."""
        return engine.synchronous(state)

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
        """The model of a held-out client (`federation.evaluation.holdout_clients`), which never
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
    """The recipe's algorithm, once the recipe asks nothing of it that it cannot do (`check_compatible`)."""
    algorithm = ALGORITHMS.get(cfg.algorithm.name, key="algorithm.name")(cfg)
    check_compatible(cfg, algorithm.capabilities)
    return algorithm
