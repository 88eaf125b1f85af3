from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colam.errors import require
from colam.methods.base import Method, soft_cross_entropy


@dataclass
class LSSettings:
    eps: float = 0.1  # Szegedy et al. 2016, Eq. 1 of the COLAM paper
    convention: str = "C"  # "C": eps/C to every class (torch's label_smoothing); "C-1": eps/(C-1) to wrong classes


class LabelSmoothing(Method):
    """Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture"; Eq. 1 of COLAM).

    Convention "C": y_soft = (1 - eps) y + eps / C, identical to torch's
    `cross_entropy(label_smoothing=eps)`. Convention "C-1": the true class keeps exactly 1 - eps and
    each wrong class gets eps / (C - 1), as in several re-implementations.
    """

    name = "ls"
    settings = LSSettings
    paper = "Szegedy et al. 2016, arXiv:1512.00567"
    summary = "cross-entropy on labels smoothed towards uniform (eps)"

    @classmethod
    def validate(cls, config):
        section = config.method.ls
        require(0.0 <= section.eps < 1.0, "method.ls.eps", section.eps, "must be in [0, 1)")
        require(section.convention in ("C", "C-1"), "method.ls.convention", section.convention, "must be C or C-1")

    @classmethod
    def hyperparameters(cls, config):
        return {"eps": config.method.ls.eps, "convention": config.method.ls.convention}

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor, stage: int) -> torch.Tensor:
        section = self.config.method.ls
        if section.convention == "C":
            return F.cross_entropy(logits, targets, label_smoothing=section.eps)
        return soft_cross_entropy(logits, smoothed_targets(targets, self.num_classes, section.eps))


def smoothed_targets(targets: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """The eps/(C-1) convention: 1 - eps on the true class, eps / (C - 1) on each other class."""
    probs = torch.full((len(targets), num_classes), eps / (num_classes - 1), device=targets.device)
    return probs.scatter_(1, targets[:, None], 1.0 - eps)
