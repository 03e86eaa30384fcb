"""Pure server-side aggregation: functions of the updates and the server state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from fedssl.messages import Arrays, Update


@dataclass(frozen=True)
class ServerState:
    """What the server keeps between rounds, checkpointed whole.

    Attributes:
        params: the global model's shared arrays: what clients are sent and what the
            algorithm's `global_weights` is built from.
        momentum: the server optimizer's momentum buffer (FedAvgM).
        extras: the algorithm's own server state (FedMatch: every client's latest
            model, embeddings and helper choice), never sent or evaluated as such.
    """

    params: Arrays
    momentum: Arrays | None = None
    extras: Arrays = field(default_factory=dict)


class RunningAverage:
    """The example-weighted average of updates, folded in one at a time.

    A round then holds one running sum instead of every client's arrays: with 1,000
    clients a round of a 2 MB model would otherwise hold 2 GB of updates. Integer
    arrays (BatchNorm's `num_batches_tracked`) are summed in float64 and rounded
    back to their dtype. Updates without examples are skipped.
    """

    def __init__(self) -> None:
        self.sums: Arrays = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.total = 0

    def add(self, update: Update) -> None:
        if update.num_examples <= 0:
            return
        for name, array in update.arrays.items():
            if name not in self.sums:
                self.dtypes[name] = array.dtype
                self.sums[name] = torch.zeros_like(array, dtype=array.dtype if array.is_floating_point() else torch.float64)
            self.sums[name].add_(array.to(self.sums[name].dtype), alpha=update.num_examples)
        self.total += update.num_examples

    def average(self) -> Arrays:
        if self.total <= 0:
            raise ValueError("an average needs at least one update with examples")
        return {name: (acc / self.total).round().to(self.dtypes[name]) if not self.dtypes[name].is_floating_point
                else acc / self.total for name, acc in self.sums.items()}


def weighted_average(updates: Sequence[Update]) -> Arrays:
    """Average each array over `updates`, weighted by their example counts (see `RunningAverage`)."""
    running = RunningAverage()
    for update in updates:
        running.add(update)
    return running.average()


def server_step(state: ServerState, average: Arrays, lr: float = 1.0, momentum: float = 0.0) -> ServerState:
    """Apply the averaged client update with a server SGD step.

    The pseudo-gradient is `params - average`. With lr 1 and no momentum the new
    global model is the average itself (FedAvg, McMahan et al. 2017); momentum > 0
    is FedAvgM (Hsu et al., "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", 2019).
    """
    if lr == 1.0 and momentum == 0.0:
        return ServerState(params=average, momentum=None, extras=state.extras)
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
    return ServerState(params=params, momentum=velocity or None, extras=state.extras)
