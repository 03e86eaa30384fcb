"""Class-balanced metrics from a confusion matrix: macro-F1 and per-class recall.

Facial-expression data is imbalanced (FER2013's "disgust" is about 1.5% of its
images), so FER papers report macro-F1 and per-class recall beside accuracy: a
model that never predicts a rare class keeps a high accuracy and loses there.
Everything here is a pure function of the confusion matrix `[true, predicted]`
that evaluation accumulates anyway (`fedssl.evaluation.score.score`), so these
metrics cost no second pass over the test set.

Macro-F1 averages the per-class F1 = 2 TP / (2 TP + FP + FN) over the classes that
occur among the targets or the predictions, as torchmetrics'
`multiclass_f1_score(average="macro")` and scikit-learn's `f1_score(average="macro")`
(with its default labels) both do: a class absent from a small local test split and
never predicted is not counted as a failure.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix


def confusion_counts(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> np.ndarray:
    """The `[true, predicted]` count matrix of one batch (torchmetrics), as int64 numpy."""
    matrix = multiclass_confusion_matrix(predictions, targets, num_classes, validate_args=False)
    return matrix.cpu().numpy().astype(np.int64)


def f1_per_class(confusion: np.ndarray) -> np.ndarray:
    """Each class's F1 (NaN for a class neither present nor predicted)."""
    confusion = np.asarray(confusion, dtype=float)
    tp = np.diag(confusion)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)  # 2 TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def f1_macro(confusion: np.ndarray) -> float:
    """Mean F1 over the classes present among targets or predictions; NaN when empty."""
    scores = f1_per_class(confusion)
    counted = scores[~np.isnan(scores)]
    return float(counted.mean()) if len(counted) else float("nan")


def recall_per_class(confusion: np.ndarray) -> np.ndarray:
    """Each class's recall, TP / (TP + FN); NaN for a class without test samples."""
    confusion = np.asarray(confusion, dtype=float)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.where(support > 0, support, 1), np.nan)


def precision_per_class(confusion: np.ndarray) -> np.ndarray:
    """Each class's precision, TP / (TP + FP); NaN for a class never predicted."""
    return recall_per_class(np.asarray(confusion).T)


def global_class_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """`global_f1_macro` and `global_recall/<class name>` of the global model."""
    recalls = recall_per_class(confusion)
    return {"global_f1_macro": f1_macro(confusion),
            **{f"global_recall/{name}": float(recall) for name, recall in zip(class_names, recalls)}}
