from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colam.errors import ColamError, require
from colam.methods.base import Method, soft_cross_entropy
from colam.seeding import derive_seed
from colam.soft_labels import (AGGREGATIONS, ESTIMATIONS, GUARDS, PEER_LABELS, OutputSums, class_peer_soft_labels,
                               guard_labels, peer_soft_labels)


STAGE1_LOSSES = ("ce", "tempered")
# The value every run had before a key existed: a run at that value keeps its earlier identity and variant.
EARLIER = {"estimation": "pass", "stage1_loss": "ce", "peer_labels": "sample", "guard": "none"}


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
    """COLAM: co-learning of the network and soft labels by alternating minimisation
    (Li, Xiong, An, Xu, Dou 2022, Neural Processing Letters; Algorithm 1, Eq. 4-6).

    Training is split into m stages of t epochs (m * t = the usual epoch budget, so COLAM costs
    what vanilla training costs plus one forward pass over the training set per stage).
    Stage 1 trains on the hard labels; at the end of every stage the soft labels are re-estimated
    from the current model (`colam.soft_labels`), and stages 2..m minimise Eq. 4,
    H(y_soft, softmax(f(x) / T)).

    The soft labels come from the stage-end model's outputs in a forward pass over the training
    set (`estimation: pass`, Algorithm 1), or, with `estimation: online`, from the logits that
    training computes anyway in the stage's last epoch (augmented inputs, train-mode BatchNorm,
    the model moving during that epoch), which costs no extra pass.

    Choices the paper leaves open, each a setting (README, "Recipe"):
    - `stage1_loss`: stage 1 trains on plain cross-entropy (`ce`, hard-label SGD as Fig. 1a reads
      it) or on H(y, softmax(z / T)) as Algorithm 1's line 5 writes it (`tempered`). The two are
      not the same training with another learning rate: the loss sees the logits divided by T, so
      the gradients and the learned logits differ, and so do the first soft labels, softmax(mean
      z / T) (README: 0.66 against 0.57 of a class's mass on itself at T = 2 on the digits).
    - `peers: k` with `peer_labels`: every sample its own label from k random same-class peers
      (`sample`), or one label per class from k random peers (`class`).
    - `guard`: a stage-end row whose own class is not its largest entry is counted in the stage's
      metrics; after stage 1 nothing else ties training to the hard labels, so such a row is a
      fixed point that every later stage re-learns and re-estimates. `keep` or `anchor` repairs
      those rows only (`colam.soft_labels.guard_labels`); `none` is Algorithm 1 as written.
    """

    name = "colam"
    settings = ColamSettings
    headline = ("temperature",)
    short_names = {"temperature": "T", "stages": "m", "epochs_per_stage": "t", "peers": "peers"}
    paper = "Li et al. 2022, Neural Processing Letters, doi:10.1007/s11063-022-10830-4"
    summary = "m stages; stage 1 hard labels, then class soft labels re-estimated at each stage end"
    uses_soft_labels = True
    later_defaults = EARLIER

    def __init__(self, config, num_classes, train_targets):
        super().__init__(config, num_classes, train_targets)
        self.section = config.method.colam
        self.soft_labels: torch.Tensor | None = None  # C x C, row = class
        self.sample_soft_labels: torch.Tensor | None = None  # N x C with k random peers, kept on the host
        self.device = torch.device("cpu")
        self.sums: OutputSums | None = None  # the outputs gathered for the next stage end
        self.accumulating = False  # online: this is a stage's last epoch, whose training logits are summed
        self.report: dict = {}  # what the last stage end found in its labels (stage_report)

    @classmethod
    def validate(cls, config):
        section, epochs = config.method.colam, config.train.epochs
        require(section.stages >= 1, "method.colam.stages", section.stages, "must be >= 1")
        require(section.epochs_per_stage >= 1, "method.colam.epochs_per_stage", section.epochs_per_stage, "must be >= 1")
        require(section.stages * section.epochs_per_stage == epochs, "method.colam.stages",
                section.stages, f"times method.colam.epochs_per_stage ({section.epochs_per_stage}) must equal "
                                f"train.epochs ({epochs})")
        require(section.temperature > 0, "method.colam.temperature", section.temperature, "must be > 0")
        peers = section.peers
        require(peers == "all" or (isinstance(peers, int) and peers >= 1), "method.colam.peers", peers,
                "must be 'all' or an integer >= 1")
        require(section.aggregation in AGGREGATIONS, "method.colam.aggregation", section.aggregation,
                f"must be one of {', '.join(AGGREGATIONS)}")
        require(section.estimation in ESTIMATIONS, "method.colam.estimation", section.estimation,
                f"must be one of {', '.join(ESTIMATIONS)}")
        require(section.stage1_loss in STAGE1_LOSSES, "method.colam.stage1_loss", section.stage1_loss,
                f"must be one of {', '.join(STAGE1_LOSSES)}")
        require(section.peer_labels in PEER_LABELS, "method.colam.peer_labels", section.peer_labels,
                f"must be one of {', '.join(PEER_LABELS)}")
        require(section.guard in GUARDS, "method.colam.guard", section.guard, f"must be one of {', '.join(GUARDS)}")

    @classmethod
    def check_data(cls, config, class_counts):
        peers, smallest = config.method.colam.peers, min(class_counts)
        require(peers == "all" or peers <= smallest, "method.colam.peers", peers,
                f"exceeds the smallest class's {smallest} training samples")

    @classmethod
    def stage_epochs(cls, config):
        return [config.method.colam.epochs_per_stage] * config.method.colam.stages

    @classmethod
    def hyperparameters(cls, config):
        section = config.method.colam
        settings = {"stages": section.stages, "epochs_per_stage": section.epochs_per_stage,
                    "temperature": section.temperature, "peers": section.peers, "aggregation": section.aggregation}
        # keys added later appear where they differ from what every earlier run did, so that earlier
        # runs keep their variant (MLflow, compare)
        for key, earlier in EARLIER.items():
            if getattr(section, key) != earlier:
                settings[key] = getattr(section, key)
        return settings

    def to(self, device):
        self.device = torch.device(device)
        if self.soft_labels is not None:
            self.soft_labels = self.soft_labels.to(self.device)
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
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, stage))
        classes = torch.arange(self.num_classes)
        if section.peers == "all":
            labels = sums.class_labels(section.temperature)
        elif section.peer_labels == "class":
            labels = class_peer_soft_labels(sums.sample_outputs(), self.train_targets.to(sums.outputs.device),
                                            self.num_classes, section.peers, section.temperature,
                                            section.aggregation, generator)
        else:  # per-sample labels train; the class labels from every peer are kept beside them
            samples = peer_soft_labels(sums.sample_outputs(), self.train_targets.to(sums.outputs.device),
                                       self.num_classes, section.peers, section.temperature, section.aggregation,
                                       generator)
            samples, collapsed = guard_labels(samples.cpu(), self.train_targets, self.sample_soft_labels, section.guard)
            self.sample_soft_labels, self.report = samples, self._report(collapsed, self.train_targets)
            self.soft_labels = sums.class_labels(section.temperature).to(self.device)
            return {"soft_labels": self.soft_labels, "sample_soft_labels": samples}
        labels, collapsed = guard_labels(labels.to(self.device), classes, self.soft_labels, section.guard)
        self.soft_labels, self.report = labels, self._report(collapsed, classes)
        return {"soft_labels": labels}

    def _report(self, collapsed: torch.Tensor, row_classes: torch.Tensor) -> dict:
        """How many label rows did not favour their own class before the guard, and of which classes."""
        classes = sorted(set(row_classes[collapsed.cpu()].tolist()))
        return {"collapsed_rows": int(collapsed.sum()), "collapsed_classes": classes,
                "guard": self.section.guard}

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
