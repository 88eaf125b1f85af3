from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colam import distributed
from colam.methods.base import UNIT, Method, soft_cross_entropy


@dataclass
class OLSSettings:
    alpha: float = 0.5  # weight of the hard-label loss; 1 - alpha on the online soft labels (Zhang et al. 2021)
    # (the soft labels start at zero: the first epoch trains on alpha * CE alone, as in the public implementations)


class OnlineLabelSmoothing(Method):
    """Online label smoothing, OLS (Zhang, Jiang, Hou, Wei, Han, Li, Cheng 2021, "Delving Deep into Label Smoothing",
    IEEE Transactions on Image Processing 30, arXiv:2011.12562; the OLS update of the soft label matrix and its loss
    alpha * CE(f(x), y) + (1 - alpha) * H(S[y], softmax(f(x)))).

    Row y of the C x C matrix S is the normalised mean of softmax(f(x)) over last epoch's correctly classified samples
    of label y. S starts at zero, as in the public implementations (zhangchbin's and Kurumi233's OnlineLabelSmoothing).
    A row with no correct sample in an epoch keeps its value here (zhangchbin's sets 1/C, Kurumi233's zero); the
    accumulation is a vectorised index_add_ (Kurumi233's `grad[labels] += p` drops a batch's repeated labels). S, the
    sums and counts are the state.
    """

    name = "ols"
    settings = OLSSettings
    paper = "Zhang et al. 2021, IEEE TIP, arXiv:2011.12562"
    summary = "alpha*CE plus (1-alpha)*CE towards per-class soft labels averaged from last epoch's correct predictions"
    checks = {"alpha": UNIT}
    on_device = ("soft_labels", "sums", "counts")

    def __init__(self, config, num_classes, train_targets):
        super().__init__(config, num_classes, train_targets)
        self.soft_labels = torch.zeros(num_classes, num_classes)  # S: row = class
        self.sums = torch.zeros(num_classes, num_classes)  # this epoch's accumulated probabilities
        self.counts = torch.zeros(num_classes)  # this epoch's correctly classified samples per class

    def loss(self, logits, targets, indices, stage):
        self.accumulate(logits, targets)
        hard, alpha = F.cross_entropy(logits, targets), self.section.alpha
        if alpha == 1.0:
            return hard
        return alpha * hard + (1.0 - alpha) * soft_cross_entropy(logits, self.soft_labels[targets])

    @torch.no_grad()
    def accumulate(self, logits, targets):
        probs = F.softmax(logits.detach().float(), dim=1)
        correct = probs.argmax(dim=1) == targets
        # Masked adds instead of boolean indexing: no data-dependent shape, so no GPU sync per step (a wrong
        # prediction adds exact zeros).
        self.sums.index_add_(0, targets, probs * correct[:, None].to(probs.dtype))
        self.counts.index_add_(0, targets, correct.to(self.counts.dtype))

    def epoch_end(self, epoch, stage):
        distributed.all_reduce_sum(self.sums)  # a torchrun job: every rank's samples
        distributed.all_reduce_sum(self.counts)
        # S of a row with a correct sample: its probabilities normalised to sum 1 (= their mean, renormalised against
        # rounding); other rows keep theirs
        normalised = self.sums / self.sums.sum(dim=1, keepdim=True).clamp(min=torch.finfo(self.sums.dtype).tiny)
        self.soft_labels = torch.where(self.counts[:, None] > 0, normalised, self.soft_labels)
        self.sums.zero_()
        self.counts.zero_()

    def state_dict(self):
        return {"soft_labels": self.soft_labels, "sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state):
        self.soft_labels, self.sums, self.counts = (state[key].clone() for key in ("soft_labels", "sums", "counts"))
        self.to(self.device)
