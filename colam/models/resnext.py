"""ResNeXt for CIFAR.

Xie, Girshick, Dollar, Tu, He, "Aggregated Residual Transformations for Deep Neural
Networks", CVPR 2017 (arXiv:1611.05431). ResNeXt-29 (8x64d): a 64-channel 3x3 stem, three
stages of three bottleneck blocks with 256/512/1024 output channels (strides 1/2/2);
each block is conv1x1 -> grouped conv3x3 (cardinality 8) -> conv1x1 with a bottleneck
width of 8 x 64d = 512 in the first stage, doubling with each stage, as in the authors'
CIFAR code. Published: 34.4M parameters (Table 7).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from colam.models.registry import Classifier, kaiming_init, pooled, register_model, stages

PAPER = 'Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks" (CVPR), arXiv:1611.05431'


def _conv_bn(in_planes: int, out_planes: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(in_planes, out_planes, kernel, stride, kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_planes))


class ResNeXtBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, cardinality: int, base_width: int) -> None:
        super().__init__()
        width = cardinality * base_width * out_planes // 256  # 8 x 64d in the first stage, doubling per stage
        self.reduce = _conv_bn(in_planes, width, 1)
        self.grouped = _conv_bn(width, width, 3, stride, groups=cardinality)
        self.expand = _conv_bn(width, out_planes, 1)
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = _conv_bn(in_planes, out_planes, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.reduce(x))
        out = self.expand(F.relu(self.grouped(out)))
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + shortcut)


class ResNeXt(Classifier):
    def __init__(self, depth: int, cardinality: int, base_width: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 64, 3)
        block = partial(ResNeXtBlock, cardinality=cardinality, base_width=base_width)
        # three stages of (depth - 2) / 9 three-layer blocks, plus stem and classifier
        self.layers, planes = stages(block, 64, [256, 512, 1024], [(depth - 2) // 9] * 3)
        self.fc = nn.Linear(planes, num_classes)
        kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return pooled(self.layers(F.relu(self.stem(x))))


@register_model("resnext29_8x64d", input_size=32, paper=PAPER,
                published_params={10: 34.4e6}, published_precision=0.05e6)
def resnext29_8x64d(num_classes: int, in_channels: int = 3) -> nn.Module:
    return ResNeXt(29, 8, 64, num_classes, in_channels)
