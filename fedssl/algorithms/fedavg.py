"""FedAvg and its two common variants, FedProx and FedAvgM."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from torch import nn

from fedssl.algorithms.capabilities import Capabilities
from fedssl.config.schema import RecipeConfig
from fedssl.errors import UserError
from fedssl.algorithms.aggregate import ServerState, server_step
from fedssl.algorithms.base import ALGORITHMS, Algorithm, ServerTrainer
from fedssl.messages import Update
from fedssl.algorithms.robust import combine
from fedssl.learners.supervised import SupervisedLearner


@ALGORITHMS.register("fedavg")
class FedAvg(Algorithm):
    """Federated Averaging (McMahan et al., "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS 2017).

    Clients run local SGD on their labeled data; the server averages the returned
    weights by example count (or combines them robustly, `federation.robust.aggregator`).
    `algorithm.proximal_mu > 0` adds FedProx's proximal term on the clients;
    `algorithm.server_momentum > 0` makes it FedAvgM.
    """

    capabilities = Capabilities(averages_updates=True, dense_updates=True)

    def make_learner(self, model: nn.Module) -> SupervisedLearner:
        return SupervisedLearner(model, self.cfg.train, proximal_mu=self.cfg.algorithm.proximal_mu)

    def server_round(self, round_index: int, state: ServerState, train_on_server: ServerTrainer | None) -> ServerState:
        """With labels at the server, fine-tune the global model on them first."""
        if train_on_server is None:
            return state
        update = train_on_server(self.payload(round_index, state, client_id=-1))
        return replace(state, params=update.arrays)

    def aggregate(self, updates: Sequence[Update], state: ServerState) -> ServerState:
        trained = [u for u in updates if u.num_examples > 0]
        if not trained:  # e.g. only unlabeled clients were sampled: nothing to learn from
            return state
        algo = self.cfg.algorithm
        average = combine(trained, self.cfg.federation.robust)
        return server_step(state, average, lr=algo.server_lr, momentum=algo.server_momentum)


@ALGORITHMS.register("fedprox")
class FedProx(FedAvg):
    """FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys
    2020): FedAvg whose clients add mu/2 * ||w - w_global||^2 to their loss."""

    smoke = ("algorithm.proximal_mu=0.01",)  # it refuses mu = 0, the recipe's default

    def __init__(self, cfg: RecipeConfig):
        if cfg.algorithm.proximal_mu <= 0:
            raise UserError("algorithm.proximal_mu: fedprox needs mu > 0 (e.g. 0.01)")
        super().__init__(cfg)
