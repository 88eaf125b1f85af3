from dataclasses import dataclass

import torch.nn.functional as F

from colam.methods.base import NON_NEGATIVE, Method


@dataclass
class CPSettings:
    beta: float = 0.1  # weight of the entropy bonus (Pereyra et al. 2017)


class ConfidencePenalty(Method):
    """Confidence penalty (Pereyra et al. 2017, "Regularizing Neural Networks by Penalizing Confident Output
    Distributions", Eq. 2): L = CE(y, p) - beta * H(p), which rewards high-entropy outputs."""

    name = "cp"
    settings = CPSettings
    paper = "Pereyra et al. 2017, arXiv:1701.06548"
    summary = "cross-entropy minus beta times the output entropy"
    checks = {"beta": NON_NEGATIVE}

    def loss(self, logits, targets, indices, stage):
        log_probs = F.log_softmax(logits, dim=1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=1).mean()
        return F.nll_loss(log_probs, targets) - self.section.beta * entropy
