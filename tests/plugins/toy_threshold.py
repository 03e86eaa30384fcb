"""A threshold rule from outside fedssl: tau halved, counting the pseudo-labels it
has judged in the client's kept state (so it keeps client state)."""

import torch

from fedssl.ssl.thresholds import THRESHOLDS


@THRESHOLDS.register("half_tau")
class HalfTau:
    keeps_client_state = True

    def __init__(self, tau: float, judged: torch.Tensor):
        self.tau, self.judged = tau, judged

    @classmethod
    def build(cls, tau, num_classes, num_unlabeled, kept):
        return cls(tau, kept.get("half_tau_judged", torch.zeros((), dtype=torch.int64)).clone())

    def thresholds(self) -> float:
        return self.tau / 2

    def update(self, index, labels, confidence) -> None:
        self.judged += len(index)

    def state(self) -> dict:
        return {"half_tau_judged": self.judged.clone()}
