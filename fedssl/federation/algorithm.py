"""What an algorithm is, and the registry that names them.

An algorithm is three small things: a client learner (a LightningModule), a pure
server aggregation, and a declaration of which arrays are shared. Backends drive
these and know nothing of the algorithm; algorithms know nothing of transport.
"""

from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
from torch import nn

from fedssl.config.schema import RecipeConfig
from fedssl.federation.aggregate import ServerState
from fedssl.federation.messages import Arrays, Scalar, Update
from fedssl.registry import Registry


class Algorithm:
    """Base class: share everything, override the learner and the aggregation."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg

    def make_learner(self, model: nn.Module) -> pl.LightningModule:
        raise NotImplementedError

    def shared_names(self, model: nn.Module) -> list[str]:
        """Names (state_dict keys) of the arrays that travel; the rest stay on the client."""
        return list(model.state_dict().keys())

    def init_server_state(self, arrays: Arrays) -> ServerState:
        return ServerState(params=arrays)

    def client_config(self, round_index: int) -> dict[str, Scalar]:
        """Scalars sent down with the weights each round."""
        return {}

    def aggregate(self, updates: Sequence[Update], state: ServerState) -> ServerState:
        raise NotImplementedError


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")


def build_algorithm(cfg: RecipeConfig) -> Algorithm:
    import fedssl.federation.fedavg  # noqa: F401  (registers fedavg, fedprox)

    return ALGORITHMS.get(cfg.algorithm.name, key="algorithm.name")(cfg)
