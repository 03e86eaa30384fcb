"""The Per-FedAvg client: a MAML step on every mini-batch, on torch.func."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from fedssl.config.schema import TrainConfig
from fedssl.learners.base import Batch
from fedssl.learners.maml import MAML, FunctionalLearner, Params, cross_entropy
from fedssl.learners.supervised import SupervisedLearner


class MetaConfig(Protocol):
    """What the learner reads of `algorithm.meta` (`fedssl.algorithms.meta.MetaConfig`)."""

    variant: str  # fo | hf
    inner_lr: float  # alpha
    hf_delta: float  # hf: the finite-difference step of the Hessian-vector product


def perfedavg_gradient(learner: FunctionalLearner, inner: tuple, outer: tuple, hessian: tuple | None,
                       delta: float | None = None) -> tuple[Params, torch.Tensor]:
    """Per-FedAvg's stochastic meta-gradient at the learner's weights w, and the outer loss.

    First-order (`hessian` None): grad f_{D'}(w - alpha grad f_D(w)), the MAML gradient
    with the Hessian term dropped. Hessian-free: that gradient g minus
    alpha * H_{D''}(w) g, the Hessian-vector product on a third batch D'' estimated
    by a finite difference with `delta` (exact with `delta` None). alpha is the
    learner's lr. (Fallah et al. 2020, Sec. 4, eq. (8) and (10).)
    """
    adapted = learner.clone().adapt(cross_entropy(*inner))
    gradient, loss_value = adapted.grad_and_value(cross_entropy(*outer))
    if hessian is None:
        return gradient, loss_value
    correction = learner.hvp(cross_entropy(*hessian), gradient, delta)
    return {n: g - learner.lr * correction[n] for n, g in gradient.items()}, loss_value


def split_batch(x: torch.Tensor, y: torch.Tensor, parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch cut into `parts` disjoint batches; the whole batch in every role when
    it is too small to cut (a client's last, short batch)."""
    if len(x) < parts:
        return [(x, y)] * parts
    return list(zip(x.tensor_split(parts), y.tensor_split(parts)))


class PerFedAvgLearner(SupervisedLearner):
    """Per-FedAvg (Fallah, Mokhtari and Ozdaglar, "Personalized Federated Learning with
    Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020).

    Each local step cuts its mini-batch into D and D' (and D'' for the Hessian-free
    variant), as PFLlib does with a double-sized batch, and moves the weights by
    -beta times the meta-gradient of `perfedavg_gradient`; beta is `train.lr`, the
    optimizer's step, and alpha is `algorithm.meta.inner_lr`. The meta-gradient is
    computed functionally; the loop's optimizer applies it through a surrogate loss
    whose gradient it is, so momentum or weight decay apply as usual.
    """

    def __init__(self, model: nn.Module, train_cfg: TrainConfig, meta_cfg: MetaConfig):
        super().__init__(model, train_cfg)
        self.meta_cfg = meta_cfg
        self.maml = MAML(model, meta_cfg.inner_lr)

    @property
    def hessian_free(self) -> bool:
        return self.meta_cfg.variant == "hf"

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        parts = split_batch(batch["x"], batch["y"], 3 if self.hessian_free else 2)
        hessian = parts[2] if self.hessian_free else None
        gradient, loss = perfedavg_gradient(self.maml.clone(), parts[0], parts[1], hessian,
                                            self.meta_cfg.hf_delta if self.hessian_free else None)
        # <w, g> has gradient g with respect to w: backward() then leaves the
        # meta-gradient in .grad. Adding loss - <w, g>.detach() makes the value the
        # outer loss, so train_loss stays meaningful.
        surrogate = sum((p * gradient[n]).sum() for n, p in self.model.named_parameters())
        return loss + surrogate - surrogate.detach()
