"""Accuracy, loss and the confusion matrix of a model on a set of pooled images."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedssl.evaluation.class_metrics import confusion_counts, f1_macro


@dataclass(frozen=True)
class Score:
    correct: int
    loss_sum: float
    count: int
    # [true, predicted] counts, from the same predictions as `correct` (macro-F1, per-class recall)
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64), compare=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")

    @property
    def f1_macro(self) -> float:
        return f1_macro(self.confusion) if self.count else float("nan")


@torch.inference_mode()
def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> Score:
    """Count correct predictions, sum the cross-entropy and count (true, predicted)
    pairs over `images`."""
    was_training = model.training
    model.eval()
    correct, loss_sum, confusion = 0, 0.0, None
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        predicted = logits.argmax(dim=1)
        correct += int((predicted == target).sum())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        counts = confusion_counts(predicted, target, logits.shape[1])
        confusion = counts if confusion is None else confusion + counts
    model.train(was_training)
    if confusion is None:
        confusion = np.zeros((0, 0), dtype=np.int64)
    return Score(correct=correct, loss_sum=loss_sum, count=len(labels), confusion=confusion)
