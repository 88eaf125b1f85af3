from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from colam import io as cio
from colam.errors import ColamError
from colam.methods.base import POSITIVE, UNIT, Method
from colam.soft_labels import load_soft_labels

if TYPE_CHECKING:  # colam.runs imports colam.config, which imports this registry
    from colam.runs import RunFolder

KEY = "method.kd.teacher"


@dataclass
class KDSettings:
    teacher: str = ""  # a finished run folder (its final model) or a soft_labels.npy (C x C) to distil from
    temperature: float = 4.0  # T of the softened teacher and student outputs (Hinton et al. 2015)
    alpha: float = 0.9  # weight of the distillation term; 1 - alpha on the hard labels


class Distillation(Method):
    """Knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network", Sec. 2): a
    student trained on `distillation_loss`, (1 - alpha) * CE(z, y) + alpha * T^2 * KL(p_teacher || softmax(z / T)); T^2
    keeps the soft term's gradient scale independent of T. Vyas et al. 2020 use distillation as the downstream test of
    learned labels: the second kind of teacher.

    The teacher (`method.kd.teacher`) is either
      * a finished run folder (colam.runs) of any method and model: `colam.runs.final_network` gives its final
        network, run in eval mode under no_grad on the student's augmented batch, p_teacher = softmax(teacher(x) / T);
      * or a .npy C x C soft-label matrix (COLAM's stage_K/soft_labels.npy, meta's learned_labels.npy): p_teacher of
        class y is row y, NOT re-softened; T still divides the student's logits, so set it to the temperature the
        labels were estimated with.

    The teacher is loaded in `attach_data`, never trained, and kept out of the student's model and optimizer; the state
    records its file's sha256, and resuming refuses a teacher that changed.
    """

    name = "kd"
    settings = KDSettings
    headline = ("temperature",)
    paper = "Hinton et al. 2015, arXiv:1503.02531"
    summary = "(1 - alpha) CE + alpha T^2 KL(teacher || student) from a finished run or a C x C soft-label file"
    checks = {"teacher": (lambda text: text.strip() != "",
                          "required: a finished run folder or a C x C soft_labels.npy to distil from"),
              "temperature": POSITIVE, "alpha": UNIT}
    on_device = ("teacher", "teacher_labels")
    teacher: nn.Module | None = None  # a finished run's network
    teacher_labels: torch.Tensor | None = None  # or a C x C soft-label matrix
    teacher_sha256: str | None = None

    @classmethod
    def check_data(cls, config, class_counts):
        """Refuse a missing or unfinished teacher, or a matrix of another class count, before any model is built."""
        source = locate_teacher(config.method.kd.teacher)
        if isinstance(source, Path):
            load_teacher_labels(source, len(class_counts))

    def attach_data(self, data):
        source = locate_teacher(self.section.teacher)
        if isinstance(source, Path):
            self.teacher_labels = load_teacher_labels(source, data.num_classes)
        else:
            from colam.runs import final_network

            self.teacher = final_network(source, data.num_classes, data.in_channels, KEY)
        self.teacher_sha256 = cio.sha256_file(source if isinstance(source, Path) else source.network_file)
        self.to(self.device)

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
        logits, alpha = model(images), self.section.alpha
        if alpha == 0:
            return F.cross_entropy(logits, targets), logits
        return distillation_loss(logits, targets, self.teacher_probs(images, targets), alpha,
                                 self.section.temperature), logits

    def state_dict(self):
        return {"teacher_sha256": self.teacher_sha256}

    def load_state_dict(self, state):
        check_unchanged(KEY, self.section.teacher, state.get("teacher_sha256"), self.teacher_sha256)


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_probs: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    """(1 - alpha) CE(z, y) + alpha T^2 KL(teacher_probs || softmax(z / T)), KL summed over classes, batch mean."""
    hard = F.cross_entropy(logits, targets)
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), teacher_probs, reduction="batchmean")
    return (1 - alpha) * hard + alpha * temperature**2 * soft


def locate_teacher(text: str) -> Path | RunFolder:
    """What `method.kd.teacher` names, checked without loading any weights: a .npy soft-label matrix or a finished run
    (whose weights are its `network_file`, export.pt or model.pt)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise ColamError(f"{KEY}: '{text}' does not exist")
    if path.is_file():
        if path.suffix != ".npy":
            raise ColamError(f"{KEY}: '{text}' is a file but not a .npy soft-label matrix; give a finished run "
                             f"folder or a C x C soft_labels.npy")
        return path
    if not path.is_dir():
        raise ColamError(f"{KEY}: '{text}' is neither a folder nor a file")
    from colam.runs import open_run

    return open_run(path, KEY)


def load_teacher_labels(file: Path, num_classes: int, key: str = KEY) -> torch.Tensor:
    """The C x C matrix in `file` as float32, refused (`load_soft_labels`) naming the config `key` that gave it."""
    return torch.from_numpy(load_soft_labels(file, key, num_classes).astype(np.float32))


def check_unchanged(key: str, text: str, saved: str | None, now: str | None) -> None:
    """Refuse to resume on the file `text` of config `key` when its sha256 is no longer the checkpoint's."""
    if saved is not None and now is not None and saved != now:
        raise ColamError(f"{key}: '{text}' changed since this run was checkpointed (sha256 "
                         f"{saved[:12]} then, {now[:12]} now); restore it or train into another --out")
