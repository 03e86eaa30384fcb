"""MOCHA's local solver on a client (see `fedssl.algorithms.mocha` for the server side).

Each client t owns its task's weights w_t (the coupled arrays), kept in its state
between rounds. Its share of MOCHA's objective is its loss plus the part of the
coupling lambda/2 tr(W Omega^-1 W^T) that depends on w_t,

    lambda/2 P_tt ||w_t||^2 + lambda <w_t, sum_{j != t} P_tj w_j>      (P = Omega^-1),

which equals, up to a constant, lambda P_tt / 2 ||w_t - a_t||^2 with the anchor
a_t = -sum_{j != t} (P_tj / P_tt) w_j: a proximal pull toward the other tasks'
weights combined through Omega (under a Gaussian prior on the tasks, the
conditional mean of w_t given the others). The server sends exactly that: the
anchor under the coupled arrays' names and mu_t = lambda P_tt, so the local solver
is the FedProx learner's proximal term, with a target and a weight of the client's own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedssl.config.schema import TrainConfig
from fedssl.learners.base import ClientContext
from fedssl.learners.personal import PERSONAL, personal_arrays, prefixed
from fedssl.learners.supervised import SupervisedLearner
from fedssl.messages import Payload

MU = "mocha_mu"  # payload config: lambda P_tt, the weight of the client's pull toward its anchor
WORK = "mocha_work"  # payload config: the fraction of the round's step budget this client runs


class MochaLearner(SupervisedLearner):
    """Cross-entropy plus mu_t/2 ||w_t - a_t||^2 over the coupled arrays, for a
    fraction of the round's steps.

    The payload's coupled arrays are the anchor a_t (held fixed for the round, as
    FedProx's global weights), not a starting point: the client starts from its own
    w_t, which it keeps; a first-time client starts from the model's initialization
    (`initial`, the weights every task starts from). Arrays that are not coupled (a
    shared body, buffers) are loaded from the payload as in FedAvg.
    """

    def __init__(self, model: nn.Module, train_cfg: TrainConfig, coupled: list[str]):
        super().__init__(model, train_cfg, proximal_mu=0.0)
        self.coupled = list(coupled)
        self.initial = self.arrays(self.coupled)  # copies: training never changes them
        self.work = 1.0

    def start_round(self, payload: Payload, context: ClientContext) -> None:
        self.proximal_mu = float(payload.config.get(MU, 0.0))
        self.work = float(payload.config.get(WORK, 1.0))
        self.global_params = {name: payload.arrays[name] for name in self.coupled}  # the anchor
        self.load_arrays(personal_arrays(context.state) or self.initial)

    def round_steps(self, steps: int) -> int:
        """The client's share of the budget (MOCHA's systems heterogeneity): at least
        one step wherever the budget has any."""
        return math.ceil(self.work * steps) if steps > 0 else 0

    def end_round(self) -> dict[str, torch.Tensor]:
        return prefixed(self.arrays(self.coupled), PERSONAL)
