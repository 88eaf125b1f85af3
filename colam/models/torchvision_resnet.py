"""ImageNet ResNets, reusing torchvision's implementation (never downloads weights).

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385). ResNet-50/101 with bottleneck blocks [3,4,6,3] / [3,4,23,3]; 25.6M and
44.5M parameters for 1000 classes (torchvision: 25,557,032 and 44,549,160). This subclass
adds ``forward_features`` and lets the stem take any number of input channels.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from colam.models.registry import register_model

PAPER = 'He et al. 2016, "Deep Residual Learning for Image Recognition" (CVPR), arXiv:1512.03385'


class ImageNetResNet(ResNet):
    def __init__(self, layers: list[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__(Bottleneck, layers, num_classes=num_classes)
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@register_model("resnet50", input_size=224, paper=PAPER,
                published_params={1000: 25.6e6}, published_precision=0.05e6)
def resnet50(num_classes: int, in_channels: int = 3) -> nn.Module:
    return ImageNetResNet([3, 4, 6, 3], num_classes, in_channels)


@register_model("resnet101", input_size=224, paper=PAPER,
                published_params={1000: 44.5e6}, published_precision=0.05e6)
def resnet101(num_classes: int, in_channels: int = 3) -> nn.Module:
    return ImageNetResNet([3, 4, 23, 3], num_classes, in_channels)
