"""Distribution alignment (Berthelot et al., "ReMixMatch: Semi-Supervised Learning
with Distribution Alignment and Augmentation Anchoring", ICLR 2020)."""

from __future__ import annotations

import torch


def align(probs: torch.Tensor, running_mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scale predictions by target / running mean of predictions, then renormalize:
    pushes the pseudo-label marginal toward the target class distribution."""
    aligned = probs * (target / running_mean.clamp_min(1e-6)).to(probs.device)
    return aligned / aligned.sum(dim=1, keepdim=True)


def update_running_mean(running_mean: torch.Tensor, probs: torch.Tensor, momentum: float = 0.999) -> torch.Tensor:
    return momentum * running_mean + (1 - momentum) * probs.detach().mean(dim=0).to(running_mean.device)
