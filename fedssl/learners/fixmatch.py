"""The pseudo-labeling local learner (FixMatch, with swappable thresholds)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedssl.config.schema import SSLConfig, TrainConfig
from fedssl.learners.base import Batch, ClientContext, batch_size
from fedssl.messages import Payload
from fedssl.learners.supervised import SupervisedLearner
from fedssl.ssl.alignment import align, update_running_mean
from fedssl.ssl.pseudo_labels import masked_cross_entropy, pseudo_labels
from fedssl.ssl.thresholds import THRESHOLDS, FixedThreshold, ThresholdRule

class FixMatchLearner(SupervisedLearner):
    """FixMatch (Sohn et al., NeurIPS 2020) on a client: cross-entropy on labeled
    images, plus lambda_u times the cross-entropy of strongly augmented unlabeled
    images against the pseudo-labels of their weak views, where confident enough.

    Works on clients with labels, without labels, or both. The threshold is a piece
    (fixed, or FlexMatch's class-wise one), distribution alignment is optional, and
    the pseudo-labels come from the model being trained (`teacher="local"`) or, as
    in SemiFL (Diao et al., NeurIPS 2022), from the global model received this
    round, kept fixed (`teacher="global"`).
    """

    uses_unlabeled = True

    def __init__(self, model: nn.Module, train_cfg: TrainConfig, ssl_cfg: SSLConfig, num_classes: int,
                 proximal_mu: float = 0.0, teacher: str = "local"):
        super().__init__(model, train_cfg, proximal_mu)
        self.ssl_cfg = ssl_cfg
        self.num_classes = num_classes
        self.teacher_kind = teacher
        self.teacher: nn.Module | None = None
        self.threshold: ThresholdRule = FixedThreshold(ssl_cfg.tau)
        self.running_mean = torch.full((num_classes,), 1.0 / num_classes)
        # With buffers (BatchNorm), the weak views share the training forward pass for its
        # batch statistics; without, they only give pseudo-labels, so a pass without
        # gradients suffices and the backward pass spares their rows (a third of a step's
        # arithmetic at mu = 7).
        self.joint_weak_pass = any(True for _ in model.buffers())

    def start_round(self, payload: Payload, context: ClientContext) -> None:
        super().start_round(payload, context)
        rule = THRESHOLDS.get(self.ssl_cfg.threshold, key="algorithm.ssl.threshold")
        self.threshold = rule.build(self.ssl_cfg.tau, self.num_classes, context.num_unlabeled, context.state)
        self.running_mean = context.state.get("da_running_mean", torch.full((self.num_classes,), 1.0 / self.num_classes))
        if self.teacher_kind == "global":
            if self.teacher is None:
                self.teacher = copy.deepcopy(self.model).requires_grad_(False)
            self.teacher.load_state_dict(self.model.state_dict())  # the weights just received
            self.teacher.eval()

    def train(self, mode: bool = True) -> FixMatchLearner:
        """Training mode for the student only: the teacher predicts with its running
        statistics and never updates them."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def end_round(self) -> dict[str, torch.Tensor]:
        kept = self.threshold.state()
        if self.ssl_cfg.distribution_alignment:
            kept["da_running_mean"] = self.running_mean
        return kept

    def weak_probabilities(self, weak_logits: torch.Tensor | None, u_weak: torch.Tensor) -> torch.Tensor:
        """The pseudo-labeling probabilities of the weak views: the teacher's, else the
        student's (`weak_logits` from the training pass, or a pass of its own)."""
        with torch.no_grad():
            if self.teacher is not None:
                logits = self.teacher(u_weak)
            else:
                logits = self(u_weak) if weak_logits is None else weak_logits.detach()
            probs = logits.softmax(dim=1)
            if self.ssl_cfg.distribution_alignment:
                self.running_mean = update_running_mean(self.running_mean, probs)
                # No labels at a client tell its class marginal: align toward uniform.
                probs = align(probs, self.running_mean, torch.full_like(self.running_mean, 1.0 / self.num_classes))
        return probs

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        labeled = "x" in batch
        # One forward pass over labeled, weak and strong images, as FixMatch does
        # (BatchNorm then sees all three in one set of batch statistics); the weak
        # views apart, without gradients, where the model has no batch statistics.
        unlabeled = "u_weak" in batch
        weak = [batch["u_weak"]] if unlabeled and self.joint_weak_pass else []
        parts = ([batch["x"]] if labeled else []) + ([*weak, batch["u_strong"]] if unlabeled else [])
        logits = self(torch.cat(parts))
        loss = logits.new_zeros(())
        if labeled:
            n = len(batch["x"])
            loss = loss + torch.nn.functional.cross_entropy(logits[:n], batch["y"])
            logits = logits[n:]
        if self.proximal_mu > 0 and self.global_params:
            loss = loss + self.proximal_term()
        if not unlabeled:
            self.log("train_loss", loss, prog_bar=True, batch_size=batch_size(batch))
            return {"loss": loss}
        weak_logits, strong_logits = logits.chunk(2) if weak else (None, logits)
        probs = self.weak_probabilities(weak_logits, batch["u_weak"])
        labels, confidence, mask = pseudo_labels(probs, self.threshold.thresholds())
        self.threshold.update(batch["u_index"], labels, confidence)
        loss = loss + self.ssl_cfg.lambda_u * masked_cross_entropy(strong_logits, labels, mask)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size(batch))
        return {"loss": loss, "pseudo_labels": labels, "mask": mask}
