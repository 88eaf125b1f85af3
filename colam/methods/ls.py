from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colam.methods.base import FRACTION, Method, soft_cross_entropy


@dataclass
class LSSettings:
    eps: float = 0.1  # Szegedy et al. 2016, Eq. 1 of the COLAM paper
    convention: str = "C"  # "C": eps/C to every class (torch's label_smoothing); "C-1": eps/(C-1) to wrong classes


class LabelSmoothing(Method):
    """Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture"; Eq. 1 of COLAM); convention "C-1"
    (1 - eps exactly on the true class) is that of several re-implementations."""

    name = "ls"
    settings = LSSettings
    paper = "Szegedy et al. 2016, arXiv:1512.00567"
    summary = "cross-entropy on labels smoothed towards uniform (eps)"
    checks = {"eps": FRACTION,
              "convention": (lambda c: c in ("C", "C-1"), "must be C or C-1")}

    def loss(self, logits, targets, indices, stage):
        section = self.section
        if section.convention == "C":
            return F.cross_entropy(logits, targets, label_smoothing=section.eps)
        return soft_cross_entropy(logits, smoothed_targets(targets, self.num_classes, section.eps))


def smoothed_targets(targets: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """The eps/(C-1) convention: 1 - eps on the true class, eps / (C - 1) on each other class."""
    probs = torch.full((len(targets), num_classes), eps / (num_classes - 1), device=targets.device)
    return probs.scatter_(1, targets[:, None], 1.0 - eps)
