"""Soft labels learned as parameters by a meta-gradient: the `meta` method (`MetaLabels`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from colam.errors import require
from colam.methods.base import AT_LEAST_1, FRACTION, Method, one_of, soft_cross_entropy

LABELS = ("class", "instance")
# beta when method.meta.meta_lr is null. An instance row's meta-gradient is about 1/|B_t| of a class row's (its weight
# in the training part's mean loss) and it is updated about once every 1/(1 - held_out) epochs instead of every step,
# so instance labels need a far larger step (see the class docstring).
DEFAULT_META_LR = {"class": 0.1, "instance": 100.0}
DENSE_ARTIFACT_ENTRIES = 10_000_000  # learned_sample_labels.npy is written up to this many entries (40 MB)


def project_to_simplex(rows: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean projection onto the probability simplex {p >= 0, sum p = 1} (Duchi et al. 2008, Fig. 1):
    subtract the one threshold tau that makes the clipped row sum to 1."""
    descending = rows.sort(dim=1, descending=True).values
    excess = descending.cumsum(dim=1) - 1.0
    positions = torch.arange(1, rows.shape[1] + 1, device=rows.device, dtype=rows.dtype)
    support = (descending - excess / positions > 0).sum(dim=1, keepdim=True)  # >= 1: the largest entry stays
    tau = excess.gather(1, support - 1) / support
    return (rows - tau).clamp_min(0.0)


class TopKLabelStore:
    """N x C probability rows kept on the host as their k largest entries, renormalised over them: `values` (N x k,
    float32) and `indices` (N x k, int16, or int32 when C > 32768), N * k * 6 bytes. Row i is
    sum_j values[i, j] * onehot(indices[i, j]); its k indices are distinct."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, num_classes: int):
        self.values, self.indices, self.num_classes = values, indices, num_classes

    @staticmethod
    def index_dtype(num_classes: int) -> torch.dtype:
        return torch.int16 if num_classes <= 2**15 else torch.int32

    @classmethod
    def from_targets(cls, targets: torch.Tensor, num_classes: int, k: int, smoothing: float = 0.0) -> TopKLabelStore:
        """The top k of each smoothed one-hot row: the label, then the k - 1 lowest other classes (the smoothed row's
        ties, broken towards lower class numbers)."""
        targets = targets.long().cpu()
        others = torch.arange(k - 1).expand(len(targets), -1)
        others = others + (others >= targets[:, None]).long()  # the k - 1 smallest classes other than the label
        indices = torch.cat([targets[:, None], others], dim=1).to(cls.index_dtype(num_classes))
        values = torch.full((len(targets), k), smoothing / num_classes)
        values[:, 0] += 1.0 - smoothing
        return cls(values / values.sum(dim=1, keepdim=True), indices, num_classes)

    @property
    def k(self) -> int:
        return self.values.shape[1]

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes

    def gather(self, rows: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense (len(rows), C) float32 rows `rows`, on `device`."""
        rows = rows.long().cpu()
        values = self.values[rows].to(device)
        dense = torch.zeros(len(rows), self.num_classes, device=values.device)
        return dense.scatter_(1, self.indices[rows].to(device).long(), values)

    def scatter(self, rows: torch.Tensor, dense: torch.Tensor) -> None:
        """Store the top k of each dense probability row at `rows` (distinct), renormalised."""
        values, indices = dense.detach().float().topk(self.k, dim=1)
        rows = rows.long().cpu()
        self.values[rows] = (values / values.sum(dim=1, keepdim=True)).cpu()
        self.indices[rows] = indices.to(self.indices.dtype).cpu()

    def argmax(self) -> torch.Tensor:
        """Each row's most probable class (the first kept one on ties)."""
        return self.indices.gather(1, self.values.argmax(dim=1, keepdim=True)).squeeze(1).long()

    def dense(self) -> torch.Tensor:
        return self.gather(torch.arange(len(self.values)))

    def class_means(self, targets: torch.Tensor) -> torch.Tensor:
        """C x C: row c is the mean stored row of the samples whose target is c (uniform if none)."""
        c = self.num_classes
        sums = torch.zeros(c, c)
        rows = targets.long().cpu()[:, None].expand(-1, self.k)
        sums.index_put_((rows, self.indices.long()), self.values, accumulate=True)
        counts = torch.bincount(targets.long().cpu(), minlength=c).float()[:, None]
        return torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.full_like(sums, 1.0 / c))


def lookahead_meta_gradient(model: nn.Module, labels: torch.Tensor, rows: torch.Tensor, train_images: torch.Tensor,
                            held_images: torch.Tensor, held_targets: torch.Tensor,
                            lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_labels of the held-out hard-label loss of theta' = theta - lr * grad_theta L_train(theta; labels[rows])
    (steps (1) and (2) of the class docstring), and that held-out loss. The model runs through `functional_call` with
    its own parameters and copies of its buffers: no parameter is edited, no .grad is written, the running statistics
    are left as they were."""
    params = dict(model.named_parameters())
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    trainable = [name for name, param in params.items() if param.requires_grad]
    labels = labels.detach().requires_grad_(True)
    inner = soft_cross_entropy(functional_call(model, (params, buffers), (train_images,)), labels[rows])
    grads = torch.autograd.grad(inner, [params[name] for name in trainable], create_graph=True, allow_unused=True)
    lookahead = dict(params)
    lookahead.update((name, params[name] - lr * grad) for name, grad in zip(trainable, grads) if grad is not None)
    held_loss = F.cross_entropy(functional_call(model, (lookahead, buffers), (held_images,)), held_targets)
    # zero where the labels did not reach the held-out loss (no trainable parameter)
    (meta_grad,) = torch.autograd.grad(held_loss, labels, allow_unused=True, materialize_grads=True)
    return meta_grad, held_loss.detach()


@dataclass
class MetaSettings:
    labels: str = "class"  # class: a learnable C x C matrix; instance: learnable N x C rows (top-k sparse)
    meta_lr: float | None = None  # beta, the labels' projected meta-gradient step; null: 0.1 class, 100 instance
    top_k: int = 10  # instance labels: entries kept per row (at most C); host memory N * top_k * 6 bytes
    held_out: float = 0.5  # fraction of each batch held out for the meta loss on the given hard labels
    init_smoothing: float = 0.0  # labels start as (1 - eps) one-hot + eps / C; 0 starts from one-hot
    lookahead_lr: float | None = None  # alpha of theta' = theta - alpha grad; null: the epoch's train.lr


class MetaLabels(Method):
    """Soft labels learned as parameters by a meta-gradient (Vyas, Saxena, Voice 2020, arXiv:2009.09496).

    Class-wise (C x C) or instance-wise (N x C) label rows; every step, on a batch split into B_t and a held-out B_m
    (the last `round(held_out * |B|)` samples; a batch too small to split takes (3) only):

        (1) theta'  = theta - alpha * grad_theta (1/|B_t|) sum_{i in B_t} H(y_hat_i, f(x_i; theta))
        (2) y_hat  <- Proj_simplex( y_hat - beta * grad_{y_hat} (1/|B_m|) sum_{i in B_m} H(y_i, f(x_i; theta')) )
        (3) theta  <- the optimizer's step on (1/|B|) sum_{i in B} H(y_hat_i, f(x_i; theta)), with the updated y_hat

    y_i is the given (possibly noisy) hard label; nothing outside the training set is used (the validation split
    holds clean labels). The offline copies of the paper hold its abstract only, so these are our choices: alpha
    (`lookahead_lr`) the epoch's train.lr, a plain SGD step; probability rows under projected gradient descent (Duchi
    et al. 2008), which can start one-hot and still move mass to a class outside a row's support; beta (`meta_lr`)
    0.1 class-wise, 100 instance-wise (on digits with 40% noise, 100 corrects 13% of the noisy labels and keeps 91% of
    the clean ones; 30 changes no argmax, 300 keeps 42%; class-wise 0.1, 1, 10 gave test 0.891, 0.910, 0.569).

    Instance rows live on the host as their top k entries (`TopKLabelStore`, 76.9 MB for ImageNet-1k at k = 10 against
    5.12 GB dense). The lookahead uses `torch.func.functional_call` on copies of the buffers: batch statistics as in
    training, running statistics untouched; about 3x an hl step. The stage end writes `learned_labels.npy`, not
    soft_labels*.npy: `uses_soft_labels` would make the pipeline steps (colam.steps) feed it the previous step's
    estimate.
    """

    name = "meta"
    settings = MetaSettings
    paper = "Vyas, Saxena, Voice 2020, arXiv:2009.09496"
    summary = "soft labels (class C x C or instance top-k rows) learned by a one-step lookahead meta-gradient"
    uses_soft_labels = False  # it writes learned_labels.npy, but trains on no earlier step's estimate
    data_parallel = False  # a lookahead pass through the model per batch: no DDP / torch.compile
    on_device = ("class_labels",)
    checks = {"labels": one_of(LABELS),
              "meta_lr": (lambda lr: lr is None or lr > 0,
                          "must be > 0, or null for the default of method.meta.labels"),
              "top_k": AT_LEAST_1, "held_out": (lambda held: 0.0 < held < 1.0, "must be in (0, 1)"),
              "init_smoothing": FRACTION,
              "lookahead_lr": (lambda lr: lr is None or lr > 0, "must be > 0, or null for the epoch's train.lr")}
    class_labels: torch.Tensor | None = None  # C x C, on the device
    store: TopKLabelStore | None = None  # or N x C as top-k, on the host

    def __init__(self, config, num_classes, train_targets):
        super().__init__(config, num_classes, train_targets)
        self.epochs_done = 0  # picks the lookahead's lr from the schedule; part of the state for resuming
        eps = self.section.init_smoothing
        if self.section.labels == "class":
            self.class_labels = torch.eye(num_classes) * (1.0 - eps) + eps / num_classes  # smoothed one-hot rows
        else:
            self.store = TopKLabelStore.from_targets(train_targets, num_classes, min(self.section.top_k, num_classes),
                                                     eps)

    @classmethod
    def validate(cls, config):
        super().validate(config)
        section, batch_size = config.method.meta, config.train.batch_size
        held = cls.split_sizes(section.held_out, batch_size)[1]
        require(0 < held < batch_size, "method.meta.held_out", section.held_out,
                f"must leave at least one training and one held-out sample in a batch of train.batch_size="
                f"{batch_size} (it holds out {held})")

    @classmethod
    def hyperparameters(cls, config):
        return {**super().hyperparameters(config), "meta_lr": cls.meta_lr(config)}

    @staticmethod
    def meta_lr(config) -> float:
        section = config.method.meta
        return section.meta_lr if section.meta_lr is not None else DEFAULT_META_LR[section.labels]

    @staticmethod
    def split_sizes(held_out: float, batch: int) -> tuple[int, int]:
        """(training part, held-out part) of a batch of `batch` samples."""
        held = round(held_out * batch)
        return batch - held, held

    def lookahead_lr(self) -> float:
        if self.section.lookahead_lr is not None:
            return self.section.lookahead_lr
        from colam.engine import learning_rate  # the engine imports the methods: import at call time

        return learning_rate(self.config, self.epochs_done)

    def batch_labels(self, targets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The current soft label of each sample of a batch (B x C, on the targets' device)."""
        if self.class_labels is not None:
            return self.class_labels[targets]
        return self.store.gather(indices, targets.device)

    def meta_step(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                  indices: torch.Tensor) -> torch.Tensor | None:
        """Steps (1) and (2) on a batch: update the labels of its training part; returns the held-out loss of the
        lookahead model (before the update), or None for a batch too small to split."""
        train, held = self.split_sizes(self.section.held_out, len(targets))
        if train == 0 or held == 0:
            return None
        if self.class_labels is not None:
            labels, rows = self.class_labels, targets[:train]
        else:
            labels = self.store.gather(indices[:train], targets.device)
            rows = torch.arange(train, device=targets.device)
        meta_grad, held_loss = lookahead_meta_gradient(model, labels, rows, images[:train], images[train:],
                                                       targets[train:], self.lookahead_lr())
        with torch.no_grad():
            updated = project_to_simplex(labels - self.meta_lr(self.config) * meta_grad)
            if self.class_labels is not None:  # rows of classes absent from the batch stay as they were, bit for bit
                self.class_labels = torch.where(meta_grad.ne(0).any(dim=1, keepdim=True), updated, labels)
            else:
                self.store.scatter(indices[:train], updated)
        return held_loss

    def forward_loss(self, model, images, targets, indices, stage):
        self.meta_step(model, images, targets, indices)
        logits = model(images)
        return soft_cross_entropy(logits, self.batch_labels(targets, indices)), logits

    def epoch_end(self, epoch, stage):
        self.epochs_done = epoch

    def learned_classes(self) -> torch.Tensor:
        """The argmax of each training sample's learned label (class-wise: of its given label's row)."""
        if self.class_labels is not None:
            return self.class_labels.argmax(dim=1).cpu()[self.train_targets.cpu()]
        return self.store.argmax()

    def stage_report(self, stage):
        clean = getattr(self, "clean_train_targets", None)
        if clean is None:
            return {}
        given, clean, learned = self.train_targets.cpu(), clean.cpu(), self.learned_classes()
        noisy = given != clean
        noisy_count, clean_count = int(noisy.sum()), int((~noisy).sum())
        corrected, kept = int((noisy & (learned == clean)).sum()), int((~noisy & (learned == given)).sum())
        return {"noisy_labels": noisy_count, "noisy_labels_corrected": corrected,
                "noisy_labels_corrected_fraction": corrected / noisy_count if noisy_count else None,
                "clean_labels": clean_count, "clean_labels_kept": kept,
                "clean_labels_kept_fraction": kept / clean_count if clean_count else None}

    def end_stage(self, stage):
        if self.class_labels is not None:
            return {"learned_labels": self.class_labels.detach().cpu().clone()}
        artifacts = {"learned_labels": self.store.class_means(self.train_targets)}
        if len(self.store.values) * self.num_classes <= DENSE_ARTIFACT_ENTRIES:
            artifacts["learned_sample_labels"] = self.store.dense()
        return artifacts

    def state_dict(self):
        state = {"epochs_done": self.epochs_done, "class_labels": None, "label_values": None, "label_indices": None}
        if self.class_labels is not None:
            state["class_labels"] = self.class_labels.detach().cpu().clone()
        if self.store is not None:  # copies: the store is updated in place after the state is taken
            state["label_values"], state["label_indices"] = self.store.values.clone(), self.store.indices.clone()
        return state

    def load_state_dict(self, state):
        self.epochs_done = int(state.get("epochs_done", 0))
        if self.class_labels is not None and state.get("class_labels") is not None:
            self.class_labels = state["class_labels"].float().clone().to(self.device)
        if self.store is not None and state.get("label_values") is not None:
            self.store = TopKLabelStore(state["label_values"].float().clone(),
                                        state["label_indices"].to(TopKLabelStore.index_dtype(self.num_classes)).clone(),
                                        self.num_classes)
