"""The server's side of a run: built once, it runs each round and evaluates.

A round is the algorithm's (`Algorithm.round`), by default the synchronous one
(`fedssl.engine.synchronous`), composed of the stages in `fedssl.engine.stages`;
where clients run is the `Clients`' (in this process by default, or on Flower
nodes). All randomness is drawn from (seed, round, client), so a resumed run
continues exactly where the killed one stopped.
"""

from __future__ import annotations

from typing import Any, Callable

from fedssl.algorithms.aggregate import ServerState
from fedssl.clients import Clients
from fedssl.config.schema import RecipeConfig
from fedssl.data.federated import FederatedData, build_federated_data
from fedssl.data.sources import load_source
from fedssl.data.tensors import TensorPool
from fedssl.engine.evaluate import evaluate
from fedssl.engine.round_engine import EngineRound
from fedssl.engine.server import Server
from fedssl.engine.stages import SERVER_ID
from fedssl.inprocess.clients import InProcessClients, build_trainer, resolve_device
from fedssl.messages import Payload, Update
from fedssl.models.factory import input_normalization
from fedssl.privacy.mechanism import CentralDP
from fedssl.sampling import clients_per_round
from fedssl.simulation.policies import SystemHeterogeneity, check_system


# Makes a run's clients from the server's pieces: in process by default; Flower's reach nodes.
ClientsFactory = Callable[["Federation"], Clients]


class Federation(Server):
    """A run's server that runs rounds (`fit_round`) and evaluates (`evaluate`)."""

    @classmethod
    def build(cls, cfg: RecipeConfig, data: FederatedData | None = None,
              clients: ClientsFactory | None = None) -> Federation:
        """Build from the recipe; `data` replaces the recipe's data source (benchmarks);
        `clients` makes the clients (default: in this process, sharing the server's
        learner and image pool)."""
        device = resolve_device(cfg.federation.execution.device)
        if data is None:
            data = build_federated_data(load_source(cfg.data), cfg.data, cfg.federation.clients, cfg.seed)
        algorithm, trainer = build_trainer(cfg, data, device)  # the recipe checked against its capabilities
        privacy = CentralDP.build(cfg)
        test = TensorPool.from_dataset(data.test, device, input_normalization(cfg.model, cfg.data.channels))
        federation = cls(cfg, data, algorithm, trainer, test, None, privacy)
        federation.clients = (clients or in_process)(federation)
        check_system(cfg)
        can = algorithm.capabilities
        if cfg.federation.system.profile != "none" or can.counts_local_steps or can.asynchronous:
            federation.system = SystemHeterogeneity.build(cfg, data, trainer.learner, clients_per_round(cfg.federation))
        return federation

    def train_on_server(self, payload: Payload) -> Update:
        steps = self.cfg.algorithm.ssl.server_steps
        update, _ = self.trainer.fit(SERVER_ID, self.data.server_labeled, self.data.server_labeled[:0], payload, steps=steps)
        return update

    def fit_round(self, round_index: int, state: ServerState) -> tuple[ServerState, dict[str, float]]:
        """The server's training on its labeled data, if any, then the algorithm's round."""
        has_server_labels = len(self.data.server_labeled) > 0 and self.cfg.algorithm.ssl.server_steps > 0
        state = self.algorithm.server_round(round_index, state, self.train_on_server if has_server_labels else None)
        return self.algorithm.round(EngineRound(self, round_index), round_index, state)

    def evaluate(self, state: ServerState, round_index: int = 0) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The global model on the server's test set and each client's row (`fedssl.engine.evaluate`)."""
        return evaluate(self, state, round_index)


def in_process(federation: Federation) -> InProcessClients:
    """The run's clients in this process, sharing the server's learner and image pool."""
    return InProcessClients.build(federation.cfg, federation.data, federation.algorithm, federation.trainer)
