"""ResNeXt for CIFAR.

Xie, Girshick, Dollar, Tu, He, "Aggregated Residual Transformations for Deep Neural Networks", CVPR 2017
(arXiv:1611.05431). ResNeXt-29 (8x64d): a 64-channel 3x3 stem, three stages of three bottleneck blocks with 256/512/1024
output channels (strides 1/2/2); each block is conv1x1 -> grouped conv3x3 (cardinality 8) -> conv1x1 with a bottleneck
width of 8 x 64d = 512 in the first stage, doubling with each stage, as in the authors' CIFAR code. Published: 34.4M
parameters (Table 7).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from colam.models.registry import Classifier, kaiming_init, pooled, register_model, stages

PAPER = 'Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks" (CVPR), arXiv:1611.05431'


def resnext_block(in_planes: int, out_planes: int, stride: int, cardinality: int, base_width: int) -> nn.Module:
    """torchvision's bottleneck with `cardinality` groups, 8 x 64d wide in the first stage, doubling per stage."""
    from torchvision.models.resnet import Bottleneck  # on use: importing torchvision costs every process a second
    from torchvision.ops import Conv2dNormActivation

    shortcut = (Conv2dNormActivation(in_planes, out_planes, 1, stride, activation_layer=None)
                if stride != 1 or in_planes != out_planes else None)
    return Bottleneck(in_planes, out_planes // Bottleneck.expansion, stride, shortcut, cardinality, base_width)


class ResNeXt(Classifier):
    def __init__(self, depth: int, cardinality: int, base_width: int, num_classes: int, in_channels: int = 3) -> None:
        from torchvision.ops import Conv2dNormActivation

        super().__init__()
        self.stem = Conv2dNormActivation(in_channels, 64, 3, activation_layer=None)
        block = partial(resnext_block, cardinality=cardinality, base_width=base_width)
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
