"""Few-shot evaluation: unseen people and the linear probe.

Unseen people (`federation.evaluation.holdout_clients`): whole clients that never train. At
evaluation each adapts from the global model with its own labeled images (the
algorithm's `unseen_weights`: by default the classifier fine-tuned on them,
`fine_tune_head`) and is scored on the rest of its data (its unlabeled images and
its local test split). `unseen_acc` is the mean over held-out clients, beside
`unseen_global_acc`, the global model on the same images before adapting. It answers
what a practitioner asks before deploying to a new person: how well does the model
do for someone it never saw, given a few of their labeled images.

The linear probe (`federation.evaluation.linear_probe`): `linear_acc`, a logistic regression on
the global model's frozen features (`features`) of the training clients' labeled
split, scored on the server's test set, the linear evaluation of FedU (Zhuang et
al., ICCV 2021) and FedEMA (Zhuang et al., ICLR 2022). With `data.labels.per_class`
= k the labeled split is k images per class per client, so it is a k-shot probe.
It reads the pooled labeled split where the run's data lives (the server process of
a simulation): a research metric, off by default.
"""

from __future__ import annotations

from typing import Any, Collection, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedssl.algorithms.base import LabeledBatch
from fedssl.messages import Arrays
from fedssl.models.split import head_parameter_names
from fedssl.ssl.probe import linear_probe


def scored_indices(labeled: np.ndarray, unlabeled: np.ndarray, test: np.ndarray, held_out: bool) -> np.ndarray:
    """What a client is scored on: its local test split, or for a held-out client
    everything but the labeled images it adapts with."""
    return np.sort(np.concatenate([unlabeled, test])) if held_out else test


def fine_tune_head(model: nn.Module, weights: Arrays, batches: Iterable[LabeledBatch], lr: float) -> Arrays:
    """`weights` with the classifier trained by one SGD step of cross-entropy per
    batch, the body frozen and in eval mode (its features are fixed, as in linear
    evaluation). `model` is left holding the result."""
    model.load_state_dict(weights, strict=False)
    head = set(head_parameter_names(model))
    params = [p for n, p in model.named_parameters() if n in head]
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in head)
        optimizer = torch.optim.SGD(params, lr=lr)
        with torch.enable_grad():
            for x, y in batches:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
        model.train(was_training)
    return weights | {n: v.detach().clone() for n, v in model.state_dict().items() if n in weights}


@torch.inference_mode()
def features(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's pre-logits features (timm's `forward_head(pre_logits=True)`), in eval mode."""
    was_training = model.training
    model.eval()
    out = [model.forward_head(model.forward_features(images[s : s + batch_size]), pre_logits=True)
           for s in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else images.new_zeros((0, 0))


def linear_acc(model: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
               test_labels: torch.Tensor, num_classes: int) -> float:
    """The linear probe's accuracy on the test images, fitted on the training images' features."""
    return linear_probe(features(model, train_images), train_labels, features(model, test_images), test_labels,
                        num_classes)


def unseen_metrics(rows: Sequence[dict[str, Any]], held_out: Collection[int]) -> dict[str, float]:
    """`unseen_acc` (mean over held-out clients of their adapted model's accuracy on
    the rest of their data) and `unseen_global_acc` (the global model's, before
    adapting), from their evaluation rows; nothing without held-out clients."""
    if not held_out:
        return {}
    unseen = [row for row in rows if row["client"] in held_out and row["test_samples"]]
    mean = lambda key: float(np.mean([row[key] for row in unseen])) if unseen else float("nan")
    return {"unseen_acc": mean("personal_acc"), "unseen_global_acc": mean("acc")}
