"""Macro-F1, per-class recall and the confusion matrix, against hand-computed values and torchmetrics."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_f1_score, multiclass_recall

from fedssl.evaluation.class_metrics import (confusion_counts, f1_macro, global_class_metrics, precision_per_class,
                                             recall_per_class)
from fedssl.evaluation.score import score

# 4 classes; class 3 is neither present nor predicted, class 2 is present and never predicted.
TARGETS = torch.tensor([0, 0, 0, 1, 1, 2, 2])
PREDICTED = torch.tensor([0, 0, 1, 1, 1, 0, 1])


def test_macro_f1_and_recall_by_hand():
    confusion = confusion_counts(PREDICTED, TARGETS, 4)
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    # class 0: TP 2, FP 1, FN 1 -> F1 4/6; class 1: TP 2, FP 2, FN 0 -> 4/6; class 2: TP 0 -> 0; class 3 not counted
    assert f1_macro(confusion) == pytest.approx((4 / 6 + 4 / 6 + 0) / 3)
    recall = recall_per_class(confusion)
    assert recall[:3].tolist() == pytest.approx([2 / 3, 1.0, 0.0]) and math.isnan(recall[3])
    precision = precision_per_class(confusion)  # NaN where never predicted
    assert precision[:2].tolist() == pytest.approx([2 / 3, 2 / 4]) and np.isnan(precision[2:]).all()
    metrics = global_class_metrics(confusion, ["angry", "happy", "disgust", "fear"])
    assert metrics["global_f1_macro"] == pytest.approx(4 / 9)
    assert metrics["global_recall/disgust"] == 0.0 and metrics["global_recall/happy"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_and_recall_equal_torchmetrics(seed):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 6, (50,), generator=generator)  # some classes may be absent from either
    predicted = torch.where(torch.rand(50, generator=generator) < 0.5, targets, torch.randint(0, 7, (50,), generator=generator))
    confusion = confusion_counts(predicted, targets, 7)
    assert f1_macro(confusion) == pytest.approx(float(multiclass_f1_score(predicted, targets, 7, average="macro")))
    expected = multiclass_recall(predicted, targets, 7, average="none").numpy()
    recall = recall_per_class(confusion)
    present = confusion.sum(axis=1) > 0
    assert recall[present] == pytest.approx(expected[present]) and np.isnan(recall[~present]).all()


def test_score_counts_the_same_predictions_as_its_accuracy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    images, labels = torch.randn(2500, 3, 2, 2), torch.randint(0, 5, (2500,))
    result = score(model, images, labels, batch_size=1000)  # three batches, summed
    predicted = model(images).argmax(dim=1)
    assert result.confusion.sum() == 2500 and np.trace(result.confusion) == result.correct
    assert result.confusion.tolist() == confusion_counts(predicted, labels, 5).tolist()
    assert result.f1_macro == pytest.approx(float(multiclass_f1_score(predicted, labels, 5, average="macro")))
    assert math.isnan(score(model, images[:0], labels[:0]).f1_macro)
