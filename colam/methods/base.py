"""What a training method is: a loss on a batch, a stage schedule, and optional stage-end work.

The engine owns the loop; a method only says how to turn logits and labels into a loss, how the
epochs split into stages, and what it learns at a stage end (COLAM's soft labels). Methods keep
their learned state in `state_dict` so an interrupted run resumes exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from colam.config import Config


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of H(target, softmax(logits)) = -sum_j target_j log softmax_j(logits)."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class Method:
    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]
    uses_soft_labels: ClassVar[bool] = False

    def __init__(self, config: Config, num_classes: int, train_targets: torch.Tensor):
        self.config = config
        self.num_classes = num_classes
        self.train_targets = train_targets

    @classmethod
    def validate(cls, config: Config) -> None:
        """Check this method's config section; raise ColamError naming the key."""

    @classmethod
    def check_data(cls, config: Config, class_counts: list[int]) -> None:
        """Check the settings that depend on the training data (samples per class)."""

    @classmethod
    def stage_epochs(cls, config: Config) -> list[int]:
        """Epochs of each stage; one stage unless the method alternates."""
        return [config.train.epochs]

    @classmethod
    def hyperparameters(cls, config: Config) -> dict:
        """The method's own settings, for logs and run comparison."""
        return {}

    def to(self, device: torch.device) -> Method:
        return self

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor, stage: int) -> torch.Tensor:
        raise NotImplementedError

    def end_stage(self, stage: int, outputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Stage-end learning from the model's outputs on the training set (N x C, in data order).

        Called with outputs only when `needs_outputs(stage)`; returns artifacts to save.
        """
        return {}

    def needs_outputs(self, stage: int) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
