from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from colam import io as cio
from colam.errors import ColamError, require
from colam.methods.base import Method, soft_cross_entropy
from colam.methods.kd import load_teacher_labels

KEY = "method.fixed.labels"


@dataclass
class FixedSettings:
    labels: str = ""  # a C x C soft-label file (COLAM's stage_K/soft_labels.npy) trained on for the whole run
    temperature: float = 1.0  # T dividing the logits, as in COLAM's Eq. 4: the T the labels were estimated with


class FixedSoftLabels(Method):
    """Training on a fixed C x C soft-label matrix for the whole run: COLAM's Eq. 4,

        L = H( S[y], softmax(z / T) ),

    with S never re-estimated. This is how the COLAM paper (Li et al. 2022, Sec. 5.1, Fig. 1b)
    measures the quality of a soft-label checkpoint: "we train a model from scratch with vanilla
    SGD, except one difference that we use the supervision of these checkpoints"; its test
    accuracy is the checkpoint's *expected accuracy* (`colam analyze expected-accuracy`).

    Unlike `kd` with a label file, the loss has no T^2 factor and no hard-label term: it is
    exactly the loss of COLAM's stages 2..m with `peers: all` (with k peers COLAM trains on
    per-sample labels; its C x C matrix is still what this method takes). With S the identity
    and T = 1 it is hard-label cross-entropy. The state records the sha256 of the file; resuming refuses a changed file.
    """

    name = "fixed"
    settings = FixedSettings
    headline = ("temperature",)
    paper = "Li et al. 2022, Sec. 5.1 (expected accuracy of a soft-label checkpoint)"
    summary = "H(S[y], softmax(z / T)) on a fixed C x C soft-label file for the whole run (expected accuracy)"

    def __init__(self, config, num_classes, train_targets):
        super().__init__(config, num_classes, train_targets)
        self.section = config.method.fixed
        self.soft_labels: torch.Tensor | None = None
        self.labels_sha256: str | None = None
        self.device = torch.device("cpu")

    @classmethod
    def validate(cls, config):
        section = config.method.fixed
        require(section.labels.strip() != "", KEY, section.labels,
                "required: a C x C soft_labels.npy to train on (e.g. a COLAM run's stage_K/soft_labels.npy)")
        require(section.temperature > 0, "method.fixed.temperature", section.temperature, "must be > 0")

    @classmethod
    def check_data(cls, config, class_counts):
        load_teacher_labels(_labels_file(config.method.fixed.labels), len(class_counts), KEY)

    @classmethod
    def hyperparameters(cls, config):
        return {"labels": config.method.fixed.labels, "temperature": config.method.fixed.temperature}

    def attach_data(self, data):
        file = _labels_file(self.section.labels)
        self.soft_labels = load_teacher_labels(file, data.num_classes, KEY)
        self.labels_sha256 = cio.sha256_file(file)
        self.to(self.device)

    def to(self, device):
        self.device = torch.device(device)
        if self.soft_labels is not None:
            self.soft_labels = self.soft_labels.to(self.device)
        return self

    def loss(self, logits, targets, indices, stage):
        if self.soft_labels is None:
            raise RuntimeError("fixed: attach_data(data) must be called before training (colam.engine.prepare does)")
        return soft_cross_entropy(logits / self.section.temperature, self.soft_labels[targets])

    def state_dict(self):
        return {"labels_sha256": self.labels_sha256}

    def load_state_dict(self, state):
        saved = state.get("labels_sha256")
        if saved is not None and self.labels_sha256 is not None and saved != self.labels_sha256:
            raise ColamError(f"{KEY}: '{self.section.labels}' changed since this run was checkpointed (sha256 "
                             f"{saved[:12]} then, {self.labels_sha256[:12]} now); restore it or train into another --out")


def _labels_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ColamError(f"{KEY}: '{text}' is not a file; give a C x C soft_labels.npy")
    return path
