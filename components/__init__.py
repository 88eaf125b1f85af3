"""Kubeflow Pipelines v2 components: thin typed wrappers over the library, one per file.

    prepare               pipeline parameters -> the run's config; the split (Dataset)
    train_stage           split, previous checkpoint and soft labels -> checkpoint (Model), Metrics
    estimate_soft_labels  checkpoint -> the C x C soft labels (Dataset)
    evaluate              checkpoint -> Metrics, a confusion matrix, the report (predictions.csv, ...)

Each module holds a plain function (tested directly with fake artifacts); `build(image)` turns
them into components that run in the project's image (docker/), which already holds kfp and the
project, so nothing is installed when a step starts. The image is the one setting COLAM_IMAGE:
training and estimation run in its `-cuda` variant, preparation and evaluation in `-cpu`.
Every step logs to MLflow when MLFLOW_TRACKING_URI is set in its environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_IMAGE = "ghcr.io/colam-project/colam:0.1.0"


def image(variant: str, base: str | None = None) -> str:
    """The component image of `variant` ('cuda' or 'cpu'): COLAM_IMAGE (or `base`) + '-' + variant."""
    return f"{base or os.environ.get('COLAM_IMAGE') or DEFAULT_IMAGE}-{variant}"


@dataclass(frozen=True)
class Components:
    prepare: object
    train_stage: object
    estimate_soft_labels: object
    evaluate: object


def build(base_image: str | None = None) -> Components:
    from kfp import dsl

    from components.estimate_soft_labels import estimate_soft_labels
    from components.evaluate import evaluate
    from components.prepare import prepare
    from components.train_stage import train_stage

    def make(function, variant):
        return dsl.component(function, base_image=image(variant, base_image), install_kfp_package=False)

    return Components(prepare=make(prepare, "cpu"), train_stage=make(train_stage, "cuda"),
                      estimate_soft_labels=make(estimate_soft_labels, "cuda"), evaluate=make(evaluate, "cpu"))
