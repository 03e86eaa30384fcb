"""Accuracy and loss of a model on a set of pooled images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Score:
    correct: int
    loss_sum: float
    count: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")


@torch.inference_mode()
def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> Score:
    """Count correct predictions and sum the cross-entropy over `images`."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        correct += int((logits.argmax(dim=1) == target).sum())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
    model.train(was_training)
    return Score(correct=correct, loss_sum=loss_sum, count=len(labels))
