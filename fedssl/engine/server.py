"""The server's parts: what a run's stages read and update, built once per run."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

import torch

from fedssl.algorithms.aggregate import ServerState
from fedssl.algorithms.base import Algorithm
from fedssl.clients import Clients, Holding, Kinds
from fedssl.codecs.links import Links
from fedssl.config.schema import RecipeConfig
from fedssl.data.federated import FederatedData
from fedssl.data.tensors import TensorPool
from fedssl.engine.update_bound import UpdateBound
from fedssl.inprocess.trainer import ClientTrainer
from fedssl.privacy.mechanism import CentralDP
from fedssl.sampling import held_out_clients
from fedssl.simulation.policies import SystemHeterogeneity


@dataclass
class Server:
    """The server's side of a run, built once and reused every round, and its clients:
    the parts the round's stages use (`fedssl.engine.federation.Federation` runs them)."""

    cfg: RecipeConfig
    data: FederatedData  # the server's view of the data: its test and labeled sets, the recipe's partition
    algorithm: Algorithm
    trainer: ClientTrainer  # the server's learner: scores the global model, trains on the server's labels
    test: TensorPool
    clients: Clients
    privacy: CentralDP | None = None  # user-level DP (privacy.mechanism: central)
    system: SystemHeterogeneity | None = None  # device profiles and round policy (federation.system)
    links: Links | None = None  # the codecs on each link (federation.uplink, federation.downlink); default: the recipe's
    bound: UpdateBound | None = None  # the norm bound on every update (federation.robust.update_clip); default: the recipe's

    def __post_init__(self) -> None:
        if self.links is None:
            self.links = Links.build(self.cfg)
        if self.bound is None:
            # Not under DP: its own clip bounds every update within the accountant, and a
            # bound set by other clients' norms would be a release the accountant does not count.
            clip = self.cfg.federation.robust.update_clip
            self.bound = UpdateBound(0.0 if self.privacy else clip.multiple, clip.window)

    @cached_property
    def held_out(self) -> frozenset[int]:
        """Clients that never train (`federation.evaluation.holdout_clients`): scored as unseen people."""
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

    @property
    def averages_as_they_come(self) -> bool:
        """Whether the server's aggregate is the plain weighted mean of the updates
        (an averaging algorithm, `federation.robust.aggregator: mean`, no DP), so that a
        round can fold each update into a running average instead of holding all."""
        return (self.algorithm.capabilities.averages_updates and self.cfg.federation.robust.aggregator == "mean"
                and self.privacy is None)

    def initial_state(self) -> ServerState:
        return self.algorithm.init_server_state(self.trainer.learner.arrays(self.trainer.shared_names))

    def close(self) -> None:
        """Release what the clients hold outside this process (worker processes), if anything."""
        self.clients.close()
