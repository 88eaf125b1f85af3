from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from colam import io as cio
from colam.errors import ColamError
from colam.methods.base import POSITIVE, Method, soft_cross_entropy
from colam.methods.kd import check_unchanged, load_teacher_labels

KEY = "method.fixed.labels"


@dataclass
class FixedSettings:
    labels: str = ""  # a C x C soft-label file (COLAM's stage_K/soft_labels.npy) trained on for the whole run
    temperature: float = 1.0  # T dividing the logits, as in COLAM's Eq. 4: the T the labels were estimated with


class FixedSoftLabels(Method):
    """COLAM's Eq. 4, H(S[y], softmax(z / T)), on a fixed C x C soft-label matrix S for the whole run: how the COLAM
    paper (Li et al. 2022, Sec. 5.1, Fig. 1b) measures a soft-label checkpoint's *expected accuracy*
    (`colam analyze expected-accuracy`). Unlike `kd` with a label file: no T^2, no hard-label term. The state records
    the file's sha256; resuming refuses a changed file."""

    name = "fixed"
    settings = FixedSettings
    headline = ("temperature",)
    paper = "Li et al. 2022, Sec. 5.1 (expected accuracy of a soft-label checkpoint)"
    summary = "H(S[y], softmax(z / T)) on a fixed C x C soft-label file for the whole run (expected accuracy)"
    checks = {"labels": (lambda text: text.strip() != "",
                         "required: a C x C soft_labels.npy to train on (e.g. a COLAM run's stage_K/soft_labels.npy)"),
              "temperature": POSITIVE}
    on_device = ("soft_labels",)
    soft_labels: torch.Tensor | None = None
    labels_sha256: str | None = None

    @classmethod
    def check_data(cls, config, class_counts):
        load_teacher_labels(_labels_file(config.method.fixed.labels), len(class_counts), KEY)

    def attach_data(self, data):
        file = _labels_file(self.section.labels)
        self.soft_labels = load_teacher_labels(file, data.num_classes, KEY)
        self.labels_sha256 = cio.sha256_file(file)
        self.to(self.device)

    def loss(self, logits, targets, indices, stage):
        if self.soft_labels is None:
            raise RuntimeError("fixed: attach_data(data) must be called before training (colam.engine.prepare does)")
        return soft_cross_entropy(logits / self.section.temperature, self.soft_labels[targets])

    def state_dict(self):
        return {"labels_sha256": self.labels_sha256}

    def load_state_dict(self, state):
        check_unchanged(KEY, self.section.labels, state.get("labels_sha256"), self.labels_sha256)


def _labels_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ColamError(f"{KEY}: '{text}' is not a file; give a C x C soft_labels.npy")
    return path
