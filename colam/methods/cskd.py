from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colam.methods.base import NON_NEGATIVE, POSITIVE, Method


@dataclass
class CSKDSettings:
    temperature: float = 4.0  # T of the KL between a same-class partner's and the sample's outputs (Yun et al. 2020)
    lam: float = 1.0  # lambda_cls: weight of the class-wise distillation term


class ClassWiseSelfKD(Method):
    """CS-KD: class-wise self-knowledge distillation (Yun, Park, Lee, Shin 2020, "Regularizing Class-wise Predictions
    via Self-knowledge Distillation", CVPR; Eq. 1-2 of Sec. 3.1): `cskd_loss` towards a same-class partner x' (the
    partner detached: the paper's fixed copy of the parameters).

    Partners are drawn uniformly among the *other* samples of the class (the authors' sampler may draw the sample
    itself) from torch's global generator, which the engine reseeds every epoch, so a resumed run repeats the draw. x
    and x' go through ONE forward pass, so BatchNorm's batch statistics are those of both (the authors' code runs two):
    about 2x hard-label training's compute.
    """

    name = "cskd"
    settings = CSKDSettings
    headline = ("temperature",)
    paper = "Yun et al. 2020, CVPR, arXiv:2003.13964"
    summary = "cross-entropy plus lam*T^2*KL towards a same-class partner's softened prediction"
    data_parallel = False  # a second pass (the partner) per batch: no DDP / torch.compile
    checks = {"temperature": POSITIVE, "lam": NON_NEGATIVE}
    train_data = None  # the training set, whose images the partners are (attach_data)

    def __init__(self, config, num_classes, train_targets):
        super().__init__(config, num_classes, train_targets)
        self.groups = class_groups(train_targets, num_classes)

    def attach_data(self, data):
        self.train_data = data.train

    def forward_loss(self, model, images, targets, indices, stage):
        if self.train_data is None:
            raise RuntimeError("cskd: attach_data(data) must be called before training (colam.engine.prepare does)")
        partners = same_class_partners(indices.cpu(), self.train_targets, groups=self.groups)
        partner_images = torch.stack([self.train_data[j][0] for j in partners.tolist()])
        both = model(torch.cat([images, partner_images.to(images.device, non_blocking=True)]))
        logits, partner_logits = both[: len(images)], both[len(images):]
        return cskd_loss(logits, partner_logits, targets, self.section.temperature, self.section.lam), logits


def cskd_loss(logits: torch.Tensor, partner_logits: torch.Tensor, targets: torch.Tensor, temperature: float,
              lam: float) -> torch.Tensor:
    """CE(logits, y) + lam * T^2 * mean_i KL(softmax(partner_i / T) || softmax(logits_i / T)), partner detached (T^2
    keeps the gradient scale independent of T, as in the authors' alinlab/cs-kd `KDLoss`)."""
    ce = F.cross_entropy(logits, targets)
    if lam == 0:
        return ce
    target = F.softmax(partner_logits.detach() / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="batchmean")
    return ce + lam * temperature**2 * kl


def class_groups(targets: torch.Tensor, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """The training set grouped by label, for `same_class_partners`: `order` lists the sample indices sorted by class
    (stable), class c occupies order[start[c] : start[c] + count[c]], and `rank[i]` is sample i's position within its
    class."""
    targets = torch.as_tensor(targets).long().cpu()
    order = torch.argsort(targets, stable=True)
    count = torch.bincount(targets, minlength=num_classes or 0)
    start = torch.cumsum(count, 0) - count
    position = torch.argsort(order)  # the inverse permutation: sample i's place in `order`
    return {"order": order, "count": count, "start": start, "rank": position - start[targets]}


def same_class_partners(indices: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None,
                        *, groups: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """For each training index in `indices`, a uniformly drawn other training index with the same label in `targets`
    (all training labels); a sample whose class has no other sample is its own partner. Vectorised; one uniform draw per
    index from `generator` (None: torch's global one). `groups` (from `class_groups(targets)`) saves regrouping the
    training set at every call."""
    groups = groups if groups is not None else class_groups(targets)
    indices = torch.as_tensor(indices).long().cpu()
    labels = torch.as_tensor(targets).long().cpu()[indices]
    count, start, own = groups["count"][labels], groups["start"][labels], groups["rank"][indices]
    draw = torch.rand(len(indices), generator=generator, dtype=torch.float64)
    others = (count - 1).clamp(min=1)
    pick = torch.minimum((draw * others).long(), others - 1)  # uniform in [0, count - 1)
    pick = torch.where(count > 1, pick + (pick >= own).long(), own)  # skip the sample itself
    return groups["order"][start + pick]
