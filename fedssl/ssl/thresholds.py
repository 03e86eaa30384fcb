"""Confidence thresholds for pseudo-labels: fixed (FixMatch) or class-wise adaptive
(Zhang et al., "FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo
Labeling", NeurIPS 2021)."""

from __future__ import annotations

import torch

UNSELECTED = -1


class FixedThreshold:
    """The same threshold `tau` for every class and every step."""

    def __init__(self, tau: float):
        self.tau = tau

    def thresholds(self) -> float:
        return self.tau

    def update(self, index: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor) -> None:
        pass

    def state(self) -> dict[str, torch.Tensor]:
        return {}


class FlexMatchThreshold:
    """Class-wise thresholds tau * M(beta_c) from each class's learning status.

    beta_c counts the unlabeled samples whose latest confident prediction (above
    tau) is class c, normalized by the largest count — or, during warm-up, by the
    number of samples not yet confidently predicted at all. M(x) = x / (2 - x) is
    FlexMatch's convex mapping. The per-sample predictions are the client's state,
    kept between rounds, since a client's unlabeled set is its own.
    """

    def __init__(self, tau: float, num_classes: int, num_unlabeled: int, selected: torch.Tensor | None = None):
        self.tau = tau
        self.num_classes = num_classes
        if selected is None or len(selected) != num_unlabeled:
            selected = torch.full((num_unlabeled,), UNSELECTED, dtype=torch.long)
        self.selected = selected

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
