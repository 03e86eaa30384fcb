"""Which clients take part in a round."""

from __future__ import annotations

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


def poisson_sample(candidates: list[int], rate: float, seed: int, round_index: int, attempt: int = 0) -> list[int]:
    """Each candidate independently with probability `rate` (Poisson sampling, what
    differential privacy's accountant assumes), drawn from (seed, round, attempt)."""
    rng = np.random.default_rng([seed, round_index, 0x9015, attempt])
    return [c for c, u in zip(candidates, rng.random(len(candidates))) if u < rate]


def held_out_clients(cfg: FederationConfig, seed: int) -> frozenset[int]:
    """The clients that never train (`federation.holdout_clients`: a share of the
    clients if below 1, else a count), drawn from the seed alone, so the server and
    every node agree on them without being told."""
    count = round(cfg.holdout_clients * cfg.clients) if cfg.holdout_clients < 1 else int(cfg.holdout_clients)
    if count <= 0:
        return frozenset()
    rng = np.random.default_rng([seed, 0x401D])
    return frozenset(rng.choice(cfg.clients, size=min(count, cfg.clients), replace=False).tolist())
