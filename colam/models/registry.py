"""The registry of models (`register_model`, `build_model`) and the helpers the family modules share."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from colam.errors import ColamError


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture and the size its paper reports."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: int  # side of the square input it was designed for: 32 CIFAR, 224 ImageNet, 8 digits
    paper: str
    published_params: dict[int, float]  # num_classes -> parameter count as published
    published_precision: float  # how far the exact count may be from the published figure

    @property
    def options(self) -> dict[str, Any]:
        """The builder's options and their defaults: its arguments but num_classes and in_channels."""
        params = inspect.signature(self.builder).parameters.values()
        return {p.name: p.default for p in params if p.name not in ("num_classes", "in_channels")}


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, *, input_size: int, paper: str, published_params: dict[int, float],
                   published_precision: float) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``builder(num_classes, in_channels, **options)`` as ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = ModelSpec(name, builder, input_size, paper, dict(published_params), published_precision)
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> nn.Module:
    """Build registered model ``name``; raises ColamError naming the offending input."""
    if name not in MODELS:
        raise ColamError(f"model.name: unknown model {name!r}; choose one of: {', '.join(list_models())}")
    accepted = MODELS[name].options
    for key in options:
        if key not in accepted:
            listed = ", ".join(accepted) or "none"
            raise ColamError(f"model.options.{key}: not an option of model {name!r} (accepted: {listed})")
    require_int("model.num_classes", num_classes, maximum=10**6)
    require_int("model.in_channels", in_channels)
    return MODELS[name].builder(num_classes=num_classes, in_channels=in_channels, **options)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_size(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> int:
    """Trainable parameter count of a registered model, built on the meta device (no memory, fast)."""
    with torch.device("meta"):
        return count_parameters(build_model(name, num_classes, in_channels, **options))


# Helpers shared by the family modules.

class Classifier(nn.Module):
    """Base class fixing the contract ``forward(x) == fc(forward_features(x))``."""

    fc: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Global average pooling, flattened: the penultimate features of a convolutional network."""
    return torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)


def stages(block: Callable[[int, int, int], nn.Module], in_planes: int, widths: list[int],
           counts: list[int]) -> tuple[nn.Sequential, int]:
    """Stages of `counts[i]` blocks ``block(in_planes, widths[i], stride)``, every stage but the first starting with
    stride 2; returns them in one Sequential and their output channels."""
    layers = []
    for i, (planes, n) in enumerate(zip(widths, counts)):
        for j in range(n):
            layers.append(block(in_planes, planes, 2 if i > 0 and j == 0 else 1))
            in_planes = planes
    return nn.Sequential(*layers), in_planes


def kaiming_init(model: nn.Module) -> None:
    """He-normal (fan_out) convolutions, unit BN, zero biases: the init the reference codes use. A model built on the
    meta device (shapes only) is left as it is: a random fill there goes through torch's Python reference code, which
    imports torch._dynamo (a second of a process's start) and computes nothing."""
    if any(p.is_meta for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def check_dropout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ColamError(f"model.options.dropout: must be a probability in [0, 1), got {value!r}")
    return float(value)


def require_int(key: str, value: Any, minimum: int = 1, maximum: int = 4096) -> None:
    """A whole number of layers, channels or classes; past `maximum` the network would not fit any memory."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ColamError(f"{key}: must be an integer >= {minimum} and <= {maximum:,}, got {value!r}")
