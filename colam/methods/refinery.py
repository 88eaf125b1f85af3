import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from colam.errors import require
from colam.methods.base import AT_LEAST_1, Method, soft_cross_entropy
from colam.models import build_model
from colam.seeding import derive_seed

# derive_seed stream of generation g's initial weights: apart from the epoch streams (colam.feed.epoch_seed).
REINIT_STREAM = 1_000_000_007


@dataclass
class RefinerySettings:
    generations: int = 2  # a model on hard labels, then generations - 1 students on the refiner's outputs
    epochs_per_generation: int | None = None  # None: train.epochs / generations; the paper gives each generation
    # a full budget, i.e. train.epochs = generations x a baseline's epochs (2x its cost for 2 generations);
    # generations * epochs_per_generation must equal train.epochs. The lr schedule restarts with each generation


class LabelRefinery(Method):
    """Label Refinery (Bagherinezhad, Horton, Rastegari, Farhadi 2018, "Label Refinery: Improving ImageNet
    Classification through Label Progression", arXiv:1805.02641; Sec. 3).

    Generation 1 trains on the hard labels. Each later generation g trains a fresh network on
    H(softmax(R(x)), softmax(f(x))), R the frozen network of generation g - 1 run in eval mode on the same augmented
    batch (the paper's on-the-fly labels of each crop). At its start (`stage_start`, also in a process resuming there)
    R takes the trained weights, the model is re-initialised as a fresh build of the same model seeded
    derive_seed(seed, REINIT_STREAM + g) on CPU (the same on every device), the optimizer's momentum is cleared and the
    lr schedule restarts. R's weights are the state, so a run resumed mid-generation uses the same refiner.
    """

    name = "refinery"
    settings = RefinerySettings
    restarts_schedule = True
    paper = "Bagherinezhad et al. 2018, arXiv:1805.02641"
    summary = "generations of fresh models, each trained on the previous one's predictions of the same crops"
    data_parallel = False  # re-initialises the model at each generation: not under DDP / torch.compile
    checks = {"generations": AT_LEAST_1,
              "epochs_per_generation": (lambda epochs: epochs is None or epochs >= 1, "must be >= 1 or null")}
    on_device = ("refiner",)
    refiner: nn.Module | None = None  # built by `attach`, holds weights from generation 2 on
    refiner_generation: int | None = None  # the generation the refiner's weights trained in
    in_channels: int | None = None  # of the data, for the fresh build of each generation

    @classmethod
    def validate(cls, config):
        super().validate(config)
        section, epochs = config.method.refinery, config.train.epochs
        if section.epochs_per_generation is None:
            require(epochs % section.generations == 0, "method.refinery.generations", section.generations,
                    f"must divide train.epochs ({epochs}) when method.refinery.epochs_per_generation is null")
        else:
            require(section.generations * section.epochs_per_generation == epochs, "method.refinery.generations",
                    section.generations, f"times method.refinery.epochs_per_generation "
                                         f"({section.epochs_per_generation}) must equal train.epochs ({epochs})")

    @classmethod
    def stage_epochs(cls, config):
        section = config.method.refinery
        return [section.epochs_per_generation or config.train.epochs // section.generations] * section.generations

    @classmethod
    def hyperparameters(cls, config):
        return {**super().hyperparameters(config), "epochs_per_generation": cls.stage_epochs(config)[0]}

    def attach(self, model):
        if self.section.generations > 1:
            self.refiner = copy.deepcopy(model).eval().requires_grad_(False)

    def attach_data(self, data):
        self.in_channels = data.in_channels

    def stage_start(self, stage, model, optimizer):
        if stage == 1:
            return
        if self.refiner is None:
            raise RuntimeError("refinery: attach(model) must be called before training (colam.engine.prepare does)")
        self.refiner.load_state_dict(model.state_dict())
        self.refiner.to(next(model.parameters()).device).eval()
        self.refiner_generation = stage - 1
        model.load_state_dict(self.initial_weights(stage))
        optimizer.state.clear()

    def initial_weights(self, generation: int) -> dict[str, torch.Tensor]:
        """The weights generation `generation` starts from: a fresh build of the run's model, seeded."""
        if self.in_channels is None:
            raise RuntimeError("refinery: attach_data(data) must be called before training (colam.engine.prepare does)")
        config = self.config
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(derive_seed(config.seed, REINIT_STREAM + generation))
            fresh = build_model(config.model.name, self.num_classes, in_channels=self.in_channels,
                                **config.model.options)
            fresh = type(self).wrap_model(fresh, config, self.num_classes)
        return fresh.state_dict()

    def forward_loss(self, model, images, targets, indices, stage):
        logits = model(images)
        if stage == 1:
            return F.cross_entropy(logits, targets), logits
        return soft_cross_entropy(logits, self.refined_labels(images)), logits

    @torch.no_grad()
    def refined_labels(self, images: torch.Tensor) -> torch.Tensor:
        """softmax(R(x)) of the frozen refiner, on the images' device, in eval mode."""
        if self.refiner_generation is None:
            raise RuntimeError("refinery: a later generation started without a refiner (stage_start was not called)")
        if next(self.refiner.parameters()).device != images.device:
            self.refiner.to(images.device)
        self.refiner.eval()
        return F.softmax(self.refiner(images).float(), dim=1)

    def state_dict(self):
        refiner = self.refiner.state_dict() if self.refiner_generation is not None else None
        return {"refiner": refiner, "refiner_generation": self.refiner_generation}

    def load_state_dict(self, state):
        self.refiner_generation = state.get("refiner_generation")
        if self.refiner_generation is not None:
            self.refiner.load_state_dict(state["refiner"])
            self.refiner.eval()

