"""Small models, data and hand-computed gradients shared by the algorithms' tests (the
personalized and meta-learned ones), handed to tests as the `kit` fixture (tests are
imported with --import-mode=importlib, so they cannot import a helper module by name)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedssl.config.schema import RecipeConfig
from fedssl.inprocess.trainer import Augmentations, ClientTrainer
from fedssl.data.tensors import TensorPool
from fedssl.learners.base import FederatedLearner


class TinyNet(nn.Module):
    """A body (Linear, optional BatchNorm, ReLU) and a classifier `fc`, with timm's
    `get_classifier`, so that head/body splits and FedBN find their layers."""

    def __init__(self, features: int = 3, hidden: int = 4, num_classes: int = 3, batch_norm: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Linear(features, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batch_norm else nn.Identity()
        self.fc = nn.Linear(hidden, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.body(x))))


def vector_pool(x: torch.Tensor, y: torch.Tensor) -> TensorPool:
    """Feature vectors as a client's "images" (no augmentation ever reads `raw`)."""
    return TensorPool(images=x, labels=y, raw=np.zeros((len(y), 1, 1, 1), dtype=np.uint8))


def vector_trainer(learner: FederatedLearner, x: torch.Tensor, y: torch.Tensor, cfg: RecipeConfig,
                   shared: list[str]) -> ClientTrainer:
    """The loop's own ClientTrainer over a pool of feature vectors."""
    return ClientTrainer(learner, vector_pool(x, y), cfg.train, cfg.algorithm.ssl, shared, cfg.seed,
                         Augmentations(labeled=None, weak=None, strong=None))


def softmax_regression_grads(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Gradients of the mean cross-entropy of logits x w^T + b, by hand:
    dL/dz = (softmax(z) - onehot(y)) / N."""
    p = torch.softmax(x @ w.T + b, dim=1)
    residual = (p - nn.functional.one_hot(y, w.shape[0]).to(p.dtype)) / len(y)
    return residual.T @ x, residual.sum(0)


def softmax_regression_hvp(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, vw: torch.Tensor, vb: torch.Tensor):
    """The Hessian of the mean cross-entropy (with respect to w and b) times (vw, vb),
    by hand: the logits' Hessian is diag(p) - p p^T, and dz = vw x + vb."""
    p = torch.softmax(x @ w.T + b, dim=1)
    dz = x @ vw.T + vb
    s = (p * dz - p * (p * dz).sum(1, keepdim=True)) / len(x)
    return s.T @ x, s.sum(0)


@pytest.fixture
def kit() -> SimpleNamespace:
    return SimpleNamespace(TinyNet=TinyNet, vector_trainer=vector_trainer, grads=softmax_regression_grads,
                           hvp=softmax_regression_hvp)
