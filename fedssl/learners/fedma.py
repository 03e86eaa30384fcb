"""FedMA's client learner: supervised training of the layers a round leaves free,
on a model whose widths follow the weights it is sent."""

from __future__ import annotations

import torch

from fedssl.config.schema import TrainConfig
from fedssl.learners.base import ClientContext
from fedssl.learners.supervised import SupervisedLearner, build_optimizer
from fedssl.messages import Arrays, Payload
from fedssl.models.chain import resize_to


class FedMALearner(SupervisedLearner):
    """Cross-entropy on labeled batches, with FedMA's layer-wise freezing.

    A round's payload carries the layers the client trains in `arrays` and the
    matched layers it must keep fixed in `extras` (Wang et al., ICLR 2020, Alg. 1:
    "freeze layers <= l, retrain the rest"). Frozen layers get no gradient and are
    left out of the optimizer, so they end the round bit-unchanged; the update holds
    only the layers that trained (exactly the payload's `arrays`). Matching widens
    layers, so every load first gives the model the shapes of what it loads: the
    server's evaluation, a resumed run and a Flower node all rebuild the model the
    same way, from the arrays alone.
    """

    def __init__(self, model: torch.nn.Module, train_cfg: TrainConfig):
        super().__init__(model, train_cfg)
        self.sending: list[str] | None = None  # this round's trainable arrays; None outside a round

    def load_arrays(self, arrays: Arrays) -> None:
        resize_to(self.model, arrays)
        super().load_arrays(arrays)

    def start_round(self, payload: Payload, context: ClientContext) -> None:
        self.load_arrays(payload.extras)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name not in payload.extras)
        self.sending = list(payload.arrays)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer([p for p in self.model.parameters() if p.requires_grad], self.train_cfg)

    def arrays(self, names: list[str]) -> Arrays:
        """The named arrays; within a round, only those it trained."""
        if self.sending is not None:
            names = [name for name in names if name in self.sending]
        return super().arrays(names)

    def end_round(self) -> dict[str, torch.Tensor]:
        self.sending = None
        for param in self.model.parameters():
            param.requires_grad_(True)
        return {}
