"""Pre-activation ResNets for CIFAR: PreAct-ResNet-18/34 and the Wide ResNets.

He et al. 2016 (arXiv:1603.05027), the widely used CIFAR variant: a 64-channel 3x3 stem (no max-pool), four stages of
pre-activation basic blocks (64/128/256/512 channels, 1x1 projection shortcuts where the shape changes) and, as the
paper prescribes, an extra BN-ReLU after the last unit (some CIFAR codes omit it; both round to the published
11.2M / 21.3M). Zagoruyko & Komodakis 2016 (arXiv:1605.07146): WRN-d-k, a 16-channel stem, three stages of (d-4)/6
blocks of 16k/32k/64k channels with dropout between a block's convolutions; WRN-40-4 is 8.9M parameters (Table 1).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from colam.errors import ColamError
from colam.models.registry import (Classifier, check_dropout, kaiming_init, pooled, register_model, require_int,
                                   stages)

PAPER = 'He et al. 2016, "Identity Mappings in Deep Residual Networks" (ECCV), arXiv:1603.05027'
WRN_PAPER = 'Zagoruyko & Komodakis 2016, "Wide Residual Networks" (BMVC), arXiv:1605.07146'


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 plus the (possibly projected) input; with dropout the wide-ResNet
    block B(3,3) of Zagoruyko & Komodakis 2016."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False) if changes_shape else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x  # a projection sees the pre-activated input
        return self.conv2(self.dropout(F.relu(self.bn2(self.conv1(out))))) + shortcut


class PreActResNet(Classifier):
    def __init__(self, stem: int, widths: list[int], blocks: list[int], num_classes: int, in_channels: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.layers, planes = stages(partial(PreActBlock, dropout=dropout), stem, widths, blocks)
        self.bn = nn.BatchNorm2d(planes)  # the extra activation after the last unit
        self.fc = nn.Linear(planes, num_classes)
        kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return pooled(F.relu(self.bn(self.layers(self.conv1(x)))))


@register_model("preact_resnet18", input_size=32, paper=PAPER,
                published_params={10: 11.2e6}, published_precision=0.05e6)
def preact_resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    return PreActResNet(64, [64, 128, 256, 512], [2, 2, 2, 2], num_classes, in_channels)


@register_model("preact_resnet34", input_size=32, paper=PAPER,
                published_params={10: 21.3e6}, published_precision=0.05e6)
def preact_resnet34(num_classes: int, in_channels: int = 3) -> nn.Module:
    return PreActResNet(64, [64, 128, 256, 512], [3, 4, 6, 3], num_classes, in_channels)


@register_model("wide_resnet", input_size=32, paper=WRN_PAPER,
                published_params={10: 8.9e6}, published_precision=0.05e6)
def wide_resnet(num_classes: int, in_channels: int = 3, depth: int = 40, widen_factor: int = 4,
                dropout: float = 0.0) -> nn.Module:
    """WRN-depth-widen_factor; the defaults give WRN-40-4."""
    require_int("model.options.depth", depth, minimum=10)
    if (depth - 4) % 6 != 0:
        raise ColamError(f"model.options.depth: WideResNet depth must be 6n+4, got {depth}")
    require_int("model.options.widen_factor", widen_factor)
    widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    return PreActResNet(16, widths, [(depth - 4) // 6] * 3, num_classes, in_channels, check_dropout(dropout))


@register_model("wrn40_4", input_size=32, paper=WRN_PAPER,
                published_params={10: 8.9e6}, published_precision=0.05e6)
def wrn40_4(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """WRN-40-4 by name: depth and width are fixed so the name stays true."""
    return wide_resnet(num_classes, in_channels, depth=40, widen_factor=4, dropout=dropout)
