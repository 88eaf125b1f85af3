from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colam import distributed
from colam.errors import require
from colam.methods.base import Method, soft_cross_entropy


@dataclass
class OLSSettings:
    alpha: float = 0.5  # weight of the hard-label loss; 1 - alpha on the online soft labels (Zhang et al. 2021)
    # (the soft labels start at zero: the first epoch trains on alpha * CE alone, as in the public implementations)


class OnlineLabelSmoothing(Method):
    """Online label smoothing, OLS (Zhang, Jiang, Hou, Wei, Han, Li, Cheng 2021, "Delving Deep into Label
    Smoothing", IEEE Transactions on Image Processing 30, arXiv:2011.12562; the OLS update of the soft
    label matrix and its loss alpha * L_hard + (1 - alpha) * L_soft).

    A C x C matrix S holds one soft label per class (row y). During epoch t every correctly
    classified training sample (argmax f(x) = y, on the labels training sees) adds its predicted
    distribution softmax(f(x)) (detached) to row y of an accumulator, and row y counts it; at the
    end of the epoch row y of S becomes the normalised mean of what it accumulated, and S supervises
    epoch t + 1:

        L = alpha * CE(f(x), y) + (1 - alpha) * H(S[y], softmax(f(x)))

    S starts at zero, as in the public implementations (the authors' zhangchbin/OnlineLabelSmoothing,
    cifar/scripts/train_cifar_all_methods.py; and Kurumi233/OnlineLabelSmoothing, models/OLS.py): the
    first epoch trains on alpha * CE alone. A row whose class had no correctly classified sample in an
    epoch keeps its previous value here; the two implementations differ on that row, zhangchbin's sets
    it to the uniform 1/C and Kurumi233's to zero. A class never predicted correctly keeps the zero row
    and so the hard-label term only. The accumulation is a vectorised index_add_ (Kurumi233's
    `grad[labels] += p` drops repeated labels of a batch; zhangchbin's loops over the samples). S, the accumulator and
    the counts are the method's state, so a resumed run repeats the uninterrupted one.

    Cost: that of hard-label training plus a C x C update per batch.
    """

    name = "ols"
    settings = OLSSettings
    paper = "Zhang et al. 2021, IEEE TIP, arXiv:2011.12562"
    summary = "alpha*CE plus (1-alpha)*CE towards per-class soft labels averaged from last epoch's correct predictions"

    def __init__(self, config, num_classes, train_targets):
        super().__init__(config, num_classes, train_targets)
        self.alpha = config.method.ols.alpha
        self.device = torch.device("cpu")
        self.soft_labels = torch.zeros(num_classes, num_classes)  # S: row = class
        self.sums = torch.zeros(num_classes, num_classes)  # this epoch's accumulated probabilities
        self.counts = torch.zeros(num_classes)  # this epoch's correctly classified samples per class

    @classmethod
    def validate(cls, config):
        alpha = config.method.ols.alpha
        require(0.0 <= alpha <= 1.0, "method.ols.alpha", alpha, "must be in [0, 1]")

    @classmethod
    def hyperparameters(cls, config):
        return {"alpha": config.method.ols.alpha}

    def to(self, device):
        self.device = torch.device(device)
        self.soft_labels, self.sums, self.counts = (t.to(self.device) for t in (self.soft_labels, self.sums,
                                                                                  self.counts))
        return self

    def loss(self, logits, targets, indices, stage):
        self.accumulate(logits, targets)
        hard = F.cross_entropy(logits, targets)
        if self.alpha == 1.0:
            return hard
        return self.alpha * hard + (1.0 - self.alpha) * soft_cross_entropy(logits, self.soft_labels[targets])

    @torch.no_grad()
    def accumulate(self, logits, targets):
        probs = F.softmax(logits.detach().float(), dim=1)
        correct = probs.argmax(dim=1) == targets
        # Masked adds instead of boolean indexing: no data-dependent shape, so no GPU sync per step
        # (a wrong prediction adds exact zeros).
        self.sums.index_add_(0, targets, probs * correct[:, None].to(probs.dtype))
        self.counts.index_add_(0, targets, correct.to(self.counts.dtype))

    def epoch_end(self, epoch, stage):
        distributed.all_reduce_sum(self.sums)  # a torchrun job: every rank's samples
        distributed.all_reduce_sum(self.counts)
        self.soft_labels = next_soft_labels(self.soft_labels, self.sums, self.counts)
        self.sums.zero_()
        self.counts.zero_()

    def state_dict(self):
        return {"soft_labels": self.soft_labels, "sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state):
        self.soft_labels = state["soft_labels"].clone()
        self.sums = state["sums"].clone()
        self.counts = state["counts"].clone()
        self.to(self.device)


def next_soft_labels(previous: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """S for the next epoch: each row with a correct sample is its accumulated probabilities
    normalised to sum 1 (= their mean, renormalised against rounding); other rows keep `previous`."""
    seen = counts > 0
    normalised = sums / sums.sum(dim=1, keepdim=True).clamp(min=torch.finfo(sums.dtype).tiny)
    return torch.where(seen[:, None], normalised, previous)
