"""FedNova: normalized averaging of clients that did unequal local work.

Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020. FedAvg weighs a client that ran many local
steps as much as one that ran few, so the global model drifts towards the
objective of the hard workers. FedNova divides each client's change by its local
work and rescales the average by the cohort's effective work:

    d_i = (w - w_i) / ||a_i||_1,   tau_eff = sum_i p_i ||a_i||_1,
    w <- w - server_lr * tau_eff * sum_i p_i d_i,       p_i = n_i / sum_j n_j

where a_i is client i's vector of local step coefficients: for plain SGD every step
counts 1, so ||a_i||_1 = tau_i, its local steps; with momentum rho, ||a_i||_1 =
[tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho); with FedProx's proximal
term mu at lr eta, ||a_i||_1 = [1 - (1 - eta mu)^tau_i] / (eta mu) (the paper,
section 4 and appendix). When every client does the same work, d_i's scale
cancels and FedNova is FedAvg. tau_i is the step count the server asked the
client for (`local_steps`, added by the engine), never the client's own claim.
Adaptive client optimizers (Adam) have no such coefficients and are refused.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedssl.algorithms.aggregate import ServerState, server_step
from fedssl.algorithms.base import ALGORITHMS
from fedssl.algorithms.capabilities import Capabilities
from fedssl.algorithms.fedavg import FedAvg
from fedssl.config.schema import RecipeConfig
from fedssl.errors import UserError
from fedssl.messages import Arrays, Update


def step_norm(steps: int, momentum: float = 0.0, lr: float = 0.0, mu: float = 0.0) -> float:
    """||a_i||_1 of a client that ran `steps` local steps (see the module docstring)."""
    if momentum > 0:
        return (steps - momentum * (1 - momentum ** steps) / (1 - momentum)) / (1 - momentum)
    if mu > 0:
        decay = 1 - lr * mu
        return (1 - decay ** steps) / (lr * mu)
    return float(steps)


def normalized_average(params: Arrays, updates: Sequence[tuple[Arrays, int, float]]) -> Arrays:
    """FedNova's new global model before the server step (server_lr 1):
    w - tau_eff * sum_i p_i (w - w_i) / norm_i, over (weights w_i, examples n_i,
    norm_i = ||a_i||_1). Integer arrays (BatchNorm's counters) are averaged by
    examples, as FedAvg does."""
    total = sum(n for _, n, _ in updates)
    p = [n / total for _, n, _ in updates]
    tau_eff = sum(p_i * norm for p_i, (_, _, norm) in zip(p, updates))
    averaged = {}
    for name, current in params.items():
        if not current.is_floating_point():
            mean = sum(p_i * arrays[name].double() for p_i, (arrays, _, _) in zip(p, updates))
            averaged[name] = mean.round().to(current.dtype)
            continue
        direction = torch.zeros_like(current)
        for p_i, (arrays, _, norm) in zip(p, updates):
            direction.add_(current - arrays[name], alpha=p_i / norm)
        averaged[name] = current - tau_eff * direction
    return averaged


@ALGORITHMS.register("fednova")
class FedNova(FedAvg):
    """FedNova (Wang et al., NeurIPS 2020): FedAvg's clients, normalized averaging."""

    # its aggregate is not the examples-weighted mean: each update is normalized by its own steps
    capabilities = Capabilities(dense_updates=True, counts_local_steps=True,
                                reads_each_update="FedNova normalizes each update by its own local steps")

    def __init__(self, cfg: RecipeConfig):
        if cfg.train.optimizer != "sgd":
            raise UserError(f"train.optimizer: fednova normalizes SGD's local steps; {cfg.train.optimizer} has no "
                            "step coefficients it can normalize by (use sgd, with or without momentum)")
        if cfg.train.momentum > 0 and cfg.algorithm.proximal_mu > 0:
            raise UserError("algorithm.proximal_mu: fednova normalizes momentum SGD or FedProx's proximal SGD, not both")
        super().__init__(cfg)

    def norm(self, steps: int) -> float:
        train = self.cfg.train
        return step_norm(steps, train.momentum, train.lr, self.cfg.algorithm.proximal_mu)

    def aggregate(self, updates: Sequence[Update], state: ServerState) -> ServerState:
        trained = [u for u in updates if u.num_examples > 0 and u.metrics.get("local_steps", 0) > 0]
        if not trained:
            return state
        average = normalized_average(state.params, [(u.arrays, u.num_examples, self.norm(int(u.metrics["local_steps"])))
                                                    for u in trained])
        algo = self.cfg.algorithm
        return server_step(state, average, lr=algo.server_lr, momentum=algo.server_momentum)
