"""Which clients take part in a round.

Drawing a round's cohort costs time and memory in proportion to the cohort (and to
the clients left out), never to the population: `sample_cohort` draws positions
among the clients that may train and maps them to client ids without listing the
population, so 100 clients of 100,000 cost what 100 of 1,000 do.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # sampling sits below config: it reads the section, never imports it
    from fedssl.config.schema import FederationConfig


def clients_per_round(cfg: FederationConfig) -> int:
    if cfg.client_fraction is None:
        return cfg.clients_per_round
    return max(1, round(cfg.client_fraction * cfg.clients))


def sample_clients(num_clients: int, count: int, seed: int, round_index: int, attempt: int = 0) -> list[int]:
    """`count` distinct client ids, drawn from (seed, round) alone so that a resumed
    run samples exactly what the uninterrupted run would have (`attempt` > 0: the
    draw of a retried round)."""
    rng = np.random.default_rng([seed, round_index, 0x5A3] + ([attempt] if attempt else []))
    return sorted(rng.choice(num_clients, size=count, replace=False).tolist())


def sample_cohort(num_clients: int, count: int, seed: int, round_index: int, attempt: int = 0,
                  excluded: Collection[int] = ()) -> list[int]:
    """`count` distinct client ids (fewer if fewer may train) of 0..num_clients-1 but
    `excluded`, sorted: exactly the ids `sample_clients` picks from the list of
    clients that may train, without making that list."""
    left_out = np.unique(np.fromiter((c for c in excluded if 0 <= c < num_clients), dtype=np.int64))
    eligible = num_clients - len(left_out)
    positions = sample_clients(eligible, min(count, eligible), seed, round_index, attempt)
    return nth_remaining(np.asarray(positions, dtype=np.int64), left_out).tolist()


def evaluation_cohort(num_clients: int, count: int, seed: int, round_index: int,
                      excluded: Collection[int] = ()) -> list[int]:
    """`count` distinct clients of 0..num_clients-1 but `excluded` to score at an
    evaluation (all of them where count is 0 or covers them), drawn from (seed, round)
    on a stream of its own, so evaluating never moves which clients train."""
    left_out = np.unique(np.fromiter((c for c in excluded if 0 <= c < num_clients), dtype=np.int64))
    eligible = num_clients - len(left_out)
    if count <= 0 or count >= eligible:
        return nth_remaining(np.arange(eligible, dtype=np.int64), left_out).tolist()
    rng = np.random.default_rng([seed, round_index, 0xE7A1])
    positions = np.sort(rng.choice(eligible, size=count, replace=False)).astype(np.int64)
    return nth_remaining(positions, left_out).tolist()


def nth_remaining(positions: np.ndarray, left_out: np.ndarray) -> np.ndarray:
    """The ids at `positions` in the ascending list of ids 0, 1, 2, ... that are not in
    `left_out` (sorted, distinct): id x sits at position x - (ids left out up to x),
    so x is the fixed point of x = p + (ids left out up to x), reached from x = p
    in at most len(left_out) + 1 steps, each a binary search."""
    ids = positions.copy()
    while True:
        moved = positions + np.searchsorted(left_out, ids, side="right")
        if np.array_equal(moved, ids):
            return ids
        ids = moved


def poisson_sample(candidates: list[int], rate: float, seed: int, round_index: int, attempt: int = 0) -> list[int]:
    """Each candidate independently with probability `rate` (Poisson sampling, what
    differential privacy's accountant assumes), drawn from (seed, round, attempt)."""
    rng = np.random.default_rng([seed, round_index, 0x9015, attempt])
    return [c for c, u in zip(candidates, rng.random(len(candidates))) if u < rate]


def held_out_clients(cfg: FederationConfig, seed: int) -> frozenset[int]:
    """The clients that never train (`federation.evaluation.holdout_clients`: a share of the
    clients if below 1, else a count), drawn from the seed alone, so the server and
    every node agree on them without being told."""
    holdout = cfg.evaluation.holdout_clients
    count = round(holdout * cfg.clients) if holdout < 1 else int(holdout)
    if count <= 0:
        return frozenset()
    rng = np.random.default_rng([seed, 0x401D])
    return frozenset(rng.choice(cfg.clients, size=min(count, cfg.clients), replace=False).tolist())
