"""Matching the hidden units of one layer across clients (PFNM's BBP-MAP), pure.

Yurochkin et al., "Bayesian Nonparametric Federated Learning of Neural Networks"
(PFNM, ICML 2019) model each client's units of a layer as noisy copies of global
units drawn from a Beta-Bernoulli process: a client unit w_jl either matches a
global unit (a Gaussian with prior N(mu0, sigma0^2 I) and noise sigma^2) or opens
a new one. Matching client j against the global units found so far is an
assignment problem: `assignment_cost` is the gain of each choice (its posterior
log-odds), solved with `scipy.optimize.linear_sum_assignment`; `match_layer`
matches every client that way, then re-matches each in turn (`iterations` sweeps
in random order), as the authors' `matching/pfnm.py::match_layer` does (used
unchanged by FedMA, Wang et al., ICLR 2020: github.com/IBM/FedMA).

A unit is its incoming weights (a conv filter, flattened) with its bias last, as
in FedMA's code. The prior mean is 0 for weights and 0.1 for the bias (their mu0
and mu0_bias); one sigma and one sigma0 serve weights and bias alike (their
default). `matched_average` then averages each global unit's matched client units,
weighted by the clients' example counts: where PFNM takes the posterior mean
(which shrinks toward mu0 with weight 1/sigma0^2), this is its sigma0 -> infinity
limit, so that matching copies of one model gives that model back exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

# FedMA's popularity term uses min(count, 10): beyond ten clients a unit's
# popularity stops mattering (pfnm.py::compute_cost).
POPULARITY_CAP = 10
MU0_BIAS = 0.1  # the prior mean of a unit's bias (pfnm.py: mu0_bias)


def prior_mean(dim: int, bias: bool) -> np.ndarray:
    """mu0 of a unit of `dim` numbers: 0 for weights, `MU0_BIAS` for the bias (last)."""
    mean = np.zeros(dim)
    if bias:
        mean[-1] = MU0_BIAS
    return mean


def assignment_cost(units: np.ndarray, sums: np.ndarray, precisions: np.ndarray, counts: np.ndarray,
                    mean: np.ndarray, sigma: float, sigma0: float, gamma: float, clients: int,
                    max_added: int) -> np.ndarray:
    """The gain of assigning each of one client's units to each global unit or to a new one.

    Args:
        units: the client's units, (L_j, D).
        sums: each global unit's natural mean, mu0/sigma0^2 + sum of its matched units / sigma^2, (L, D).
        precisions: each global unit's precision, 1/sigma0^2 + (matched units)/sigma^2, (L,).
        counts: how many clients' units each global unit holds, (L,).
        mean: the prior mean mu0, (D,).
        sigma, sigma0, gamma: the noise and prior standard deviations and the
            Indian-buffet mass (how readily new global units open).
        clients: J, the number of clients matched.
        max_added: how many new global units may open (the width limit).

    Returns:
        (L_j, L + max_added): column i < L is global unit i; column L + k is a new unit,
        the k+1-th opened by this client. As pfnm.py::compute_cost:
        ||G_i + w/s^2||^2 / (P_i + 1/s^2) - ||G_i||^2 / P_i + log(c_i / (J - c_i)) for
        an existing unit (c_i = min(count, 10)), and
        ||mu0/s0^2 + w/s^2||^2 / (1/s0^2 + 1/s^2) - ||mu0/s0^2||^2 * s0^2 - 2 log(k+1) + 2 log(gamma/J)
        for the (k+1)-th new one.
    """
    inv, inv0 = 1.0 / sigma**2, 1.0 / sigma0**2
    scaled = units * inv
    sum_sq = (sums**2).sum(axis=1)
    existing = (sum_sq[None, :] + 2 * scaled @ sums.T + (scaled**2).sum(axis=1)[:, None]) / (precisions + inv)[None, :]
    popular = np.minimum(counts, POPULARITY_CAP).astype(np.float64)
    existing = existing - (sum_sq / precisions)[None, :] + np.log(popular / (clients - popular))[None, :]
    prior = mean * inv0
    fresh = ((scaled + prior) ** 2).sum(axis=1) / (inv0 + inv) - (prior**2).sum() / inv0
    opened = fresh[:, None] - 2 * np.log(np.arange(1, max_added + 1))[None, :] + 2 * np.log(gamma / clients)
    return np.hstack([existing, opened])


class _Globals:
    """The global units while matching: natural means, precisions, and who holds each."""

    def __init__(self, dim: int, mean: np.ndarray, sigma: float, sigma0: float):
        self.inv, self.inv0 = 1.0 / sigma**2, 1.0 / sigma0**2
        self.prior = mean * self.inv0
        self.sums = np.zeros((0, dim))
        self.precisions = np.zeros(0)
        self.counts = np.zeros(0, dtype=np.int64)

    @property
    def width(self) -> int:
        return len(self.counts)

    def add(self, unit: np.ndarray, index: int) -> None:
        if index == self.width:
            self.sums = np.vstack([self.sums, self.prior[None, :]])
            self.precisions = np.append(self.precisions, self.inv0)
            self.counts = np.append(self.counts, 0)
        self.sums[index] += unit * self.inv
        self.precisions[index] += self.inv
        self.counts[index] += 1

    def remove(self, units: np.ndarray, assignment: np.ndarray) -> np.ndarray:
        """Take one client's units out; the global units left empty go. Returns the new
        index of every old global unit (-1: gone)."""
        for unit, index in zip(units, assignment):
            self.sums[index] -= unit * self.inv
            self.precisions[index] -= self.inv
            self.counts[index] -= 1
        keep = self.counts > 0
        renumber = np.full(self.width, -1)
        renumber[keep] = np.arange(int(keep.sum()))
        self.sums, self.precisions, self.counts = self.sums[keep], self.precisions[keep], self.counts[keep]
        return renumber


def match_layer(units: Sequence[np.ndarray], sigma: float, sigma0: float, gamma: float, max_width: int,
                iterations: int, rng: np.random.Generator, bias: bool = True) -> tuple[list[np.ndarray], int]:
    """Match one layer's units across clients (pfnm.py::match_layer).

    Args:
        units: per client, its units (L_j, D): incoming weights flattened, bias last.
        max_width: the most global units there may be (at least the widest client's).
        iterations: sweeps re-matching each client against the others, in `rng`'s order.
        bias: whether the last number of a unit is a bias (its prior mean differs).

    Returns:
        Per client, the global unit each of its units went to (L_j,), and the global width.
        The widest client (the first of them) seeds the global units in its own order,
        so a client matched against copies of itself keeps its order.
    """
    clients = len(units)
    dim = units[0].shape[1]
    mean = prior_mean(dim, bias)
    max_width = max(max_width, max(len(u) for u in units))
    order = sorted(range(clients), key=lambda j: -len(units[j]))
    found = _Globals(dim, mean, sigma, sigma0)
    assignments: list[np.ndarray | None] = [None] * clients
    first = order[0]
    assignments[first] = np.arange(len(units[first]))
    for unit, index in zip(units[first], assignments[first]):
        found.add(unit, int(index))

    def match(j: int) -> None:
        width = found.width
        max_added = min(len(units[j]), max(max_width - width, 0))
        cost = assignment_cost(units[j], found.sums, found.precisions, found.counts, mean, sigma, sigma0, gamma,
                               clients, max_added)
        rows, cols = linear_sum_assignment(cost, maximize=True)
        assignment = np.empty(len(units[j]), dtype=np.int64)
        opened = 0
        for row, col in zip(rows, cols):  # rows come sorted: new units open in the client's order
            if col < width:
                assignment[row] = col
            else:
                assignment[row] = width + opened
                opened += 1
            found.add(units[j][row], int(assignment[row]))
        assignments[j] = assignment

    for j in order[1:]:
        match(j)
    for _ in range(iterations if clients > 1 else 0):
        for j in rng.permutation(clients):
            renumber = found.remove(units[j], assignments[j])
            for other in range(clients):
                if other != j:
                    assignments[other] = renumber[assignments[other]]
            match(int(j))
    return [np.asarray(a) for a in assignments], found.width


def matched_average(units: Sequence[np.ndarray], assignments: Sequence[np.ndarray], width: int,
                    weights: Sequence[float]) -> np.ndarray:
    """Each global unit: the `weights`-weighted mean of the client units matched to it, (width, D)."""
    total = np.zeros((width, units[0].shape[1]))
    mass = np.zeros(width)
    for unit, assignment, weight in zip(units, assignments, weights):
        total[assignment] += weight * unit
        mass[assignment] += weight
    return total / mass[:, None]


def patch_inputs(weight: torch.Tensor, assignment: np.ndarray, width: int) -> torch.Tensor:
    """The next layer's weight with its input channels moved where their units went:
    input channel c goes to channel `assignment[c]` of `width`; global units the
    client has no unit for get zero weights (FedMA's `block_patching`). A linear
    layer after a convolution reads each channel's positions as a block (channel-
    major flattening), and the block moves whole."""
    out, inputs = weight.shape[0], len(assignment)
    grouped = weight.reshape(out, inputs, -1)
    patched = grouped.new_zeros(out, width, grouped.shape[2])
    patched[:, torch.as_tensor(assignment, dtype=torch.long)] = grouped
    return patched.reshape(out, width * grouped.shape[2]) if weight.dim() == 2 else patched.reshape(out, width, *weight.shape[2:])
