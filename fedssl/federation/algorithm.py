"""What an algorithm is, and the registry that names them.

An algorithm is three small things: a client learner (a LightningModule), a pure
server aggregation, and a declaration of which arrays are shared. Backends drive
these and know nothing of the algorithm; algorithms know nothing of transport.
Algorithms that need more (helper models sent to clients, training on the server's
labeled data) override the optional hooks below.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

from torch import nn

from fedssl.config.schema import RecipeConfig
from fedssl.federation.aggregate import ServerState
from fedssl.federation.messages import Arrays, Payload, Scalar, Update
from fedssl.federation.personal_eval import LocalClient
from fedssl.learners.base import FederatedLearner
from fedssl.registry import Registry

# Runs the algorithm's learner on the server's labeled set from a payload.
ServerTrainer = Callable[[Payload], Update]


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

    def personal_weights(self, global_weights: Arrays, client: LocalClient) -> Arrays:
        """The weights of `client`'s personalized model, which is scored on its own local
        test split: the global model (`global_weights`) with its personal layers
        (FedPer), its personal model (Ditto), or the global model adapted on its
        training data (Per-FedAvg). Without personalization, the global model. It is
        built from the global weights alone, which is all a node is sent to score
        its clients: never the server's state."""
        return global_weights


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")

# Modules that register algorithms, imported when an algorithm is first looked up.
ALGORITHM_MODULES = ("fedssl.federation.fedavg", "fedssl.federation.fixmatch", "fedssl.federation.fedmatch",
                     "fedssl.federation.personal_layers", "fedssl.federation.meta")


def build_algorithm(cfg: RecipeConfig) -> Algorithm:
    for module in ALGORITHM_MODULES:
        importlib.import_module(module)
    return ALGORITHMS.get(cfg.algorithm.name, key="algorithm.name")(cfg)
