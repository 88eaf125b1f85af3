"""Collaborative learning: several classifier heads of one network trained together, one deployed.

Song & Chai, "Collaborative Learning for Deep Neural Networks", NeurIPS 2018 (arXiv:1805.11761). The trunk is shared by
all heads and the rest duplicated along a binary tree (hierarchical sharing, log2(H) split points, Sec. 3): copy 0 of
every segment is the plain network of `build_model`, the other copies the same layers of networks built from derived
seeds (independent initialisations). At every split point the children's gradient is scaled by 1/k (`scale_grad`,
backpropagation rescaling), so a shared layer receives the mean of the heads' gradients, not their sum.

The objective sums over the heads (Eq. 1-2) L_h = beta * CE(z_h, y) + (1 - beta) * T^2 * KL(q_h || softmax(z_h / T)),
q_h = softmax(mean_{j != h} z_j / T) the other heads' consensus, a constant target. KL differs from the paper's soft
cross-entropy by the entropy of q_h, a constant: same gradients, and the loss is 0 where the heads agree. Head 0 (the
plain network) is deployed. The network is split without model-specific code (colam.models.split).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from colam.errors import require
from colam.methods.base import POSITIVE, UNIT, Method
from colam.models import MODELS, build_model
from colam.models.split import Splitter
from colam.seeding import derive_seed

# Offset of the seed streams that initialise the extra copies (copy of head h: SEED_STREAM + h).
SEED_STREAM = 5_170_001


class _ScaleGrad(torch.autograd.Function):
    """Backpropagation rescaling (Sec. 3): identity forward (a fresh tensor, so a child's in-place op cannot touch its
    siblings' input); backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


scale_grad = _ScaleGrad.apply  # scale_grad(x, scale): x forward, scale * gradient backward


def consensus_log_targets(logits: list[torch.Tensor], temperature: float) -> list[torch.Tensor]:
    """log q_h for every head h (Eq. 2): log_softmax of the mean logits of the other heads / T, without gradient (the
    consensus is a target, not a path to the other heads)."""
    if len(logits) < 2:
        raise ValueError("the consensus of the other heads needs at least 2 heads")
    with torch.no_grad():
        stacked = torch.stack([z.detach().float() for z in logits])
        return [F.log_softmax(torch.cat([stacked[:h], stacked[h + 1:]]).mean(dim=0) / temperature, dim=1)
                for h in range(len(logits))]


def collaborative_loss(logits: list[torch.Tensor], targets: torch.Tensor, temperature: float,
                       beta: float) -> torch.Tensor:
    """Sum over the heads of beta * CE(z_h, y) + (1 - beta) * T^2 * KL(q_h || softmax(z_h / T))."""
    total = logits[0].new_zeros((), dtype=torch.float32)
    for z, log_q in zip(logits, consensus_log_targets(logits, temperature)):
        total = total + beta * F.cross_entropy(z, targets)
        if beta < 1.0:
            log_p = F.log_softmax(z.float() / temperature, dim=1)
            soft = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2
            total = total + (1.0 - beta) * soft
    return total


class CollaborativeNet(nn.Module):
    """A network with `heads` classifier heads on a binary tree of shared segments.

    `net` is the plain network: the trunk and copy 0 of every segment, i.e. head 0. `copies["level{l}_copy{j}"]`
    (j >= 1) is copy j of the segment that starts at split point l (1-based); level l has 2**l copies and the parent of
    copy j is copy j // 2 of level l - 1. Head h runs the trunk, then copy h >> (L - l) of level l for l = 1..L.
    """

    def __init__(self, net: nn.Module, own_segments: list[nn.Module], copies: dict[str, nn.Module],
                 split: list[str]) -> None:
        super().__init__()
        self.net, self.split, self.copies = net, list(split), nn.ModuleDict(copies)
        self.levels, self.heads = len(split), 2 ** len(split)
        # The trunk and copy 0 of each level run `net`'s own modules: kept out of the module tree so that their
        # parameters are registered (and saved) once, under `net`.
        object.__setattr__(self, "_own_segments", own_segments)

    def segment(self, level: int, copy_index: int) -> nn.Module:
        """Level 0 is the trunk; copy 0 of every level is part of `net`."""
        return self._own_segments[level] if copy_index == 0 else self.copies[f"level{level}_copy{copy_index}"]

    def head_path(self, head: int) -> list[tuple[int, int]]:
        """(level, copy) of every segment head `head` runs, trunk first."""
        return [(0, 0)] + [(level, head >> (self.levels - level)) for level in range(1, self.levels + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Head 0's logits: the plain network itself (what evaluation and export see)."""
        return self.net(x)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every head's logits in one pass; each shared segment runs once and, at every split into 2 children, passes
        each child its output with the gradient scaled by 1/2."""
        outputs = [self.segment(0, 0)(x)]
        for level in range(1, self.levels + 1):
            outputs = [self.segment(level, j)(scale_grad(outputs[j // 2], 0.5)) for j in range(2**level)]
        return outputs


def build_collaborative(model: nn.Module, config, num_classes: int) -> CollaborativeNet:
    """The multi-head network of `config.method.collaborative` around the plain network `model`."""
    section, name = config.method.collaborative, config.model.name
    levels = int(math.log2(section.heads))
    plan = Splitter(model, name, MODELS[name].input_size if name in MODELS else 32)
    positions = plan.named(section.split, "method.collaborative.split") if section.split else plan.automatic(levels)
    if len(positions) != levels:
        found = ", ".join(plan.describe(p) for p in positions) or "none"
        raise plan.error(f"{section.heads} heads need {levels} split points, it has {len(positions)} ({found}); "
                         f"lower method.collaborative.heads")
    plan.check_untied(positions)
    # Head h >= 1 takes every copy it starts (copy j of level l starts with head j << (L - l)) from a network built
    # like `model` from its own derived seed.
    copies: dict[str, nn.Module] = {}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    device = next(model.parameters()).device
    for head in range(1, section.heads):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, SEED_STREAM + head))
            fresh = build_model(name, num_classes, in_channels=plan.in_channels, **config.model.options)
        if {k: v.shape for k, v in fresh.state_dict().items()} != expected:
            raise plan.error("a network rebuilt from model.name and model.options differs from the one given")
        segments = plan.segments(fresh.to(device), positions)
        for level in range(1, levels + 1):
            shift = levels - level
            if head >> shift << shift == head:  # head is the first head below copy head >> shift
                copies[f"level{level}_copy{head >> shift}"] = segments[level]
    return CollaborativeNet(model, plan.segments(model, positions), dict(sorted(copies.items())),
                            [plan.describe(p) for p in positions])


@dataclass
class CollaborativeSettings:
    heads: int = 4  # classifier heads, a power of 2: log2(heads) binary splits (hierarchical ILR sharing)
    temperature: float = 2.0  # T of the heads' consensus soft targets (Song & Chai 2018; the paper uses 2)
    beta: float = 0.5  # the paper's beta: weight of the hard-label term; 1 - beta on the consensus term
    split: list[str] = field(default_factory=list)  # where the copies start, one module per split, outermost first
    # (e.g. [layers.4, layers.6]); empty: the starts of the last log2(heads) resolution stages


class Collaborative(Method):
    """Collaborative learning (Song & Chai 2018, NeurIPS; Sec. 3, Eq. 1-2): H heads on a binary tree of shared layers
    fit the hard labels and each other's consensus; see the module docstring."""

    name = "collaborative"
    settings = CollaborativeSettings
    headline = ("temperature",)
    paper = "Song & Chai 2018, NeurIPS, arXiv:1805.11761"
    summary = "heads on a shared trunk (binary tree, backprop rescaling) fit labels and each other's consensus"
    data_parallel = False  # trains through forward_all, which a DDP wrapper would bypass
    checks = {"heads": (lambda heads: heads >= 2 and heads & (heads - 1) == 0,
                        "must be a power of 2 >= 2 (binary-tree splits)"),
              "temperature": POSITIVE, "beta": UNIT}

    @classmethod
    def validate(cls, config):
        super().validate(config)
        section = config.method.collaborative
        levels = int(math.log2(section.heads))
        require(not section.split or len(section.split) == levels, "method.collaborative.split", section.split,
                f"must name {levels} module(s) for {section.heads} heads (one per split), or be empty (automatic)")
        require(all(isinstance(s, str) and s for s in section.split), "method.collaborative.split", section.split,
                "must hold module names such as layers.6")

    @classmethod
    def hyperparameters(cls, config):
        return {**super().hyperparameters(config), "split": list(config.method.collaborative.split) or "auto"}

    @classmethod
    def wrap_model(cls, model, config, num_classes):
        return build_collaborative(model, config, num_classes)

    def forward_loss(self, model, images, targets, indices, stage):
        if not isinstance(model, CollaborativeNet):
            raise TypeError(f"collaborative learning trains the network of Collaborative.wrap_model, "
                            f"got {type(model).__name__}")
        logits = model.forward_all(images)
        return collaborative_loss(logits, targets, self.section.temperature, self.section.beta), logits[0]

    def export(self, model):
        """Head 0 alone: the plain network (same class and parameters as `build_model` gives)."""
        return copy.deepcopy(model.net) if isinstance(model, CollaborativeNet) else model
