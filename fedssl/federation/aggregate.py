"""Pure server-side aggregation: functions of the updates and the server state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fedssl.federation.messages import Arrays, Update


@dataclass(frozen=True)
class ServerState:
    """The global model's shared arrays and the server optimizer's momentum buffer."""

    params: Arrays
    momentum: Arrays | None = None


def weighted_average(updates: Sequence[Update]) -> Arrays:
    """Average each array over `updates`, weighted by their example counts.

    Integer arrays (BatchNorm's `num_batches_tracked`) are averaged in float64 and
    rounded back to their dtype.
    """
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("weighted_average needs at least one update with examples")
    averaged = {}
    for name, first in updates[0].arrays.items():
        acc_dtype = first.dtype if first.is_floating_point() else torch.float64
        acc = torch.zeros_like(first, dtype=acc_dtype)
        for update in updates:
            acc.add_(update.arrays[name].to(acc_dtype), alpha=update.num_examples / total)
        averaged[name] = acc if first.is_floating_point() else acc.round().to(first.dtype)
    return averaged


def server_step(state: ServerState, average: Arrays, lr: float = 1.0, momentum: float = 0.0) -> ServerState:
    """Apply the averaged client update with a server SGD step.

    The pseudo-gradient is `params - average`. With lr 1 and no momentum the new
    global model is the average itself (FedAvg, McMahan et al. 2017); momentum > 0
    is FedAvgM (Hsu et al., "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", 2019).
    """
    if lr == 1.0 and momentum == 0.0:
        return ServerState(params=average, momentum=None)
    params, velocity = {}, {}
    for name, current in state.params.items():
        if not current.is_floating_point():  # counters are not optimized, they are taken
            params[name] = average[name]
            continue
        step = current - average[name]
        if momentum > 0:
            previous = state.momentum[name] if state.momentum else torch.zeros_like(step)
            step = momentum * previous + step
            velocity[name] = step
        params[name] = current - lr * step
    return ServerState(params=params, momentum=velocity or None)
