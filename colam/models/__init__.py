"""Model zoo: a registry of the architectures used in the COLAM experiments.

Every model keeps its classifier as the ``nn.Linear`` ``fc`` and exposes ``forward_features(x)`` (the flattened
penultimate features) with ``model.fc(model.forward_features(x)) == model(x)``: the analyses of penultimate-layer
geometry rely on it. Each family module registers its builders with :func:`register_model`; a builder's keyword options
are what ``model.options`` may set.
"""

# Importing the family modules registers their models.
from colam.models import densenet_bc, preact_resnet, resnet, resnext, small_cnn  # noqa: F401
from colam.models.registry import (MODELS, ModelSpec, build_model, count_parameters, list_models, model_size,
                                   register_model)

__all__ = ["MODELS", "ModelSpec", "register_model", "build_model", "list_models", "count_parameters", "model_size"]
