import torch
import torch.nn.functional as F

from colam.errors import ColamError, require
from colam.methods.base import Method, soft_cross_entropy
from colam.seeding import derive_seed
from colam.soft_labels import AGGREGATIONS, ESTIMATIONS, OutputSums, peer_soft_labels


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

    Stage 1 uses the plain cross-entropy. Algorithm 1 writes T in line 5 too; with one-hot targets
    T only rescales the logits (an effective change of learning rate), and the paper's Fig. 1a
    reads stage 1 as hard-label SGD, which plain cross-entropy makes exact.
    """

    name = "colam"
    paper = "Li et al. 2022, Neural Processing Letters, doi:10.1007/s11063-022-10830-4"
    summary = "m stages; stage 1 hard labels, then class soft labels re-estimated at each stage end"
    uses_soft_labels = True

    def __init__(self, config, num_classes, train_targets):
        super().__init__(config, num_classes, train_targets)
        self.section = config.method.colam
        self.soft_labels: torch.Tensor | None = None  # C x C, row = class
        self.sample_soft_labels: torch.Tensor | None = None  # N x C with k random peers, kept on the host
        self.device = torch.device("cpu")
        self.sums: OutputSums | None = None  # the outputs gathered for the next stage end
        self.accumulating = False  # online: this is a stage's last epoch, whose training logits are summed

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
        if section.estimation != "pass":  # runs from before the key existed keep their variant (MLflow, compare)
            settings["estimation"] = section.estimation
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
            return F.cross_entropy(logits, targets)
        if self.sample_soft_labels is not None:
            targets_soft = self.sample_soft_labels[indices.cpu()].to(logits.device, non_blocking=True)
        else:
            targets_soft = self.soft_labels[targets]
        return soft_cross_entropy(logits / self.section.temperature, targets_soft)

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
        artifacts = {"soft_labels": sums.class_labels(section.temperature)}
        self.soft_labels = artifacts["soft_labels"].to(self.device)
        if section.peers != "all":
            generator = torch.Generator().manual_seed(derive_seed(self.config.seed, stage))
            targets = self.train_targets.to(sums.outputs.device)
            artifacts["sample_soft_labels"] = peer_soft_labels(sums.sample_outputs(), targets, self.num_classes,
                                                               section.peers, section.temperature,
                                                               section.aggregation, generator)
            self.sample_soft_labels = artifacts["sample_soft_labels"].cpu()
        return artifacts

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
