"""What a training method is: a loss on a batch, a stage schedule, and optional stage-end work.

The engine owns the loop; a method turns logits and labels into a loss, splits the epochs into stages and learns at a
stage end (COLAM's soft labels). Methods keep their learned state in `state_dict` so an interrupted run resumes exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from colam.errors import require

if TYPE_CHECKING:
    from colam.config import Config

# Range checks of a setting for `Method.checks`: (test of the value, what a bad value must be).
Check = tuple[Callable[[object], bool], str]
POSITIVE: Check = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE: Check = (lambda v: v >= 0, "must be >= 0")
AT_LEAST_1: Check = (lambda v: v >= 1, "must be >= 1")
UNIT: Check = (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
FRACTION: Check = (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")


def within(low: int, high: int) -> Check:
    """An integer in [low, high]: values past `high` pass a type check and then overflow or run for ever."""
    return (lambda v: low <= v <= high, f"must be >= {low} and <= {high:,}")


def one_of(options: tuple[str, ...]) -> Check:
    return (lambda v: v in options, f"must be one of {', '.join(options)}")


def run_checks(section, checks: dict[str, Check], prefix: str) -> None:
    """Raise ColamError naming `prefix + key` for the first setting of `section` that fails its check."""
    for key, (ok, what) in checks.items():
        value = getattr(section, key)
        require(ok(value), prefix + key, value, what)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of H(target, softmax(logits)) = -sum_j target_j log softmax_j(logits)."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@dataclass
class NoSettings:
    """The section of a method without settings (hl): empty, so that every method has one to name."""


class Method:
    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]
    uses_soft_labels: ClassVar[bool] = False
    restarts_schedule: ClassVar[bool] = False  # each stage trains a fresh model: the lr schedule restarts per stage
    # forward_loss calls the trained model once per batch and any state learned from the batches is summed over ranks
    # (colam.distributed), so the engine may wrap the model in DistributedDataParallel or torch.compile. Methods with
    # extra passes through the model (lookahead, partners) set False.
    data_parallel: ClassVar[bool] = True
    # Settings added after runs were first written, with the value every earlier run had: at that value they are left
    # out of a run's identity (colam.run_folder.run_identity) and of its variant.
    later_defaults: ClassVar[dict] = {}
    # The dataclass of the method's config section, `method.<name>`: colam.config builds the `method` section from
    # the registry, so a method's file alone adds its settings.
    settings: ClassVar[type] = NoSettings
    # The (numeric) settings runs are compared at, the temperature T of the paper's comparison: the tracking tags,
    # `colam compare`'s T column, the Kubeflow `temperature` parameter, analysis labels.
    headline: ClassVar[tuple[str, ...]] = ()
    # Settings the runs table shows as parameters, under the paper's short names (Sec. 3: T, m, t).
    short_names: ClassVar[dict[str, str]] = {"temperature": "T"}
    # Range checks of the settings, by key (`validate` names `method.<name>.<key>` in the error).
    checks: ClassVar[dict[str, Check]] = {}
    # Attributes holding tensors or networks (None until built) that `to` moves to the training device.
    on_device: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Config, num_classes: int, train_targets: torch.Tensor):
        self.config = config
        self.num_classes = num_classes
        self.train_targets = train_targets
        self.section = self.settings_of(config)
        self.device = torch.device("cpu")

    @classmethod
    def settings_of(cls, config: Config):
        return getattr(config.method, cls.name)

    @classmethod
    def validate(cls, config: Config) -> None:
        """Check this method's config section (`checks`); raise ColamError naming the key."""
        run_checks(cls.settings_of(config), cls.checks, f"method.{cls.name}.")

    @classmethod
    def check_data(cls, config: Config, class_counts: list[int]) -> None:
        """Check the settings that depend on the training data (samples per class)."""

    @classmethod
    def stage_epochs(cls, config: Config) -> list[int]:
        """Epochs of each stage; one stage unless the method alternates."""
        return [config.train.epochs]

    @classmethod
    def hyperparameters(cls, config: Config) -> dict:
        """The method's own settings, for logs and run comparison; a `later_defaults` key only where it differs from
        what every earlier run did, so that earlier runs keep their variant."""
        later = cls.later_defaults
        return {key: value for key, value in dataclasses.asdict(cls.settings_of(config)).items()
                if key not in later or value != later[key]}

    @classmethod
    def needs_every_sample(cls, config: Config) -> bool:
        """Whether a stage end needs the training epoch's outputs of every sample (COLAM's online per-sample labels), so
        that torchrun must not drop a last batch."""
        return False

    @classmethod
    def headline_values(cls, config: Config) -> dict:
        """The headline settings of this method's section by name, e.g. {"temperature": 4.0}."""
        return {key: getattr(cls.settings_of(config), key) for key in cls.headline}

    @classmethod
    def short_settings(cls, config: Config) -> dict[str, str]:
        """The settings in `short_names` that this method's section has, as text under their short names."""
        section = cls.settings_of(config)
        return {short: str(getattr(section, key)) for key, short in cls.short_names.items() if hasattr(section, key)}

    @classmethod
    def wrap_model(cls, model: nn.Module, config: Config, num_classes: int) -> nn.Module:
        """The network this method trains, built from the plain one (collaborative learning: several heads on a shared
        trunk). Its forward(x) must return the logits that are evaluated."""
        return model

    def attach(self, model: nn.Module) -> None:
        """Called once the (wrapped) model exists, before any state is loaded: a method that keeps a second network (a
        teacher) builds it here, so that load_state_dict can fill it."""

    def attach_data(self, data) -> None:
        """Called with the run's `colam.data.TrainingData` before training: a method that needs more samples than the
        batch (CS-KD's same-class partners) keeps what it needs here."""

    def to(self, device: torch.device) -> Method:
        self.device = torch.device(device)
        for name in self.on_device:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(self.device))
        return self

    def forward_loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor,
                     stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of a batch and the logits its training accuracy is counted on. Methods that need more
        forward passes (a teacher, a same-class partner, a lookahead) override this, the others `loss`."""
        logits = model(images)
        return self.loss(logits, targets, indices, stage), logits

    def stage_start(self, stage: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """At the first epoch of every stage, also in a process that starts there from a saved stage (label refinery:
        the trained model becomes the refiner and a fresh one starts)."""

    def epoch_start(self, epoch: int, stage: int) -> None:
        """Before every training epoch (1-based `epoch`), also the first one after a resume."""

    def epoch_end(self, epoch: int, stage: int) -> None:
        """After every training epoch (1-based `epoch`), before the state is saved."""

    def stage_report(self, stage: int) -> dict:
        """Numbers about what the method learned in `stage`, added to the stage's metrics.json (e.g. how many noisy
        labels learned labels correct). `self.clean_train_targets` holds the data set's own labels for such reports;
        training must never read them."""
        return {}

    def export(self, model: nn.Module) -> nn.Module:
        """The network to deploy: `model` itself unless the method trains extra parts (heads)."""
        return model

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor, stage: int) -> torch.Tensor:
        raise NotImplementedError

    def end_stage(self, stage: int) -> dict[str, torch.Tensor]:
        """Stage-end learning (COLAM's soft labels); returns the artifacts to save. When `needs_outputs(stage)`, the
        engine has first passed the model's outputs on the whole training set (this rank's share under torchrun) to
        `observe`, in batches."""
        return {}

    def needs_outputs(self, stage: int) -> bool:
        """Whether the stage end needs a forward pass over the training set (`observe`)."""
        return False

    def observe(self, outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> None:
        """A batch of the stage-end pass: the model's outputs (eval mode) for training samples `indices` (positions in
        the training set) with labels `targets`."""
        raise NotImplementedError(f"{self.name} does not learn from a pass over the training set")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
