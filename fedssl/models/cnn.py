"""The small CNNs federated-learning papers train, registered as timm models.

`fedavg_cnn` is the "CNN" of McMahan et al., "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017 (arXiv:1602.05629): two 5x5
convolutions (32 and 64 channels), each followed by ReLU and 2x2 max pooling, a
512-unit fully connected ReLU layer and a linear classifier. The layer layout
follows PFLlib's `FedAvgCNN` (unpadded convolutions, so the flattened size depends
on the input side: 28 -> 1024, 32 -> 1600, 48 -> 5184).

`fedavg_cnn_bn` adds a BatchNorm2d after each convolution, the variant FedBN (Li et
al., "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization",
ICLR 2021) keeps local.

Importing this module registers both names with timm, so
`timm.create_model("fedavg_cnn", num_classes=7, in_chans=1, img_size=48)` works like
any timm model. Neither has published weights: `pretrained=True` needs a local
file (`pretrained_cfg_overlay=dict(file=...)`), timm never goes to the network for
them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["FedAvgCNN", "MODEL_NAMES"]

# fedssl's own timm model names, in registration order (filled by `_register`).
MODEL_NAMES: list[str] = []

_PAPER = "Communication-Efficient Learning of Deep Networks from Decentralized Data"


def _side_after_block(side: int) -> int:
    """Spatial side after an unpadded 5x5 convolution and a 2x2 max pool."""
    return (side - 4) // 2


class FedAvgCNN(nn.Module):
    """The 2-conv CNN of McMahan et al. (AISTATS 2017), optionally with BatchNorm.

    Layers: conv1 (5x5, in_chans->32) [bn1] ReLU maxpool2 -> conv2 (5x5, 32->64)
    [bn2] ReLU maxpool2 -> flatten -> fc1 (->512) ReLU -> [dropout] -> fc (->num_classes).

    The timm interface splits it as: `forward_features` returns the 512-d output of
    fc1 (after ReLU), so the classifier "head" is exactly the final Linear `fc`, and
    `forward_head(x, pre_logits=True)` returns the 512-d features unchanged.

    Args:
        num_classes: outputs of the classifier; 0 replaces it by an Identity.
        in_chans: input channels.
        img_size: input side (int) or (height, width); at least 16.
        batch_norm: add BatchNorm2d after each convolution (`fedavg_cnn_bn`).
        drop_rate: dropout before the classifier (0 disables it, as in the paper).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: Union[int, Sequence[int]] = 28,
        batch_norm: bool = False,
        drop_rate: float = 0.0,
        hidden_dim: int = 512,
    ):
        super().__init__()
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        out_h, out_w = _side_after_block(_side_after_block(height)), _side_after_block(_side_after_block(width))
        if out_h < 1 or out_w < 1:
            raise ValueError(f"img_size {img_size} is too small for FedAvgCNN; it needs at least 16x16 inputs")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = (height, width)
        self.drop_rate = drop_rate
        self.batch_norm = batch_norm
        self.flat_features = 64 * out_h * out_w  # 1024 at 28x28, 1600 at 32x32, 5184 at 48x48
        self.num_features = self.head_hidden_size = hidden_dim

        self.conv1 = nn.Conv2d(in_chans, 32, kernel_size=5, padding=0, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(32) if batch_norm else nn.Identity()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=0, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(64) if batch_norm else nn.Identity()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(self.flat_features, hidden_dim)
        self.fc = nn.Linear(hidden_dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        """The final classifier Linear (or its name, 'fc')."""
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A freshly initialized classifier for `num_classes` (0: Identity); `global_pool` is ignored."""
        self.num_classes = num_classes
        ref = self.fc1.weight
        if num_classes > 0:
            self.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        else:
            self.fc = nn.Identity()
        self.fc.train(self.training)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay: the first conv, then the rest of the body."""
        return dict(stem=r"^conv1|^bn1", blocks=r"^conv2|^bn2|^fc1")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError("FedAvgCNN has no gradient checkpointing (it is too small to need it)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> the 512-d ReLU output of fc1, (N, 512)."""
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        x = self.pool2(F.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return F.relu(self.fc1(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, 512) features -> logits; with `pre_logits` the features (after dropout)."""
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # No url/file/hf_hub_id: these models have no published weights, so timm never
    # tries to download anything for them.
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "fixed_input_size": True,  # the flattened size depends on img_size
        "pool_size": None,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "mean": (0.5,),
        "std": (0.5,),
        "first_conv": "conv1",
        "classifier": "fc",
        "paper_name": _PAPER,
        "paper_ids": "arXiv:1602.05629",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "fedavg_cnn": _cfg(),
        "fedavg_cnn_bn": _cfg(
            notes=("FedAvg CNN with BatchNorm2d after each conv (FedBN, Li et al., ICLR 2021)",),
        ),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> FedAvgCNN:
    return build_model_with_cfg(FedAvgCNN, variant, pretrained, **kwargs)


def _register(fn):
    MODEL_NAMES.append(fn.__name__)
    return register_model(fn)


@_register
def fedavg_cnn(pretrained: bool = False, **kwargs: Any) -> FedAvgCNN:
    """McMahan et al. 2017 (AISTATS) "CNN": 2x conv5x5 (32, 64) + maxpool, fc 512, classifier."""
    return _create("fedavg_cnn", pretrained, batch_norm=False, **kwargs)


@_register
def fedavg_cnn_bn(pretrained: bool = False, **kwargs: Any) -> FedAvgCNN:
    """`fedavg_cnn` with BatchNorm2d after each convolution (for FedBN)."""
    return _create("fedavg_cnn_bn", pretrained, batch_norm=True, **kwargs)
