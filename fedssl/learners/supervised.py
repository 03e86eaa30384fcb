"""The supervised local learner: cross-entropy on a client's labeled batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.choices import OPTIMIZERS
from fedssl.config.schema import TrainConfig
from fedssl.learners.base import Batch, ClientContext, FederatedLearner, batch_size
from fedssl.messages import Payload


OPTIMIZERS.register("sgd")(lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                                                 weight_decay=cfg.weight_decay))
OPTIMIZERS.register("adam")(lambda params, cfg: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
OPTIMIZERS.register("adamw")(lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The client optimizer `train.optimizer` names (one of `OPTIMIZERS`)."""
    return OPTIMIZERS.get(cfg.optimizer, key="train.optimizer")(params, cfg)


class SupervisedLearner(FederatedLearner):
    """Cross-entropy on labeled batches, with FedProx's proximal term when mu > 0.

    FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020)
    adds mu/2 * ||w - w_global||^2 to each client's loss; as in Flower, the term lives
    here on the client and the server only chooses mu.
    """

    def __init__(self, model: nn.Module, train_cfg: TrainConfig, proximal_mu: float = 0.0):
        super().__init__(model)
        self.train_cfg = train_cfg
        self.proximal_mu = proximal_mu
        self.global_params: dict[str, torch.Tensor] = {}

    def start_round(self, payload: Payload, context: ClientContext) -> None:
        """Remember the round's global weights (by reference) for the proximal term."""
        if self.proximal_mu > 0:
            self.global_params = {n: payload.arrays[n] for n, _ in self.model.named_parameters() if n in payload.arrays}

    def proximal_term(self) -> torch.Tensor:
        squared = [
            (param - self.global_params[name]).pow(2).sum()
            for name, param in self.model.named_parameters()
            if name in self.global_params
        ]
        return 0.5 * self.proximal_mu * torch.stack(squared).sum()

    def supervised_loss(self, batch: Batch) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        if self.proximal_mu > 0 and self.global_params:
            loss = loss + self.proximal_term()
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.supervised_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size(batch))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model.parameters(), self.train_cfg)
