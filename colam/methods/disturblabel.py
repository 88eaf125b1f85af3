from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colam.methods.base import UNIT, Method


@dataclass
class DisturbLabelSettings:
    alpha: float = 0.1  # probability that a sample's label is redrawn uniformly (Xie et al. 2016)


class DisturbLabel(Method):
    """DisturbLabel (Xie et al. 2016, "DisturbLabel: Regularizing CNN on the Loss Layer", Sec. 3.1).

    Each iteration, every sample's label is with probability alpha replaced by a label drawn uniformly from all C
    classes (possibly the true one), so the true class is kept with probability 1 - alpha (C - 1) / C. The draw uses
    torch's global generator, which the engine seeds at every epoch, so runs and resumed runs repeat exactly.
    """

    name = "disturblabel"
    settings = DisturbLabelSettings
    paper = "Xie et al. 2016, CVPR, arXiv:1605.00055"
    summary = "hard labels, each redrawn uniformly with probability alpha per iteration"
    checks = {"alpha": UNIT}

    def loss(self, logits, targets, indices, stage):
        return F.cross_entropy(logits, disturb(targets, self.num_classes, self.section.alpha))


def disturb(targets: torch.Tensor, num_classes: int, alpha: float) -> torch.Tensor:
    redraw = torch.rand(targets.shape, device=targets.device) < alpha
    random_labels = torch.randint(num_classes, targets.shape, device=targets.device)
    return torch.where(redraw, random_labels, targets)
