"""Semi-supervised FedAvg: FixMatch clients (FedAvg/FedProx-FixMatch) and SemiFL."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from fedssl.algorithms.capabilities import Capabilities
from fedssl.config.schema import RecipeConfig
from fedssl.errors import UserError
from fedssl.algorithms.base import ALGORITHMS, SMOKE_FEW_LABELS_PER_CLIENT
from fedssl.algorithms.fedavg import FedAvg
from fedssl.learners.fixmatch import FixMatchLearner
from fedssl.ssl.thresholds import THRESHOLDS


@ALGORITHMS.register("fixmatch")
class FixMatch(FedAvg):
    """FedAvg whose clients learn with FixMatch (Sohn et al., NeurIPS 2020) from their
    labeled and unlabeled data: the FedAvg-FixMatch baseline of FedMatch (Jeong et al.,
    ICLR 2021); with `algorithm.proximal_mu > 0`, FedProx-FixMatch. With labels at the
    server (`data.labels.server_per_class`, `algorithm.ssl.server_steps`), the server
    fine-tunes the global model on them before each broadcast."""

    teacher = "local"
    smoke = SMOKE_FEW_LABELS_PER_CLIENT

    @property
    def capabilities(self) -> Capabilities:
        ssl = self.cfg.algorithm.ssl  # e.g. FlexMatch's learning status, distribution alignment's running mean
        keeps = THRESHOLDS.get(ssl.threshold, key="algorithm.ssl.threshold").keeps_client_state or ssl.distribution_alignment
        return replace(FedAvg.capabilities, keeps_client_state=keeps)

    def make_learner(self, model: nn.Module) -> FixMatchLearner:
        algo = self.cfg.algorithm
        return FixMatchLearner(model, self.cfg.train, algo.ssl, model.num_classes, algo.proximal_mu, teacher=self.teacher)


@ALGORITHMS.register("semifl")
class SemiFL(FixMatch):
    """SemiFL (Diao et al., "SemiFL: Semi-Supervised Federated Learning for Unlabeled
    Clients with Alternate Training", NeurIPS 2022), without its mixup: the server
    fine-tunes the global model on its labeled data, clients pseudo-label with the
    global model they received (a fixed teacher) and train on the confident ones;
    the server averages."""

    teacher = "global"
    # every client unlabeled, the server with 3 labels per class and a few steps on them, which it refuses to go without
    smoke = ("data.labels.mode=server", "data.labels.server_per_class=3", "algorithm.ssl.server_steps=3",
             "algorithm.ssl.unlabeled_ratio=2")

    def __init__(self, cfg: RecipeConfig):
        if cfg.algorithm.ssl.server_steps <= 0 or cfg.data.labels.server_per_class <= 0:
            raise UserError("algorithm.ssl.server_steps: semifl needs labels at the server "
                            "(data.labels.server_per_class > 0) and server_steps > 0")
        super().__init__(cfg)
