"""Linear evaluation: a logistic-regression probe on frozen features.

The standard measure of a self-supervised representation (SimCLR, BYOL, and in
federated SSL FedU and FedEMA): train a linear classifier on the frozen features
of labeled images and report its accuracy on held-out images. Full-batch gradient
descent from zero weights on a convex loss, so the result depends on the features
alone (no random draw).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled by the training features' mean and spread (a feature that is
    constant on the training set becomes 0), so one learning rate fits any backbone."""
    mean, std = train.mean(dim=0), train.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


@torch.enable_grad()
def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, steps: int = 300, lr: float = 0.1,
                 weight_decay: float = 1e-4) -> float:
    """Accuracy on (`test_features`, `test_labels`) of multinomial logistic regression
    fitted on (`train_features`, `train_labels`); NaN when either set is empty."""
    if not len(train_labels) or not len(test_labels):
        return float("nan")
    train, test = standardize(train_features.detach().float(), test_features.detach().float())
    weight = torch.zeros(train.shape[1], num_classes, device=train.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=train.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(train @ weight + bias, train_labels).backward()
        optimizer.step()
    with torch.no_grad():
        return float(((test @ weight + bias).argmax(dim=1) == test_labels).float().mean())
