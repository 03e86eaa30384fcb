"""FedMatch's client learner (Jeong et al., "Federated Semi-Supervised Learning with
Inter-Client Consistency & Disjoint Learning", ICLR 2021, arXiv:2006.12097).

Every floating parameter of the model is decomposed as theta = sigma + psi: sigma
learns from labeled data only, psi from unlabeled data only, so that learning from
unlabeled data cannot overwrite what the labels taught (the paper's "disjoint
learning"). Buffers (BatchNorm statistics) are not decomposed. With x a labeled
image, u an unlabeled one with weak view w(u) and strong view s(u), `*` a detached
(frozen) term, and h_1..h_H the frozen helper models the server sent:

    L   = L_s + L_u
    L_s = lambda_s * CE(y, p_{sigma + psi*}(x))
    L_u = lambda_iccs * Phi_{sigma* + psi} + lambda_l2 * ||sigma* - psi||_2^2 + lambda_l1 * ||psi||_1
    Phi = 1/|M| sum_{u in M} [ CE(yhat(u), p_theta(s(u)))
                               + 1/H sum_j KL(p_{h_j}(w(u)) || p_theta(w(u))) ]
    M   = {u : max_c p_theta(c | w(u)) >= tau}         (the local model is confident)
    yhat(u) = argmax_c [ 1(c = argmax p_theta(w(u))) + sum_j 1(c = argmax p_{h_j}(w(u))) ]

The objective is the paper's; the reductions follow the authors' code
(github.com/wyjeong/FedMatch): both parts of Phi are restricted to and averaged
over the confident images M (the paper writes the KL over all u), and the norms are
sums over every entry. Where the paper and code differ we also take: one weight
lambda_iccs for both parts of Phi (the paper; the code has lambda_i and lambda_a,
both 1e-2); the weak view for the local confidence and the helpers (the code uses
the un-augmented image, which the framework does not hand out); vote ties go to
the tied class the local model finds most probable (the code: the lowest class
index). With no helpers (before any client has reported) the KL is 0 and yhat is
the local arg-max. Note the L2 term: its gradient on psi is 2 lambda_l2 (psi -
sigma) per entry, so plain SGD diverges on it unless lr * lambda_l2 < 1; the
paper's defaults assume the authors' lr of 1e-3.

psi starts at zero (the code: 0.2 sigma), so the initial model theta = sigma is the
architecture's own initialization, the same starting point as every other
algorithm, and L1 starts at its minimum.

The learner uploads sparse deltas: for sigma and psi, only entries whose change
from the received value exceeds `sparsity`, as "<name>/index" (int32 flat indices)
and "<name>/value" (float32 deltas); `decode_delta` is the server's inverse. An
array whose delta would take more bytes than the array itself is sent dense.
"""

from __future__ import annotations

import re
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedssl.config.schema import TrainConfig
from fedssl.learners.base import Batch, ClientContext, FederatedLearner, batch_size
from fedssl.messages import Arrays, Payload
from fedssl.learners.supervised import build_optimizer


class FedMatchConfig(Protocol):
    """What the learner reads of `algorithm.fedmatch` (`fedssl.algorithms.fedmatch.FedMatchConfig`)."""

    lambda_s: float  # the labeled loss on sigma
    lambda_iccs: float  # the inter-client consistency
    lambda_l1: float  # L1 sparsity of psi
    lambda_l2: float  # L2 tie of psi to the frozen sigma
    tau: float  # the agreement-based pseudo-labels' confidence threshold
    sparsity: float  # delta entries below this are not sent

SIGMA, PSI = "sigma/", "psi/"
HELPER = re.compile(r"helper(\d+)/(.+)")


def encode_delta(new: torch.Tensor, received: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of `new - received` with |delta| > threshold: int32 flat indices,
    in increasing order (as the server requires), and float32 values."""
    delta = (new.detach() - received).flatten()
    index = (delta.abs() > threshold).nonzero().flatten()
    return index.to(torch.int32), delta[index].to(torch.float32)


def encode_update(new: torch.Tensor, received: torch.Tensor, threshold: float, name: str) -> Arrays:
    """What a client sends for one trained array: its sparse delta (`encode_delta`,
    as "<name>/index" + "<name>/value") where that is smaller than the array sent
    dense, else the new array itself under its own name. An index and a value take
    8 bytes an entry, so a sparse delta only pays below half the float32 entries."""
    index, value = encode_delta(new, received, threshold)
    if index.numel() * (index.element_size() + value.element_size()) < new.numel() * new.element_size():
        return {f"{name}/index": index, f"{name}/value": value}
    return {name: new.detach().clone()}


def decode_delta(received: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`received` with the sparse delta added; entries not sent keep their value."""
    flat = received.flatten().clone()
    flat.index_add_(0, index.long(), value.to(flat.dtype))
    return flat.view_as(received)


def agreement_labels(local: torch.Tensor, helpers: list[torch.Tensor]) -> torch.Tensor:
    """Agreement-based pseudo-labels: the class most of the local model and the
    helpers vote for (their arg-max classes of the probabilities given); a tie goes
    to the tied class the local model finds most probable."""
    num_classes = local.shape[1]
    votes = F.one_hot(local.argmax(1), num_classes).to(local.dtype)
    for probs in helpers:
        votes = votes + F.one_hot(probs.argmax(1), num_classes).to(local.dtype)
    # Votes are whole numbers and 0.5 * p < 1, so the bonus only orders tied classes.
    return (votes + 0.5 * local).argmax(1)


class FedMatchLearner(FederatedLearner):
    """A model trained as sigma + psi (see the module docstring for the loss).

    The round's payload config says what to train: {"role": "server"} trains sigma on
    the server's labels and uploads dense arrays; a client trains sigma where it has
    labels (unless "train_sigma" is false, labels-at-server) and psi where it has
    unlabeled data, and uploads sparse deltas of only what it trained.
    """

    uses_unlabeled = True

    def __init__(self, model: nn.Module, train_cfg: TrainConfig, cfg: FedMatchConfig):
        super().__init__(model)
        self.train_cfg, self.cfg = train_cfg, cfg
        params = dict(model.named_parameters())
        self.names = [n for n, p in params.items() if p.is_floating_point()]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.plain_names = [n for n in model.state_dict() if n not in self.index]  # buffers travel as they are
        self.sigma = nn.ParameterList([nn.Parameter(params[n].detach().clone()) for n in self.names])
        self.psi = nn.ParameterList([nn.Parameter(torch.zeros_like(params[n])) for n in self.names])
        model.requires_grad_(False)  # the model's own weights only mirror sigma + psi
        self.received: Arrays | None = None
        self.helpers: list[Arrays] = []
        self.train_sigma = self.train_psi = True
        self.dense_upload = True

    def _apply(self, fn, recurse=True):
        # The helpers are frozen models that travel with the learner: they follow its
        # device, dtype and memory layout (channels-last steps, train.memory_format).
        self.helpers = [{name: fn(value) for name, value in helper.items()} for helper in self.helpers]
        return super()._apply(fn, recurse)

    def shared_names(self) -> list[str]:
        return [SIGMA + n for n in self.names] + [PSI + n for n in self.names] + self.plain_names

    def composed(self, freeze_sigma: bool = False, freeze_psi: bool = False) -> dict[str, torch.Tensor]:
        """theta = sigma + psi, with either part cut from the graph."""
        return {n: (s.detach() if freeze_sigma else s) + (p.detach() if freeze_psi else p)
                for n, s, p in zip(self.names, self.sigma, self.psi)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.composed(), (x,))

    def sync_model(self) -> None:
        """Write sigma + psi into the model's own weights, for evaluation and export."""
        views = self.model.state_dict()
        with torch.no_grad():
            for name, value in self.composed().items():
                views[name].copy_(value)

    def load_arrays(self, arrays: Arrays) -> None:
        """Load "sigma/..." and "psi/..." arrays, buffers, or a plain model's weights
        (state_dict names), which load as sigma with psi = 0."""
        views = self.model.state_dict()
        with torch.no_grad():
            for name, value in arrays.items():
                if name.startswith(SIGMA):
                    self.sigma[self.index[name[len(SIGMA):]]].copy_(value)
                elif name.startswith(PSI):
                    self.psi[self.index[name[len(PSI):]]].copy_(value)
                elif name in self.index:
                    self.sigma[self.index[name]].copy_(value)
                    self.psi[self.index[name]].zero_()
                else:
                    views[name].copy_(value)
        self.sync_model()

    def start_round(self, payload: Payload, context: ClientContext) -> None:
        role = payload.config.get("role", "client")
        self.dense_upload = role == "server"
        self.train_sigma = context.num_labeled > 0 and bool(payload.config.get("train_sigma", True))
        self.train_psi = role != "server" and context.num_unlabeled > 0
        self.received = {SIGMA + n: s.detach().clone() for n, s in zip(self.names, self.sigma)}
        self.received |= {PSI + n: p.detach().clone() for n, p in zip(self.names, self.psi)}
        helpers: dict[int, Arrays] = {}
        for key, value in payload.extras.items():
            match = HELPER.fullmatch(key)
            if match:
                helpers.setdefault(int(match[1]), {})[match[2]] = value
        self.helpers = [helpers[j] for j in sorted(helpers)]

    def end_round(self) -> dict[str, torch.Tensor]:
        self.received, self.helpers = None, []
        self.sync_model()
        return {}

    def labeled_loss(self, batch: Batch) -> torch.Tensor:
        """L_s: only sigma learns from labels."""
        logits = functional_call(self.model, self.composed(freeze_psi=True), (batch["x"],))
        return self.cfg.lambda_s * F.cross_entropy(logits, batch["y"])

    def helper_log_probs(self, images: torch.Tensor) -> list[torch.Tensor]:
        if not self.helpers:
            return []
        was_training = self.model.training
        self.model.eval()  # helpers are frozen models: their own BatchNorm statistics, never updated
        with torch.no_grad():
            out = [functional_call(self.model, helper, (images,)).log_softmax(1) for helper in self.helpers]
        self.model.train(was_training)
        return out

    def unlabeled_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L_u, the pseudo-labels and their confidence mask: only psi learns here."""
        cfg = self.cfg
        weak = batch["u_weak"]
        logits = functional_call(self.model, self.composed(freeze_sigma=True), (torch.cat([weak, batch["u_strong"]]),))
        weak_logits, strong_logits = logits.chunk(2)
        log_local = weak_logits.log_softmax(1)
        local = log_local.detach().exp()
        mask = local.max(1).values >= cfg.tau
        helpers = self.helper_log_probs(weak)
        labels = agreement_labels(local, [h.exp() for h in helpers])
        weight = mask.to(logits.dtype) / mask.sum().clamp(min=1)  # the mean over confident images
        phi = (F.cross_entropy(strong_logits, labels, reduction="none") * weight).sum()
        for log_helper in helpers:
            kl = (log_helper.exp() * (log_helper - log_local)).sum(1)  # KL(helper || local), per image
            phi = phi + (kl * weight).sum() / len(helpers)
        regular = sum(cfg.lambda_l2 * (s.detach() - p).pow(2).sum() + cfg.lambda_l1 * p.abs().sum()
                      for s, p in zip(self.sigma, self.psi))
        return cfg.lambda_iccs * phi + regular, labels, mask

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        loss = self.labeled_loss(batch) if self.train_sigma and "x" in batch else None
        if self.train_psi and "u_weak" in batch:
            unlabeled, labels, mask = self.unlabeled_loss(batch)
            loss = unlabeled if loss is None else loss + unlabeled
            out = {"pseudo_labels": labels, "mask": mask}
        if loss is None:  # nothing this learner may learn from this batch: a zero backward accepts
            loss = sum(s.sum() for s in self.sigma) * 0.0
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size(batch))
        return {"loss": loss, **out}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer([*self.sigma, *self.psi], self.train_cfg)

    def arrays(self, names: list[str]) -> Arrays:
        """Dense copies before any round and on the server; after a client's round,
        the parts it trained as sparse deltas or dense, whichever is smaller
        (`encode_update`; the parts it did not train are left out)."""
        self.sync_model()
        views = self.model.state_dict()
        parts = {SIGMA + n: s for n, s in zip(self.names, self.sigma)} | {PSI + n: p for n, p in zip(self.names, self.psi)}
        out: Arrays = {}
        for name in names:
            if name not in parts:
                out[name] = views[name].detach().clone()
            elif self.received is None or self.dense_upload:
                out[name] = parts[name].detach().clone()
            elif self.train_sigma if name.startswith(SIGMA) else self.train_psi:
                out |= encode_update(parts[name], self.received[name], self.cfg.sparsity, name)
        return out
