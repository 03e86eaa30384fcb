"""Personalization-layer learners: some arrays, or a whole second model, stay on the client.

Each wraps an ordinary learner (supervised, or FixMatch for semi-supervised
clients) and adds what stays behind. What a client keeps goes into its
state under "personal/<state_dict name>", which the loop stores between rounds and
the algorithm reads back for the client's personalized evaluation.
"""

from __future__ import annotations

import torch

from fedssl.messages import Arrays, Payload
from fedssl.learners.base import Batch, ClientContext, FederatedLearner

PERSONAL = "personal/"  # prefix of a client's personal arrays in its kept state
DITTO_LEARNER = "ditto/"  # prefix of the state of Ditto's personal learner (e.g. its FlexMatch thresholds)


def prefixed(arrays: Arrays, prefix: str) -> Arrays:
    return {prefix + name: value for name, value in arrays.items()}


def unprefixed(state: Arrays, prefix: str) -> Arrays:
    return {name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)}


def personal_arrays(state: Arrays) -> Arrays:
    """The personal arrays a client kept (state_dict names), {} for a first-time client."""
    return unprefixed(state, PERSONAL)


class PersonalLayersLearner(FederatedLearner):
    """The arrays named `personal` stay on the client (FedPer, FedBN); the rest are
    trained by `inner` as usual and sent.

    The payload holds no personal arrays, so each round they are restored from the
    client's state after the shared ones are loaded; a first-time client starts
    them from the model's initialization (`initial`, taken when the learner is built,
    the same weights the global model started from).
    """

    def __init__(self, inner: FederatedLearner, personal: list[str]):
        super().__init__(inner.model)
        self.inner = inner
        inner.logs_through(self)
        self.personal = list(personal)
        self.uses_unlabeled = inner.uses_unlabeled
        self.initial = inner.arrays(self.personal)  # copies: training never changes them

    def start_round(self, payload: Payload, context: ClientContext) -> None:
        self.inner.start_round(payload, context)
        self.load_arrays(personal_arrays(context.state) or self.initial)

    def training_step(self, batch: Batch, batch_idx: int):
        return self.inner.training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.inner.configure_optimizers()

    def end_round(self) -> dict[str, torch.Tensor]:
        return self.inner.end_round() | prefixed(self.arrays(self.personal), PERSONAL)


class FedRepLearner(PersonalLayersLearner):
    """FedRep's alternating update (Collins et al., "Exploiting Shared Representations
    for Personalized Federated Learning", ICML 2021, Algorithm 1): first the personal
    head alone, `head_epochs` epochs with the body frozen; then the body alone,
    the recipe's `train.local_epochs` with the head frozen. Only the body is sent.

    Freezing is `requires_grad`: a frozen array gets no gradient, so the optimizer
    leaves it (and its momentum and weight decay) alone.
    """

    def __init__(self, inner: FederatedLearner, personal: list[str], head_epochs: int, local_epochs: int,
                 local_steps: int):
        super().__init__(inner, personal)
        self.head_epochs, self.local_epochs, self.local_steps = head_epochs, local_epochs, local_steps
        self.head_steps = 0
        self.steps_taken = 0  # this round's; batch_idx restarts at every epoch

    def start_round(self, payload: Payload, context: ClientContext) -> None:
        super().start_round(payload, context)
        self.head_steps = 0  # set by round_steps; an explicit step budget (the server's) trains the body only
        self.steps_taken = 0
        self._train_head(True)

    def round_steps(self, steps: int) -> int:
        """The body's budget `steps` (the recipe's), plus `head_epochs` epochs of the
        same length for the head (an "epoch" is `train.local_steps` steps when set)."""
        per_epoch = steps if self.local_steps > 0 else steps // max(self.local_epochs, 1)
        self.head_steps = self.head_epochs * per_epoch
        return self.head_steps + steps

    def _train_head(self, head: bool) -> None:
        personal = set(self.personal)
        for name, param in self.model.named_parameters():
            param.requires_grad_((name in personal) == head)

    def training_step(self, batch: Batch, batch_idx: int):
        if self.steps_taken == self.head_steps:
            self._train_head(False)
        self.steps_taken += 1
        return self.inner.training_step(batch, batch_idx)

    def end_round(self) -> dict[str, torch.Tensor]:
        for param in self.model.parameters():
            param.requires_grad_(True)
        return super().end_round()


class DittoLearner(FederatedLearner):
    """Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning
    Through Personalization", ICML 2021, Algorithm 1) on a client.

    Two models train on the same batches: the global copy, by `inner` exactly as in
    FedAvg (it is what is sent), and the client's personal model v by `personal`, a
    learner of the same kind whose FedProx-style proximal term lambda/2 ||v - w||^2
    pulls v toward the global weights w received this round (held fixed within the
    round). Their parameters are disjoint, so one backward through the sum of their
    losses gives each its own gradient. A first-time client's personal model starts
    from the global one it receives. The personal model's loss is logged as
    `personal_train_loss` (a round metric); `train_loss` is the global copy's.
    """

    def __init__(self, inner: FederatedLearner, personal: FederatedLearner):
        super().__init__(inner.model)
        self.inner, self.personal = inner, personal
        inner.logs_through(self)
        personal.logs_through(self, prefix="personal_")  # its loss is logged as personal_train_loss
        self.uses_unlabeled = inner.uses_unlabeled

    def start_round(self, payload: Payload, context: ClientContext) -> None:
        own = {k: v for k, v in context.state.items() if not k.startswith((PERSONAL, DITTO_LEARNER))}
        self.inner.start_round(payload, ClientContext(context.client_id, context.num_labeled, context.num_unlabeled, own))
        self.personal.load_arrays(personal_arrays(context.state) or payload.arrays)
        personal_state = unprefixed(context.state, DITTO_LEARNER)
        self.personal.start_round(payload, ClientContext(context.client_id, context.num_labeled,
                                                         context.num_unlabeled, personal_state))

    def training_step(self, batch: Batch, batch_idx: int):
        out = self.inner.training_step(batch, batch_idx)
        personal_out = self.personal.training_step(batch, batch_idx)
        personal_loss = personal_out["loss"] if isinstance(personal_out, dict) else personal_out
        # Backward through both losses; report the global model's (comparable to FedAvg's).
        if isinstance(out, dict):
            return out | {"loss": out["loss"] + personal_loss - personal_loss.detach()}
        return out + personal_loss - personal_loss.detach()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = self.inner.configure_optimizers()
        optimizer.add_param_group({"params": list(self.personal.model.parameters())})
        return optimizer

    def end_round(self) -> dict[str, torch.Tensor]:
        personal_model = {n: v.detach().clone() for n, v in self.personal.model.state_dict().items()}
        return self.inner.end_round() | prefixed(personal_model, PERSONAL) | prefixed(self.personal.end_round(), DITTO_LEARNER)
