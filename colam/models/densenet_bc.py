"""DenseNet-BC for CIFAR.

Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks", CVPR 2017 (arXiv:1608.06993).
DenseNet-BC (L=100, k=12): a 2k-channel 3x3 stem, three dense blocks of (L-4)/6 = 16 bottleneck layers (BN-ReLU-conv1x1
to 4k, BN-ReLU-conv3x3 to k, output concatenated to the input), transitions that halve the channels (compression 0.5)
and the resolution, then BN-ReLU, global average pooling and the classifier. Published: 0.8M parameters (exactly 0.769M
for 10 classes).
"""

from __future__ import annotations

import torch
from torch import nn

from colam.models.registry import Classifier, check_dropout, kaiming_init, pooled, register_model, require_int

PAPER = 'Huang et al. 2017, "Densely Connected Convolutional Networks" (CVPR), arXiv:1608.06993'


def _bn_relu_conv(in_planes: int, out_planes: int, kernel: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True),
            nn.Conv2d(in_planes, out_planes, kernel, padding=kernel // 2, bias=False)]


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, growth_rate: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(*_bn_relu_conv(in_planes, 4 * growth_rate, 1), nn.Dropout(dropout),
                                  *_bn_relu_conv(4 * growth_rate, growth_rate, 3), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNetBC(Classifier):
    def __init__(self, depth: int, growth_rate: int, dropout: float, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 4) // 6  # each bottleneck layer holds two convolutions
        planes = 2 * growth_rate
        layers: list[nn.Module] = [nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(n):
                layers.append(Bottleneck(planes, growth_rate, dropout))
                planes += growth_rate
            if block < 2:  # transition: compress channels (compression 0.5), halve resolution
                layers += [*_bn_relu_conv(planes, planes // 2, 1), nn.Dropout(dropout), nn.AvgPool2d(2)]
                planes //= 2
        layers += [nn.BatchNorm2d(planes), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(planes, num_classes)
        kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return pooled(self.features(x))


@register_model("densenet_bc_100", input_size=32, paper=PAPER,
                published_params={10: 0.8e6, 100: 0.8e6}, published_precision=0.05e6)
def densenet_bc_100(num_classes: int, in_channels: int = 3, growth_rate: int = 12,
                    dropout: float = 0.0) -> nn.Module:
    """DenseNet-BC-100; the paper uses dropout 0.2 only when training without augmentation."""
    require_int("model.options.growth_rate", growth_rate)
    return DenseNetBC(100, growth_rate, check_dropout(dropout), num_classes, in_channels)
