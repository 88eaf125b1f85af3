"""Wide Residual Networks for CIFAR.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146).
WRN-d-k: a 16-channel 3x3 stem, three stages of (d-4)/6 pre-activation basic blocks with
16k/32k/64k channels (strides 1/2/2), dropout between the two convolutions of a block,
then BN-ReLU, global average pooling and the classifier. WRN-40-4 is 8.9M parameters in
the paper's Table 1 (exactly 8,949,210 for 10 classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colam.models.registry import (
    Classifier,
    check_dropout,
    check_int_option,
    kaiming_init,
    option_error,
    register_model,
)
from colam.models.preact_resnet import PreActBlock

PAPER = 'Zagoruyko & Komodakis 2016, "Wide Residual Networks" (BMVC), arXiv:1605.07146'


class WideResNet(Classifier):
    def __init__(self, depth: int, widen_factor: int, dropout: float, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers, in_planes = [], 16
        for i, planes in enumerate(widths):
            for j in range(n):
                layers.append(PreActBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1, dropout))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


@register_model("wide_resnet", input_size=32, paper=PAPER,
                published_params={10: 8.9e6}, published_precision=0.05e6)
def wide_resnet(num_classes: int, in_channels: int = 3, depth: int = 40, widen_factor: int = 4,
                dropout: float = 0.0) -> nn.Module:
    """WRN-depth-widen_factor; the defaults give WRN-40-4."""
    check_int_option("depth", depth, minimum=10)
    if (depth - 4) % 6 != 0:
        raise option_error("depth", f"WideResNet depth must be 6n+4, got {depth}")
    check_int_option("widen_factor", widen_factor)
    return WideResNet(depth, widen_factor, check_dropout(dropout), num_classes, in_channels)


@register_model("wrn40_4", input_size=32, paper=PAPER,
                published_params={10: 8.9e6}, published_precision=0.05e6)
def wrn40_4(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """WRN-40-4 by name: depth and width are fixed so the name stays true."""
    return wide_resnet(num_classes, in_channels, depth=40, widen_factor=4, dropout=dropout)
