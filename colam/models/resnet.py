"""ResNets of He et al. 2016, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385).

CIFAR (Sec. 4.2): ResNet-(6n+2), a 16-channel stem and three stages of n basic blocks (torchvision's, 16/32/64 channels)
with identity shortcuts ("option A": subsampled and zero-padded, no parameters), at the depths of Table 6 up to 56
(0.27M to 0.85M parameters); global pooling takes any input size. ImageNet: ResNet-50/101 (25.6M / 44.5M), torchvision's
implementation (never downloads weights) with ``forward_features`` and a stem for any number of input channels.
"""

from __future__ import annotations

from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn

from colam.models.registry import Classifier, kaiming_init, pooled, register_model, stages

PAPER = 'He et al. 2016, "Deep Residual Learning for Image Recognition" (CVPR), arXiv:1512.03385'


class OptionA(nn.Module):
    """The parameter-free shortcut of the CIFAR ResNets: subsample, zero-pad the new channels half on each side."""

    def __init__(self, stride: int, pad: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


def basic_block(in_planes: int, planes: int, stride: int) -> nn.Module:
    from torchvision.models.resnet import BasicBlock  # here, not at the top: see imagenet_resnet

    shortcut = OptionA(stride, planes - in_planes) if stride != 1 or planes != in_planes else None
    return BasicBlock(in_planes, planes, stride, shortcut)


class CifarResNet(Classifier):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layers, planes = stages(basic_block, 16, [16, 32, 64], [(depth - 2) // 6] * 3)
        self.fc = nn.Linear(planes, num_classes)
        kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return pooled(self.layers(F.relu(self.bn1(self.conv1(x)))))


def imagenet_resnet(layers: list[int], num_classes: int, in_channels: int = 3) -> nn.Module:
    return _imagenet_resnet_class()(layers, num_classes, in_channels)


@cache
def _imagenet_resnet_class() -> type:
    """torchvision's ResNet with `forward_features`, made when first built: importing torchvision (and torch._dynamo
    with it) costs every process about a second, and most runs build no torchvision model."""
    from torchvision.models.resnet import Bottleneck, ResNet

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

    return ImageNetResNet


# The paper's Table 6 (CIFAR-10): depth 6n + 2 with n = 3, 5, 7, 9.
for _depth, _published in ((20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6)):
    register_model(f"resnet{_depth}", input_size=32, paper=PAPER, published_params={10: _published},
                   published_precision=0.005e6)(partial(CifarResNet, _depth))
for _depth, _blocks, _published in ((50, [3, 4, 6, 3], 25.6e6), (101, [3, 4, 23, 3], 44.5e6)):
    register_model(f"resnet{_depth}", input_size=224, paper=PAPER, published_params={1000: _published},
                   published_precision=0.05e6)(partial(imagenet_resnet, _blocks))
