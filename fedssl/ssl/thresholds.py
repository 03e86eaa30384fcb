"""Confidence thresholds for pseudo-labels, chosen by `algorithm.ssl.threshold`:
fixed (FixMatch) or class-wise adaptive (Zhang et al., "FlexMatch: Boosting
Semi-Supervised Learning with Curriculum Pseudo Labeling", NeurIPS 2021).

A rule is one class registered in `THRESHOLDS` (as USB keeps thresholding a
separate piece: FlexMatch differs from FixMatch by this piece alone). A new rule
is one decorated class; the learner builds it each client round with `build`, and
`keeps_client_state` tells backends whether its `state()` must survive between a
client's rounds.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from fedssl.registry import Registry

UNSELECTED = -1


class ThresholdRule(Protocol):
    """What the pseudo-labeling learner asks of a threshold rule."""

    keeps_client_state: ClassVar[bool]  # whether `state()` is kept by the client between rounds

    @classmethod
    def build(cls, tau: float, num_classes: int, num_unlabeled: int, kept: dict[str, torch.Tensor]) -> ThresholdRule:
        """The rule for one client round, from `algorithm.ssl.tau` and what the client kept."""

    def thresholds(self) -> torch.Tensor | float:
        """The confidence a pseudo-label needs: one value, or one per class."""

    def update(self, index: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor) -> None:
        """Learn from a batch's predictions (`index`: positions in the client's unlabeled set)."""

    def state(self) -> dict[str, torch.Tensor]:
        """What the client keeps until its next round."""


THRESHOLDS: Registry[type[ThresholdRule]] = Registry("threshold rule", entry_points="fedssl.thresholds")


@THRESHOLDS.register("fixed")
class FixedThreshold:
    """The same threshold `tau` for every class and every step."""

    keeps_client_state = False

    def __init__(self, tau: float):
        self.tau = tau

    @classmethod
    def build(cls, tau: float, num_classes: int, num_unlabeled: int, kept: dict[str, torch.Tensor]) -> FixedThreshold:
        return cls(tau)

    def thresholds(self) -> float:
        return self.tau

    def update(self, index: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor) -> None:
        pass

    def state(self) -> dict[str, torch.Tensor]:
        return {}


@THRESHOLDS.register("flexmatch")
class FlexMatchThreshold:
    """Class-wise thresholds tau * M(beta_c) from each class's learning status.

    beta_c counts the unlabeled samples whose latest confident prediction (above
    tau) is class c, normalized by the largest count — or, during warm-up, by the
    number of samples not yet confidently predicted at all. M(x) = x / (2 - x) is
    FlexMatch's convex mapping. The per-sample predictions are the client's state,
    kept between rounds, since a client's unlabeled set is its own.
    """

    keeps_client_state = True

    def __init__(self, tau: float, num_classes: int, num_unlabeled: int, selected: torch.Tensor | None = None):
        self.tau = tau
        self.num_classes = num_classes
        if selected is None or len(selected) != num_unlabeled:
            selected = torch.full((num_unlabeled,), UNSELECTED, dtype=torch.long)
        self.selected = selected

    @classmethod
    def build(cls, tau: float, num_classes: int, num_unlabeled: int, kept: dict[str, torch.Tensor]) -> FlexMatchThreshold:
        return cls(tau, num_classes, num_unlabeled, kept.get("flexmatch_selected"))

    def thresholds(self) -> torch.Tensor:
        counts = torch.bincount(self.selected[self.selected >= 0], minlength=self.num_classes).float()
        unused = float((self.selected == UNSELECTED).sum())
        denominator = max(float(counts.max()), unused, 1.0)  # warm-up while most samples are unused
        beta = counts / denominator
        return self.tau * beta / (2.0 - beta)

    def update(self, index: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor) -> None:
        confident = confidence > self.tau
        self.selected[index[confident.cpu()]] = labels[confident].cpu()

    def state(self) -> dict[str, torch.Tensor]:
        return {"flexmatch_selected": self.selected.clone()}
