import torch.nn.functional as F

from colam.methods.base import Method


class HardLabels(Method):
    """Plain cross-entropy on the one-hot labels: the baseline ("HL" in the paper's tables)."""

    name = "hl"
    paper = "vanilla training (Li et al. 2022, Sec. 4.2)"
    summary = "cross-entropy on hard labels"

    def loss(self, logits, targets, indices, stage):
        return F.cross_entropy(logits, targets)
