"""Confidence-masked pseudo-labels (Sohn et al., "FixMatch: Simplifying
Semi-Supervised Learning with Consistency and Confidence", NeurIPS 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pseudo_labels(probs: torch.Tensor, thresholds: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The arg-max class of each row of `probs`, its confidence, and the mask of rows
    whose confidence reaches the threshold (a scalar, or one threshold per class)."""
    confidence, labels = probs.max(dim=1)
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.to(probs.device)[labels]
    return labels, confidence, confidence >= thresholds


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked rows, averaged over all rows, as FixMatch does
    (so that few confident pseudo-labels mean a small loss, not a noisy one)."""
    if len(labels) == 0:
        return logits.sum() * 0.0
    return (F.cross_entropy(logits, labels, reduction="none") * mask.float()).mean()
