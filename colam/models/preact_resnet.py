"""Pre-activation ResNet for CIFAR.

He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016
(arXiv:1603.05027). The widely used CIFAR variant: 3x3 stem conv with 64 channels (no
max-pool), four stages of pre-activation basic blocks with 64/128/256/512 channels, and
1x1 projection shortcuts where the shape changes. As the paper prescribes, the last unit
is followed by an extra BN-ReLU before pooling (some popular CIFAR codes omit it, which
saves 2x512 BN parameters; both round to the published 11.2M / 21.3M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colam.models.registry import Classifier, kaiming_init, register_model

PAPER = 'He et al. 2016, "Identity Mappings in Deep Residual Networks" (ECCV), arXiv:1603.05027'


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 plus the (possibly projected) input.

    With dropout it is the wide-ResNet block B(3,3) of Zagoruyko & Komodakis 2016.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in the paper's design.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class PreActResNet(Classifier):
    def __init__(self, blocks: list[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, in_planes = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            for j in range(n):
                layers.append(PreActBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)  # the extra activation after the last unit
        self.fc = nn.Linear(512, num_classes)
        kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


@register_model("preact_resnet18", input_size=32, paper=PAPER,
                published_params={10: 11.2e6}, published_precision=0.05e6)
def preact_resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels)


@register_model("preact_resnet34", input_size=32, paper=PAPER,
                published_params={10: 21.3e6}, published_precision=0.05e6)
def preact_resnet34(num_classes: int, in_channels: int = 3) -> nn.Module:
    return PreActResNet([3, 4, 6, 3], num_classes, in_channels)
