"""What the federation loop asks of a learner, on top of being a LightningModule."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from torch import nn

from fedssl.messages import Arrays, Payload

# A training batch: "x", "y" (labeled images and labels) and, for learners that use
# unlabeled data, "u_weak", "u_strong" (two augmentations of the same unlabeled
# images) and "u_index" (their positions in the client's unlabeled list).
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientContext:
    """Who is training this round, and what it kept from earlier rounds."""

    client_id: int
    num_labeled: int
    num_unlabeled: int
    state: dict[str, torch.Tensor] = field(default_factory=dict)


class FederatedLearner(pl.LightningModule):
    """A LightningModule wrapping `model`, driven one client at a time.

    The loop calls `load_arrays` with the round's weights, `start_round`, then
    `training_step` per batch with the optimizer from `configure_optimizers`, then
    `arrays` for the update and `end_round` for what the client keeps. Subclasses
    override `training_step` and, where they need them, the round hooks.
    `training_step` returns the loss, or a dict with "loss" and, for
    pseudo-labeling learners, "pseudo_labels" and "mask" of the unlabeled batch
    (the loop scores them against labels the learner never sees).
    """

    uses_unlabeled = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def load_arrays(self, arrays: Arrays) -> None:
        """Copy `arrays` (model state_dict names) into the live weights."""
        views = self.model.state_dict()
        with torch.no_grad():
            for name, value in arrays.items():
                views[name].copy_(value)

    def arrays(self, names: list[str]) -> Arrays:
        """Copies of the named weights, to send."""
        views = self.model.state_dict()
        return {name: views[name].detach().clone() for name in names}

    def start_round(self, payload: Payload, context: ClientContext) -> None:
        """Called after the round's weights are loaded, before the first step."""

    def round_steps(self, steps: int) -> int:
        """How many steps to run this round, given the recipe's budget `steps`
        (called after `start_round`; FedRep adds its head-only phase)."""
        return steps

    def end_round(self) -> dict[str, torch.Tensor]:
        """What this client keeps until its next round (personal state)."""
        return {}
