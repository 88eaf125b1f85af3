from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from colam import io as cio
from colam.errors import ColamError, require
from colam.methods.base import Method
from colam.soft_labels import check_soft_labels, load_npy

if TYPE_CHECKING:  # colam.runs imports colam.config, which imports this registry
    from colam.runs import RunFolder

KEY = "method.kd.teacher"


@dataclass
class KDSettings:
    teacher: str = ""  # a finished run folder (its final model) or a soft_labels.npy (C x C) to distil from
    temperature: float = 4.0  # T of the softened teacher and student outputs (Hinton et al. 2015)
    alpha: float = 0.9  # weight of the distillation term; 1 - alpha on the hard labels


class Distillation(Method):
    """Knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural
    Network", Sec. 2): a student trained on

        L = (1 - alpha) * CE(z, y) + alpha * T^2 * KL( p_teacher || softmax(z / T) )

    with z the student's logits, y the (training, possibly noisy) label, the KL summed over classes
    and averaged over the batch. The T^2 keeps the soft term's gradient scale independent of T
    (Hinton et al.: the soft targets' gradients scale as 1 / T^2). Vyas et al. 2020 ("Learning Soft
    Labels via Meta Learning", arXiv:2009.09496) use distillation as the downstream test of learned
    labels, which is what the second kind of teacher below is for.

    The teacher (`method.kd.teacher`) is either
      * a finished run folder of this project (colam.runs), trained with any method and any model: its
        config.yaml (or, for a stage-by-stage run, its last stage's state.pt) gives the model
        (model.name/options, possibly another architecture than the student's); the weights are the last stage's export.pt when the method exported a smaller
        network, else its model.pt (with the teacher method's wrap_model). The network runs in eval
        mode under no_grad on the same augmented batch as the student, and
        p_teacher = softmax(teacher(x) / T); or
      * a .npy file holding a C x C soft-label matrix (COLAM's final stage_K/soft_labels.npy, or meta's stage_K/learned_labels.npy):
        p_teacher of a sample of class y is row y. The rows are already distributions and are NOT
        re-softened by T; T still divides the student's logits, so set it to the temperature the
        labels were estimated with (COLAM's soft_labels.json records it; COLAM's Eq. 4 is then the
        alpha = 1 case up to the T^2 factor and the labels' entropy, a constant).

    The teacher is loaded in `attach_data` (its input channels and class count are the data's),
    never trained: its parameters do not require gradients, are not part of the student model (so
    neither of its optimizer nor of model.pt) and follow the student's device in `to`. The method
    state records the sha256 of the teacher's file, and resuming refuses a teacher that changed.

    Cost: one extra forward pass of the teacher per batch (no backward); nothing for a matrix.
    """

    name = "kd"
    settings = KDSettings
    headline = ("temperature",)
    paper = "Hinton et al. 2015, arXiv:1503.02531"
    summary = "(1 - alpha) CE + alpha T^2 KL(teacher || student) from a finished run or a C x C soft-label file"

    def __init__(self, config, num_classes, train_targets):
        super().__init__(config, num_classes, train_targets)
        self.section = config.method.kd
        self.teacher: nn.Module | None = None  # a finished run's network
        self.teacher_labels: torch.Tensor | None = None  # or a C x C soft-label matrix
        self.teacher_sha256: str | None = None
        self.device = torch.device("cpu")

    @classmethod
    def validate(cls, config):
        section = config.method.kd
        require(section.teacher.strip() != "", KEY, section.teacher,
                "required: a finished run folder or a C x C soft_labels.npy to distil from")
        require(section.temperature > 0, "method.kd.temperature", section.temperature, "must be > 0")
        require(0.0 <= section.alpha <= 1.0, "method.kd.alpha", section.alpha, "must be in [0, 1]")

    @classmethod
    def check_data(cls, config, class_counts):
        """Refuse a missing or unfinished teacher, or a matrix of another class count, before any model is built."""
        source = locate_teacher(config.method.kd.teacher)
        if source.kind == "labels":
            load_teacher_labels(source.file, len(class_counts))

    @classmethod
    def hyperparameters(cls, config):
        section = config.method.kd
        return {"teacher": section.teacher, "temperature": section.temperature, "alpha": section.alpha}

    def attach_data(self, data):
        source = locate_teacher(self.section.teacher)
        if source.kind == "labels":
            self.teacher_labels = load_teacher_labels(source.file, data.num_classes)
        else:
            self.teacher = load_teacher_network(source, data.num_classes, data.in_channels)
        self.teacher_sha256 = cio.sha256_file(source.file)
        self.to(self.device)

    def to(self, device):
        self.device = torch.device(device)
        if self.teacher is not None:
            self.teacher.to(self.device)
        if self.teacher_labels is not None:
            self.teacher_labels = self.teacher_labels.to(self.device)
        return self

    @torch.no_grad()
    def teacher_probs(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """p_teacher of each sample of the batch: softmax(teacher(x) / T), or row y of the matrix."""
        if self.teacher_labels is not None:
            return self.teacher_labels[targets]
        if self.teacher is None:
            raise RuntimeError("kd: attach_data(data) must be called before training (colam.engine.prepare does)")
        self.teacher.eval()  # BatchNorm on its running statistics, no dropout: a fixed function of x
        return (self.teacher(images).float() / self.section.temperature).softmax(dim=1)

    def forward_loss(self, model, images, targets, indices, stage):
        logits = model(images)
        alpha = self.section.alpha
        if alpha == 0:
            return F.cross_entropy(logits, targets), logits
        return distillation_loss(logits, targets, self.teacher_probs(images, targets), alpha,
                                 self.section.temperature), logits

    def state_dict(self):
        return {"teacher_sha256": self.teacher_sha256}

    def load_state_dict(self, state):
        saved = state.get("teacher_sha256")
        if saved is not None and self.teacher_sha256 is not None and saved != self.teacher_sha256:
            raise ColamError(f"{KEY}: '{self.section.teacher}' changed since this run was checkpointed (sha256 "
                             f"{saved[:12]} then, {self.teacher_sha256[:12]} now); restore it or train into another --out")


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_probs: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    """(1 - alpha) CE(z, y) + alpha T^2 KL(teacher_probs || softmax(z / T)), KL summed over classes, batch mean."""
    hard = F.cross_entropy(logits, targets)
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), teacher_probs, reduction="batchmean")
    return (1 - alpha) * hard + alpha * temperature**2 * soft


# ----------------------------------------------------------------------------- the teacher's files


@dataclass
class TeacherSource:
    kind: str  # "labels" (a .npy matrix) or "run" (a finished run folder)
    file: Path  # the file the teacher's numbers come from: the .npy, or the weights (export.pt / model.pt)
    run: RunFolder | None = None  # the finished run, for kind "run"


def locate_teacher(text: str) -> TeacherSource:
    """What `method.kd.teacher` names, checked without loading any weights."""
    path = Path(text).expanduser()
    if not path.exists():
        raise ColamError(f"{KEY}: '{text}' does not exist")
    if path.is_file():
        if path.suffix != ".npy":
            raise ColamError(f"{KEY}: '{text}' is a file but not a .npy soft-label matrix; give a finished run "
                             f"folder or a C x C soft_labels.npy")
        return TeacherSource("labels", path)
    if not path.is_dir():
        raise ColamError(f"{KEY}: '{text}' is neither a folder nor a file")
    from colam.runs import open_run

    run = open_run(path, KEY)
    return TeacherSource("run", run.network_file, run)


def load_teacher_labels(file: Path, num_classes: int, key: str = KEY) -> torch.Tensor:
    """The C x C matrix in `file`, refused unless it is finite, non-negative, with rows summing to 1;
    errors name the config `key` that gave the file."""
    array = load_npy(file, key)
    if array.shape != (num_classes, num_classes):
        raise ColamError(f"{key}: '{file}' has shape {array.shape}, this data's {num_classes} classes need "
                         f"({num_classes}, {num_classes}) (row c = the soft label of class c)")
    labels = torch.from_numpy(array.astype(np.float64))
    check_soft_labels(labels, num_classes, f"{key}: '{file}'")
    return labels.to(torch.float32)


def load_teacher_network(source: TeacherSource, num_classes: int, in_channels: int) -> nn.Module:
    """The run's final network for this data's classes and channels, in eval mode, without gradients."""
    from colam.runs import final_network

    return final_network(source.run, num_classes, in_channels, KEY)
