"""Model zoo: a registry of the architectures used in the COLAM experiments.

Every model returns logits from ``forward(x)``, exposes ``forward_features(x)`` (the
penultimate features after global pooling, flattened) and keeps its classifier as the
``nn.Linear`` attribute ``fc``, so that ``model.fc(model.forward_features(x)) == model(x)``.
Analyses of penultimate-layer geometry rely on that contract.

Each family module registers its builders with :func:`register_model`; a builder takes
``(num_classes, in_channels, **options)`` and its keyword options are the ones a
configuration may set under ``model.options``.
"""

# Importing the family modules registers their models.
from colam.models import (  # noqa: F401
    densenet_bc,
    preact_resnet,
    resnet_cifar,
    resnext,
    small_cnn,
    torchvision_resnet,
    wide_resnet,
)
from colam.models.registry import MODELS, ModelSpec, build_model, count_parameters, list_models, model_size, register_model

__all__ = ["MODELS", "ModelSpec", "register_model", "build_model", "list_models", "count_parameters", "model_size"]
