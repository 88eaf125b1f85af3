"""A small CNN for the bundled default data set (scikit-learn's 8x8 grayscale digits).

Not from a paper: this project's own baseline, sized to train in seconds on a couple of CPU cores. conv3x3(w)-BN-ReLU,
conv3x3(2w)-BN-ReLU, max-pool 2, conv3x3(4w)-BN-ReLU, global average pooling, dropout, linear classifier. Global pooling
makes it accept any input of at least 2x2 pixels, e.g. 32x32 CIFAR images.
"""

from __future__ import annotations

import torch
from torch import nn

from colam.models.registry import Classifier, check_dropout, kaiming_init, register_model, require_int


def _conv_bn_relu(in_planes: int, out_planes: int) -> list[nn.Module]:
    return [nn.Conv2d(in_planes, out_planes, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_planes), nn.ReLU(inplace=True)]


class SmallCNN(Classifier):
    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(*_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, 2 * width),
                                      nn.MaxPool2d(2), *_conv_bn_relu(2 * width, 4 * width),  # pooled: 8x8 -> 4x4
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.fc = nn.Linear(4 * width, num_classes)
        kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model("small_cnn", input_size=8,
                paper="this project's small CNN (no paper); published_params is its own exact count "
                      "for 3 input channels (the build_model default; 94,186 for 1-channel digits)",
                published_params={10: 94_762}, published_precision=0)
def small_cnn(num_classes: int, in_channels: int = 3, width: int = 32, dropout: float = 0.0) -> nn.Module:
    require_int("model.options.width", width)
    return SmallCNN(num_classes, in_channels, width, check_dropout(dropout))
