"""Kubeflow Pipelines v2 components: thin typed wrappers over colam.steps, one plain function per file (tested
directly with fake artifacts). `build(image)` makes them components of the project's image (docker/), which holds kfp
and the project, so a step installs nothing: training and estimation run in its `-cuda` variant, the rest in `-cpu`."""

from __future__ import annotations

import os
from types import SimpleNamespace

DEFAULT_IMAGE = "ghcr.io/colam-project/colam:0.1.0"


def image(variant: str, base: str | None = None) -> str:
    """The component image of `variant` ('cuda' or 'cpu'): COLAM_IMAGE (or `base`) + '-' + variant."""
    return f"{base or os.environ.get('COLAM_IMAGE') or DEFAULT_IMAGE}-{variant}"


def build(base_image: str | None = None) -> SimpleNamespace:
    """The four components, each an attribute named as its function."""
    from kfp import dsl

    from components.estimate_soft_labels import estimate_soft_labels
    from components.evaluate import evaluate
    from components.prepare import prepare
    from components.train_stage import train_stage

    variants = {prepare: "cpu", train_stage: "cuda", estimate_soft_labels: "cuda", evaluate: "cpu"}
    return SimpleNamespace(**{step.__name__: dsl.component(step, base_image=image(variant, base_image),
                                                           install_kfp_package=False)
                              for step, variant in variants.items()})
