"""Bounding each client's contribution: the L2 norm of its update delta.

A client's delta is its returned weights minus the global weights it received.
Only floating arrays are deltas; integer buffers (BatchNorm's
`num_batches_tracked`) are counters, not parameters, and are left out here.

Adaptive clipping follows Andrew, Thakkar, McMahan and Ramaswamy, "Differentially
Private Learning with Adaptive Clipping" (NeurIPS 2021): the bound C tracks the
`target_quantile` of the clients' delta norms by a geometric step,
C <- C * exp(-eta * (b - gamma)), where b is the (noised) fraction of clients
whose delta was within C. The count is privatized like the deltas; see
`split_noise` for how the noise budget is shared between the two.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fedssl.messages import Arrays


def update_delta(arrays: Arrays, reference: Arrays) -> Arrays:
    """`arrays - reference` for every floating array of `reference`."""
    return {name: arrays[name] - ref for name, ref in reference.items() if ref.is_floating_point()}


def global_norm(arrays: Arrays) -> float:
    """The L2 norm of all arrays taken together as one vector (in float64)."""
    return math.sqrt(sum(float(a.double().pow(2).sum()) for a in arrays.values()))


def clip_to_norm(delta: Arrays, bound: float) -> tuple[Arrays, float]:
    """`delta` scaled down to L2 norm `bound` if it is longer; returns it and its
    norm before clipping."""
    norm = global_norm(delta)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {name: value * scale for name, value in delta.items()}, norm


def noisy_unclipped_fraction(norms: Sequence[float], bound: float, stddev: float, denominator: float,
                             generator: torch.Generator) -> float:
    """Andrew et al.'s private estimate of the share of deltas with norm <= bound.

    Each client contributes b_i - 1/2 (b_i = 1 if its norm is within the bound),
    so that adding or removing one client moves the sum by at most 1/2; the sum
    gets N(0, stddev^2) noise and is divided by the expected number of clients
    (a fixed denominator, as for the deltas).
    """
    centred = sum((1.0 if n <= bound else 0.0) - 0.5 for n in norms)
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * stddev
    return (centred + noise) / denominator + 0.5


def adapt_clip(bound: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """The geometric update of the clipping bound (Andrew et al. 2021, eq. 4): it
    shrinks while more than `target_quantile` of the deltas fit within it, and grows
    while fewer do."""
    return bound * math.exp(-lr * (unclipped_fraction - target_quantile))


def split_noise(noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier left for the deltas when the clipped count takes its share.

    Andrew et al. (2021, Theorem 1): releasing the delta sum with noise multiplier
    z_delta and the centred count (sensitivity 1/2) with noise std sigma_b costs as
    much privacy as one Gaussian mechanism of multiplier z, where
    z^-2 = z_delta^-2 + (2 sigma_b)^-2. So the accountant composes z, and the deltas
    get z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2, which needs 2 sigma_b > z.
    """
    if noise_multiplier == 0:
        return 0.0
    remaining = noise_multiplier ** -2 - (2 * count_stddev) ** -2
    if remaining <= 0:
        raise ValueError(f"count_stddev {count_stddev} must exceed noise_multiplier / 2 = {noise_multiplier / 2}")
    return remaining ** -0.5
