"""The plain data that crosses between server and clients.

Only these travel (a backend's codec maps exactly these fields): arrays by name,
scalars, and counts. Never images, labels or per-sample values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Arrays = dict[str, torch.Tensor]
Scalar = int | float | str | bool


def array_bytes(arrays: Arrays) -> int:
    """Bytes the arrays take on the wire (their raw contents)."""
    return sum(a.numel() * a.element_size() for a in arrays.values())


@dataclass(frozen=True)
class Payload:
    """Server -> client for one round: the shared weights, algorithm extras (such as
    FedMatch's helper models) and config scalars."""

    round: int
    arrays: Arrays
    config: dict[str, Scalar] = field(default_factory=dict)
    extras: Arrays = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return array_bytes(self.arrays) + array_bytes(self.extras)


@dataclass(frozen=True)
class Update:
    """Client -> server: the client's new shared weights (or an encoding of them,
    such as sparse deltas), how many examples it trained on (the aggregation
    weight), and scalar training metrics."""

    client_id: int
    arrays: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return array_bytes(self.arrays)
