"""Pure pieces of federated self-supervised learning: FedEMA's divergence-aware rate.

FedEMA (Zhuang, Wen and Zhang, "Divergence-aware Federated Self-Supervised
Learning", ICLR 2022, Section 5) updates a client's local online network from the
global one by an EMA whose rate grows with their divergence:

    mu = min(lambda * ||W_g - W_k||, 1)
    W_k <- mu * W_k + (1 - mu) * W_g

W_k is the client's online network from its previous round, W_g the global one just
received, ||.|| the L2 norm over all their weights. A client far from the global
model keeps more of its own knowledge. lambda is a fixed scaler, or set by the
paper's autoscaler once per client, the first time it has a local model to compare:
lambda_k = tau / ||W_g - W_k||, so that its first rate is the expected tau.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from fedssl.messages import Arrays


def divergence(global_arrays: Arrays, local_arrays: Arrays, names: Iterable[str]) -> float:
    """||W_g - W_k||: the L2 norm of the difference over the arrays `names`, as one vector."""
    squares = [(global_arrays[n].double() - local_arrays[n].double()).pow(2).sum() for n in names]
    return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0


def autoscaled_lambda(tau: float, divergence_value: float) -> float | None:
    """FedEMA's autoscaler: lambda = tau / ||W_g - W_k|| (None while they coincide,
    where any rate gives the same weights)."""
    return tau / divergence_value if divergence_value > 0 else None


def fedema_rate(divergence_value: float, lam: float) -> float:
    """mu = min(lambda * ||W_g - W_k||, 1)."""
    return min(lam * divergence_value, 1.0)


def ema_blend(local: torch.Tensor, global_: torch.Tensor, mu: float) -> torch.Tensor:
    """mu * W_k + (1 - mu) * W_g."""
    return mu * local + (1.0 - mu) * global_
