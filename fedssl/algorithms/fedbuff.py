"""FedBuff: asynchronous clients, buffered aggregation with staleness weights.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022. Up to `concurrency` clients train at once, each on the model version
it was sent; whenever one finishes, another starts on the current model. The server
adds each arriving change Delta_i = w_i - w_sent to a buffer, weighted by its
staleness tau_i (model versions published since it was sent),

    s(tau) = 1 / sqrt(1 + tau),

and once `buffer_size` (K) changes are in, publishes a new version:

    w <- w + server_lr * (1 / K) * sum_i s(tau_i) Delta_i.

In fedssl one round is one such flush (`fedssl.federation.buffered` runs it on
simulated time); evaluation, logging and checkpoints follow rounds as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fedssl.algorithms.aggregate import ServerState
from fedssl.algorithms.base import ALGORITHMS
from fedssl.algorithms.fedavg import FedAvg
from fedssl.config.schema import ALGORITHM_SECTIONS, RecipeConfig
from fedssl.config.validate import require
from fedssl.messages import Arrays, Update


@ALGORITHM_SECTIONS.register("fedbuff")
@dataclass
class FedBuffConfig:
    """`algorithm.fedbuff`: the buffer and how many clients train at once."""

    buffer_size: int = 2  # K: client changes per published model version (one round)
    concurrency: int = 0  # clients training at the same time (0: federation.clients_per_round); a finished one is replaced at once

    def check(self, cfg: RecipeConfig) -> None:
        require(self.buffer_size >= 1, "algorithm.fedbuff.buffer_size", f"must be >= 1, got {self.buffer_size}")
        require(self.concurrency >= 0, "algorithm.fedbuff.concurrency", f"must be >= 0, got {self.concurrency}")
        if cfg.algorithm.name != "fedbuff":
            return
        fed = cfg.federation
        require(self.concurrency <= fed.clients, "algorithm.fedbuff.concurrency",
                f"must be at most federation.clients ({fed.clients}), got {self.concurrency}")
        # checked here, when the recipe loads, so that no Flower simulation starts first
        require(fed.backend == "inprocess", "federation.backend",
                f"fedbuff runs on the inprocess backend only, got {fed.backend} (its clients start one at a time on "
                "simulated time; fedssl's Flower rounds are synchronous cohorts)")
        require(fed.system.policy == "wait_all", "federation.system.policy",
                f"fedbuff has no synchronous rounds to cut short; use wait_all, got {fed.system.policy}")
        require(cfg.algorithm.server_momentum == 0, "algorithm.server_momentum",
                "fedbuff applies its buffer with a plain server step (0)")


def staleness_weight(staleness: int) -> float:
    """FedBuff's s(tau) = 1 / sqrt(1 + tau)."""
    return 1.0 / math.sqrt(1.0 + staleness)


def flush(params: Arrays, changes: Sequence[tuple[Arrays, int]], lr: float) -> Arrays:
    """The next model version from `params` and the buffer's (Delta_i, tau_i):
    params + lr / K * sum_i s(tau_i) Delta_i. Integer arrays (counters) take the
    rounded weighted change."""
    k = len(changes)
    out = {}
    for name, current in params.items():
        step = torch.zeros_like(current, dtype=current.dtype if current.is_floating_point() else torch.float64)
        for delta, staleness in changes:
            step.add_(delta[name].to(step.dtype), alpha=staleness_weight(staleness) / k)
        out[name] = current + lr * step if current.is_floating_point() else current + (lr * step).round().to(current.dtype)
    return out


@ALGORITHMS.register("fedbuff")
class FedBuff(FedAvg):
    """FedBuff (Nguyen et al., AISTATS 2022): FedAvg's clients, asynchronous buffered server."""

    averages_updates = False
    asynchronous = True

    def aggregate(self, updates: Sequence[Update], state: ServerState) -> ServerState:
        """One flush: each update's arrays are its change Delta_i, its metrics its `staleness`."""
        changes = [(u.arrays, int(u.metrics["staleness"])) for u in updates]
        if not changes:
            return state
        return ServerState(params=flush(state.params, changes, self.cfg.algorithm.server_lr), extras=state.extras)
