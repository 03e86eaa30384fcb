"""Byzantine-robust aggregation: pure functions of the updates.

Each replaces FedAvg's example-weighted average (`aggregate.weighted_average`) by
an estimate that a minority of arbitrary updates cannot drag far:

- coordinate-wise median and coordinate-wise trimmed mean (Yin, Chen, Ramchandran
  and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates", ICML 2018);
- Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017).

They are unweighted, as in the papers: weighting by the example count a client
reports would let an attacker claim a huge count (the plain mean trusts it).
Integer arrays (BatchNorm's `num_batches_tracked`) go through the same estimate in
float64 and are rounded back. Krum's distances are taken over the floating arrays.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fedssl.config.schema import RobustConfig
from fedssl.errors import UserError
from fedssl.algorithms.aggregate import weighted_average
from fedssl.choices import AGGREGATORS
from fedssl.messages import Arrays, Update



def _stacked(updates: Sequence[Update], name: str) -> torch.Tensor:
    first = updates[0].arrays[name]
    dtype = first.dtype if first.is_floating_point() else torch.float64
    return torch.stack([u.arrays[name].to(dtype) for u in updates])


def _cast_back(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value if like.is_floating_point() else value.round().to(like.dtype)


def coordinate_median(updates: Sequence[Update]) -> Arrays:
    """The median of every coordinate over the updates; with an even count, the mean
    of the two middle values (torch.median would return the lower one)."""
    if not updates:
        raise ValueError("coordinate_median needs at least one update")
    n, out = len(updates), {}
    for name, first in updates[0].arrays.items():
        ordered = _stacked(updates, name).sort(dim=0).values
        middle = ordered[(n - 1) // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        out[name] = _cast_back(middle, first)
    return out


def trimmed_mean(updates: Sequence[Update], beta: float) -> Arrays:
    """For every coordinate, drop the floor(beta * n) largest and as many smallest
    values and average the rest."""
    n = len(updates)
    k = math.floor(beta * n)
    if n - 2 * k < 1:
        raise ValueError(f"trimmed_mean: trimming {k} of {n} values from each side leaves none")
    out = {}
    for name, first in updates[0].arrays.items():
        ordered = _stacked(updates, name).sort(dim=0).values
        out[name] = _cast_back(ordered[k:n - k].mean(dim=0), first)
    return out


def krum_scores(updates: Sequence[Update], byzantine: int) -> list[float]:
    """Blanchard et al.'s score of each update: the sum of its squared distances to
    its n - f - 2 nearest other updates."""
    n = len(updates)
    if n < 2 * byzantine + 3:
        raise UserError(f"federation.robust.byzantine: krum with f={byzantine} needs at least 2f + 3 = "
                        f"{2 * byzantine + 3} updates, got {n}")
    names = [k for k, v in updates[0].arrays.items() if v.is_floating_point()]
    flat = torch.stack([torch.cat([u.arrays[k].double().flatten() for k in names]) for u in updates])
    distances = torch.cdist(flat, flat).pow(2)
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1:]])
        scores.append(float(others.sort().values[: n - byzantine - 2].sum()))
    return scores


def multi_krum(updates: Sequence[Update], byzantine: int, select: int) -> Arrays:
    """The plain average of the `select` updates with the lowest Krum scores (ties
    go to the earlier update); `select` = 1 is Krum itself."""
    scores = krum_scores(updates, byzantine)
    if not 1 <= select <= len(updates):
        raise UserError(f"federation.robust.krum_select: must be between 1 and the {len(updates)} updates, got {select}")
    chosen = sorted(range(len(updates)), key=lambda i: (scores[i], i))[:select]
    return weighted_average([Update(updates[i].client_id, updates[i].arrays, 1) for i in chosen])


def krum(updates: Sequence[Update], byzantine: int) -> Arrays:
    """The one update with the lowest Krum score."""
    return multi_krum(updates, byzantine, 1)


AGGREGATORS.register("mean")(lambda updates, cfg: weighted_average(updates))
AGGREGATORS.register("median")(lambda updates, cfg: coordinate_median(updates))
AGGREGATORS.register("trimmed_mean")(lambda updates, cfg: trimmed_mean(updates, cfg.trim_fraction))
AGGREGATORS.register("krum")(lambda updates, cfg: krum(updates, cfg.byzantine))


@AGGREGATORS.register("multi_krum")
def _multi_krum(updates: Sequence[Update], cfg: RobustConfig) -> Arrays:
    # Blanchard et al. average at most n - f updates; with clients dropped this round, n is smaller.
    most = len(updates) - cfg.byzantine
    return multi_krum(updates, cfg.byzantine, min(cfg.krum_select or most, most))


def combine(updates: Sequence[Update], cfg: RobustConfig) -> Arrays:
    """The updates combined by `cfg.aggregator` (one of `AGGREGATORS`)."""
    return AGGREGATORS.get(cfg.aggregator, key="federation.robust.aggregator")(updates, cfg)


def minimum_updates(cfg: RobustConfig) -> int:
    """How many updates the aggregator needs to mean anything: Krum's 2f + 3."""
    return 2 * cfg.byzantine + 3 if cfg.aggregator in ("krum", "multi_krum") else 1
