from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colam.errors import ColamError, require
from colam.methods.base import AT_LEAST_1, POSITIVE, Method, one_of, soft_cross_entropy
from colam.seeding import derive_seed
from colam.soft_labels import (AGGREGATIONS, ESTIMATIONS, GUARDS, PEER_LABELS, OutputSums, class_peer_soft_labels,
                               guard_labels, peer_soft_labels)

STAGE1_LOSSES = ("ce", "tempered")


@dataclass
class ColamSettings:
    stages: int = 4  # m; stage 1 uses hard labels
    epochs_per_stage: int = 40  # t; m * t must equal train.epochs
    temperature: float = 2.0  # T of Eq. 4 and of the soft-label softmax; the paper recommends 1..2
    peers: int | str = "all"  # "all": one soft label per class; k: each sample averages k random same-class peers
    aggregation: str = "logits"  # average logits (the paper) or probabilities over the peers
    estimation: str = "pass"  # pass: a forward pass over the training set at each stage end (Algorithm 1);
    # online: the training logits of each stage's last epoch, summed as they are computed (no extra pass)
    stage1_loss: str = "ce"  # ce: plain cross-entropy on the hard labels (hard-label SGD, as Fig. 1a reads stage 1);
    # tempered: H(y, softmax(z / T)), Algorithm 1 line 5 as written (with T != 1 it changes the first soft labels)
    peer_labels: str = "sample"  # with peers: k, sample: every sample its own label from k random same-class peers
    # (N x C); class: one label per class from k random peers of the class (C x C, Sec. 3.3's reading)
    guard: str = "anchor"  # a stage-end label row whose own class is not its largest entry (a collapsed snapshot):
    # anchor: half the row, half the hard label (chosen on Fashion-MNIST's validation split, README "Real data");
    # keep: the row of the labels before (the hard label after stage 1); none: kept (Algorithm 1 as written).
    # Rows that favour their class are never changed; every collapsed row is counted in the stage's metrics


class Colam(Method):
    """COLAM: co-learning of the network and soft labels by alternating minimisation (Li, Xiong, An, Xu, Dou 2022,
    Neural Processing Letters; Algorithm 1, Eq. 4-6).

    m stages of t epochs (m * t = the usual budget): stage 1 trains on the hard labels; every stage end re-estimates the
    soft labels from the model (`colam.soft_labels`), in a forward pass over the training set (`estimation: pass`) or
    from the last epoch's training logits (`online`, no extra pass); stages 2..m minimise Eq. 4,
    H(y_soft, softmax(f(x) / T)). The choices the paper leaves open are settings (`stage1_loss`, `peers`/`peer_labels`,
    `guard`), explained in docs/methods.md.
    """

    name = "colam"
    settings = ColamSettings
    headline = ("temperature",)
    short_names = {"temperature": "T", "stages": "m", "epochs_per_stage": "t", "peers": "peers"}
    paper = "Li et al. 2022, Neural Processing Letters, doi:10.1007/s11063-022-10830-4"
    summary = "m stages; stage 1 hard labels, then class soft labels re-estimated at each stage end"
    uses_soft_labels = True
    later_defaults = {"estimation": "pass", "stage1_loss": "ce", "peer_labels": "sample", "guard": "none"}
    on_device = ("soft_labels",)
    checks = {"stages": AT_LEAST_1, "epochs_per_stage": AT_LEAST_1, "temperature": POSITIVE,
              "peers": (lambda peers: peers == "all" or (isinstance(peers, int) and peers >= 1),
                        "must be 'all' or an integer >= 1"),
              "aggregation": one_of(AGGREGATIONS), "estimation": one_of(ESTIMATIONS),
              "stage1_loss": one_of(STAGE1_LOSSES), "peer_labels": one_of(PEER_LABELS), "guard": one_of(GUARDS)}
    soft_labels: torch.Tensor | None = None  # C x C, row = class
    sample_soft_labels: torch.Tensor | None = None  # N x C with k random peers, kept on the host
    sums: OutputSums | None = None  # the outputs gathered for the next stage end
    accumulating = False  # online: this is a stage's last epoch, whose training logits are summed

    def __init__(self, config, num_classes, train_targets):
        super().__init__(config, num_classes, train_targets)
        self.report: dict = {}  # what the last stage end found in its labels (stage_report)

    @classmethod
    def validate(cls, config):
        super().validate(config)
        section, epochs = config.method.colam, config.train.epochs
        require(section.stages * section.epochs_per_stage == epochs, "method.colam.stages",
                section.stages, f"times method.colam.epochs_per_stage ({section.epochs_per_stage}) must equal "
                                f"train.epochs ({epochs})")

    @classmethod
    def check_data(cls, config, class_counts):
        peers, smallest = config.method.colam.peers, min(class_counts)
        require(peers == "all" or peers <= smallest, "method.colam.peers", peers,
                f"exceeds the smallest class's {smallest} training samples")

    @classmethod
    def stage_epochs(cls, config):
        return [config.method.colam.epochs_per_stage] * config.method.colam.stages

    def to(self, device):
        super().to(device)
        if self.sums is not None:
            self.sums = self._new_sums(self.sums.state_dict())
        return self

    def _new_sums(self, state: dict | None = None) -> OutputSums:
        section = self.section
        samples = len(self.train_targets) if section.peers != "all" else None
        sums = OutputSums(self.num_classes, section.aggregation, samples, self.device)
        if state is not None:
            sums.load_state_dict(state)
        return sums

    def epoch_start(self, epoch, stage):
        self.accumulating = self.section.estimation == "online" and epoch == stage * self.section.epochs_per_stage
        if self.accumulating:
            self.sums = self._new_sums()

    def epoch_end(self, epoch, stage):
        if self.accumulating:  # every rank is here: sum the ranks' shares now, before a step saves them
            self.sums.reduce()
            self.accumulating = False

    def loss(self, logits, targets, indices, stage):
        if self.accumulating:
            self.sums.add(logits, targets, indices)
        if stage == 1:
            scale = self.section.temperature if self.section.stage1_loss == "tempered" else 1.0
            return F.cross_entropy(logits / scale, targets)
        if self.sample_soft_labels is not None:
            targets_soft = self.sample_soft_labels[indices.cpu()].to(logits.device, non_blocking=True)
        else:
            targets_soft = self.soft_labels[targets]
        return soft_cross_entropy(logits / self.section.temperature, targets_soft)

    @classmethod
    def needs_every_sample(cls, config):
        return config.method.colam.estimation == "online" and config.method.colam.peers != "all"

    def needs_outputs(self, stage):
        # Algorithm 1 re-estimates after every stage, the last one included; online needs no pass
        return self.section.estimation == "pass"

    def observe(self, outputs, targets, indices):
        if self.sums is None:
            self.sums = self._new_sums()
        self.sums.add(outputs, targets, indices)

    def end_stage(self, stage):
        section = self.section
        if self.sums is None:
            raise ColamError(f"method.colam.estimation: no outputs were gathered for the soft labels of stage {stage} "
                             f"({section.estimation} estimation)")
        sums, self.sums, self.accumulating = self.sums, None, False
        sums.reduce()  # a distributed run: every rank now holds the sums of the whole training set
        if section.peers == "all":
            labels = sums.class_labels(section.temperature)
        else:
            draw = class_peer_soft_labels if section.peer_labels == "class" else peer_soft_labels
            generator = torch.Generator().manual_seed(derive_seed(self.config.seed, stage))
            labels = draw(sums.sample_outputs(), self.train_targets.to(sums.outputs.device), self.num_classes,
                          section.peers, section.temperature, section.aggregation, generator)
        if section.peers != "all" and section.peer_labels == "sample":
            # per-sample labels train; the class labels from every peer are kept beside them
            samples, collapsed = guard_labels(labels.cpu(), self.train_targets, self.sample_soft_labels, section.guard)
            self.sample_soft_labels, self.report = samples, self._report(collapsed, self.train_targets)
            self.soft_labels = sums.class_labels(section.temperature).to(self.device)
            return {"soft_labels": self.soft_labels, "sample_soft_labels": samples}
        classes = torch.arange(self.num_classes)
        labels, collapsed = guard_labels(labels.to(self.device), classes, self.soft_labels, section.guard)
        self.soft_labels, self.report = labels, self._report(collapsed, classes)
        return {"soft_labels": labels}

    def _report(self, collapsed: torch.Tensor, row_classes: torch.Tensor) -> dict:
        """How many label rows did not favour their own class before the guard, and of which classes."""
        classes = sorted(set(row_classes[collapsed.cpu()].tolist()))
        return {"collapsed_rows": int(collapsed.sum()), "collapsed_classes": classes, "guard": self.section.guard}

    def stage_report(self, stage):
        return dict(self.report)

    def state_dict(self):
        # The online sums of a stage whose end is estimated by a later step (colam.steps) travel in
        # the state; a whole run estimates at once and saves None.
        return {"soft_labels": self.soft_labels, "sample_soft_labels": self.sample_soft_labels,
                "online_sums": self.sums.state_dict() if self.sums is not None else None}

    def load_state_dict(self, state):
        self.soft_labels = state.get("soft_labels")
        self.sample_soft_labels = state.get("sample_soft_labels")
        saved = state.get("online_sums")
        self.sums = self._new_sums(saved) if saved is not None else None
        self.accumulating = False
        self.to(self.device)
