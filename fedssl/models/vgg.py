"""A VGG-style CNN for matched averaging, registered as the timm model `vgg9_cnn`.

FedMA (Wang et al., "Federated Learning with Matched Averaging", ICLR 2020) trains
"VGG-9" on CIFAR-10: the authors' `ModerateCNN` (github.com/IBM/FedMA, model.py),
six 3x3 convolutions (32, 64 | 128, 128 | 256, 256), a 2x2 max pool after each
pair, and fully connected layers of 512 and 512 units before the classifier. This
is that network without its dropout (FedMA's matching needs no randomness in the
forward pass and the paper's figures do not depend on it), for any input side
of at least 8 and any number of channels. Every layer with weights is a Conv2d or
a Linear and data flows through them in order, so fedssl's FedMA can match it.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["VGG9"]

CHANNELS = (32, 64, 128, 128, 256, 256)


class VGG9(nn.Module):
    """FedMA's VGG-9 (`ModerateCNN`): conv3x3 pairs with max pooling, fc 512, fc 512, classifier.

    Args:
        num_classes: outputs of the classifier.
        in_chans: input channels.
        img_size: input side, at least 8 (three 2x2 poolings, each rounding down).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, hidden_dim: int = 512):
        super().__init__()
        side = img_size if isinstance(img_size, int) else img_size[0]
        if side < 8:
            raise ValueError(f"img_size {img_size}: vgg9_cnn needs a side of at least 8 (three 2x2 poolings)")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, (side, side)
        self.num_features = self.head_hidden_size = hidden_dim
        widths = (in_chans,) + CHANNELS
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in zip(widths, widths[1:]))
        self.fc1 = nn.Linear(CHANNELS[-1] * (side // 2 // 2 // 2) ** 2, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc = nn.Linear(hidden_dim, num_classes)

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, device=self.fc2.weight.device) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for index, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if index % 2:
                x = F.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({"vgg9_cnn": {
    "url": "", "num_classes": 10, "input_size": (3, 32, 32), "fixed_input_size": True, "pool_size": None,
    "interpolation": "bilinear", "crop_pct": 1.0, "mean": (0.5,), "std": (0.5,), "first_conv": "convs.0",
    "classifier": "fc", "paper_name": "Federated Learning with Matched Averaging", "license": "apache-2.0"}})


@register_model
def vgg9_cnn(pretrained: bool = False, **kwargs: Any) -> VGG9:
    """FedMA's VGG-9 (ICLR 2020): six 3x3 convolutions (32-256), fc 512, fc 512, classifier."""
    return build_model_with_cfg(VGG9, "vgg9_cnn", pretrained, **kwargs)
