"""ResNet for CIFAR.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385), Section 4.2. ResNet-(6n+2): a 16-channel 3x3 stem, three stages of n
basic blocks with 16/32/64 channels (strides 1/2/2), global average pooling and the
classifier. Shortcuts are identities ("option A"): when the shape changes, the input is
subsampled and zero-padded in channels, so shortcuts add no parameters. Registered at the
depths of the paper's Table 6 up to 56 (n = 3, 5, 7, 9: 0.27M, 0.46M, 0.66M, 0.85M
parameters); global pooling makes them take any input size, e.g. 28x28 Fashion-MNIST.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colam.models.registry import Classifier, kaiming_init, register_model

PAPER = 'He et al. 2016, "Deep Residual Learning for Image Recognition" (CVPR), arXiv:1512.03385'


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:  # option A: zero-pad the new channels, half on each side
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Classifier):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def _register(depth: int, published: float) -> None:
    def build(num_classes: int, in_channels: int = 3) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels)

    build.__name__ = f"resnet{depth}"
    register_model(f"resnet{depth}", input_size=32, paper=PAPER, published_params={10: published},
                   published_precision=0.005e6)(build)


# The paper's Table 6 (CIFAR-10): depth 6n + 2 with n = 3, 5, 7, 9.
for _depth, _published in ((20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6)):
    _register(_depth, _published)
