"""An algorithm from outside fedssl, in one module: FedAvg that moves the global model
only `algorithm.toy.step` of the way to the clients' average (its own config
section) and counts the updates it has averaged (its own server state)."""

from dataclasses import dataclass, replace

import torch

from fedssl.algorithms.aggregate import weighted_average
from fedssl.algorithms.base import ALGORITHMS, Algorithm
from fedssl.algorithms.capabilities import Capabilities
from fedssl.config.schema import ALGORITHM_SECTIONS
from fedssl.config.validate import require
from fedssl.learners.supervised import SupervisedLearner


@ALGORITHM_SECTIONS.register("toy")
@dataclass
class ToyConfig:
    step: float = 1.0  # share of the way from the global model to the clients' average

    def check(self, cfg) -> None:
        require(0 < self.step <= 1, "algorithm.toy.step", f"must be in (0, 1], got {self.step}")


@ALGORITHMS.register("toy")
class Toy(Algorithm):
    # every update holds every array; its server step is its own, which reads each update
    capabilities = Capabilities(dense_updates=True, reads_each_update="the toy's own server step")

    def make_learner(self, model):
        return SupervisedLearner(model, self.cfg.train)

    def aggregate(self, updates, state):
        trained = [u for u in updates if u.num_examples > 0]
        if not trained:
            return state
        average, step = weighted_average(trained), self.cfg.algorithm.toy.step
        params = {n: p + step * (average[n] - p) if p.is_floating_point() else average[n] for n, p in state.params.items()}
        averaged = state.extras.get("averaged", torch.zeros((), dtype=torch.int64)) + len(trained)
        return replace(state, params=params, extras={"averaged": averaged})
