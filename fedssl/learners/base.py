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


def batch_size(batch: Batch) -> int:
    """Images in a batch's first part (labeled, else unlabeled), for `self.log`: a
    Trainer cannot tell which of a dict's tensors holds the batch."""
    part = batch.get("x", batch.get("u_weak"))
    return 0 if part is None else len(part)


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

    As under a Lightning Trainer (which can fit one client through
    `fedssl.inprocess.client_data.ClientDataModule`): `batch_idx` counts the
    batches of the current local epoch; `training_step` runs under the precision's
    autocast; `self.log` works (the loop sends the round's mean of each logged
    value up with the update); `configure_optimizers` may return Lightning's dict
    with an "lr_scheduler", whose schedule spans one client's round, since the
    optimizer is made anew for every client.
    """

    uses_unlabeled = False
    _log_owner: FederatedLearner | None = None  # see `logs_through`
    _log_prefix = ""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def logs_through(self, owner: FederatedLearner, prefix: str = "") -> None:
        """Send this learner's `self.log` calls to `owner`, the learner that wraps it
        (FedPer's, Ditto's), under `prefix` + name: a Trainer drives only the
        outermost module, and refuses a log call from any other."""
        object.__setattr__(self, "_log_owner", owner)  # a plain reference: nn.Module would make it a submodule
        object.__setattr__(self, "_log_prefix", prefix)

    def log(self, name: str, value, *args, **kwargs) -> None:
        if self._log_owner is not None:
            return self._log_owner.log(self._log_prefix + name, value, *args, **kwargs)
        return super().log(name, value, *args, **kwargs)

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

    def inputs(self, payload: Payload) -> tuple[bool, bool]:
        """Whether this round trains on the client's labels and on its unlabeled
        images. Without labels, the labeled images count as unlabeled and their labels
        stay in the loop (a self-supervised round); without unlabeled images, the
        round is cut from the labeled ones alone."""
        return True, self.uses_unlabeled

    def round_steps(self, steps: int) -> int:
        """How many steps to run this round, given the recipe's budget `steps`
        (called after `start_round`; FedRep adds its head-only phase)."""
        return steps

    def end_round(self) -> dict[str, torch.Tensor]:
        """What this client keeps until its next round (personal state)."""
        return {}
