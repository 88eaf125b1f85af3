"""Representation geometry of a trained network (COLAM paper, Sec. 5.2: Fig. 2, Table 5, Fig. 3), from the penultimate
features x (`model.forward_features`) and the class templates w_k (rows of `model.fc.weight`): the projection on the
templates' plane (Mueller, Kornblith & Hinton 2019, Sec. 2), the distances between normalised templates (Table 5), and
the average distance from each template (ADT) and centroid (ADC) to each class's samples (Fig. 3). Every vector is
normalised first, as the paper says ("we normalize all vectors when we compute such distances"); a centroid is the
normalised mean of normalised samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from colam.errors import ColamError


@dataclass(frozen=True)
class Features:
    """Penultimate features of some samples and their labels (the data set's own, not noisy ones)."""

    values: torch.Tensor  # N x D, float64
    labels: torch.Tensor  # N, class indices


@torch.no_grad()
def features(model: nn.Module, batches) -> Features:
    """forward_features of every sample of `batches` (x, y, index), in eval mode, as float64."""
    model.eval()
    values, labels = zip(*[(model.forward_features(x).double().cpu(), torch.as_tensor(y)) for x, y, *_ in batches])
    return Features(torch.cat(values), torch.cat(labels))


def templates(model: nn.Module) -> torch.Tensor:
    """The class templates, C x D: row k of the final linear layer's weight (float64)."""
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ColamError(f"--run: the network {type(model).__name__} has no final nn.Linear `fc` to read "
                         f"templates from")
    return fc.weight.detach().double().cpu()


def normalised(vectors: torch.Tensor) -> torch.Tensor:
    """Each row divided by its Euclidean norm (a zero row stays zero), in float64."""
    vectors = vectors.double()
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)


def template_distances(template_rows: torch.Tensor) -> torch.Tensor:
    """K x K Euclidean distances between the normalised templates (Table 5)."""
    unit = normalised(template_rows)
    return torch.cdist(unit, unit)


def class_members(feats: Features, classes: list[int]) -> list[torch.Tensor]:
    unit = normalised(feats.values)
    members = [unit[feats.labels == k] for k in classes]
    for k, rows in zip(classes, members):
        if len(rows) == 0:
            raise ColamError(f"analysis.classes: class {k} has no samples among the features")
    return members


def centroids(feats: Features, classes: list[int]) -> torch.Tensor:
    """One centroid per class of `classes`: the normalised mean of its normalised samples."""
    return normalised(torch.stack([rows.mean(dim=0) for rows in class_members(feats, classes)]))


def average_distances(points: torch.Tensor, feats: Features, classes: list[int]) -> torch.Tensor:
    """K x K: entry [i, j] is the mean distance from normalised point i (a template or a centroid of class classes[i])
    to the normalised samples of class classes[j] (Fig. 3: ADT, ADC)."""
    unit = normalised(points)
    return torch.stack([torch.cdist(unit, rows).mean(dim=1) for rows in class_members(feats, classes)], dim=1)


@dataclass(frozen=True)
class Plane:
    """The plane through three templates: origin (their mean) and an orthonormal basis (D x 2)."""

    origin: torch.Tensor
    basis: torch.Tensor

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors.double() - self.origin) @ self.basis


def template_plane(three_templates: torch.Tensor) -> Plane:
    """Mueller et al. 2019's plane: spanned by w_b - w_a and w_c - w_a (Gram-Schmidt), through the templates' mean, so
    the three templates keep their pairwise distances in the projection."""
    if three_templates.shape[0] != 3:
        raise ColamError(f"analysis.classes: the projection needs exactly 3 templates, got {three_templates.shape[0]}")
    w = three_templates.double()
    first = w[1] - w[0]
    if first.norm() == 0:
        raise ColamError("analysis.classes: two of the three templates are identical; they span no plane")
    e1 = first / first.norm()
    second = (w[2] - w[0]) - ((w[2] - w[0]) @ e1) * e1
    if second.norm() <= 1e-12 * max(float(w.norm()), 1.0):
        raise ColamError("analysis.classes: the three templates lie on one line; they span no plane")
    e2 = second / second.norm()
    return Plane(origin=w.mean(dim=0), basis=torch.stack([e1, e2], dim=1))
