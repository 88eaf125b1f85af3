"""Collaborative learning: several classifier heads of one network trained together, one deployed.

Song & Chai, "Collaborative Learning for Deep Neural Networks", NeurIPS 2018 (arXiv:1805.11761).

The network's trunk is shared by all heads (intermediate-level representation sharing, Sec. 3);
the rest is duplicated along a binary tree, hierarchical sharing with log2(H) split points:
after the trunk the remaining layers split into 2 copies, the next split point splits each of
those into 2, and so on, so that the deepest segment (the last stage and the classifier) exists
once per head. Copy 0 of every segment is the plain network built by `build_model`, with its own
initialisation; the other copies are the same layers of networks built from derived seeds
(independent initialisations, as separately built heads would be).

Backpropagation rescaling (Sec. 3): at every split point the gradient flowing back from the k
children is multiplied by 1/k (`scale_grad`), so a layer shared by n heads receives the mean of
the heads' gradients, not their sum, whatever the number of heads.

The objective sums the heads' losses (Eq. 1 per head, summed over the H heads):

    L_h = beta * CE(z_h, y) + (1 - beta) * T^2 * KL(q_h || softmax(z_h / T)),
    q_h = softmax(mean_{j != h} z_j / T)                                        (Eq. 2)

the consensus soft label q_h of the OTHER heads (their averaged logits, softened by T) is a
constant target: no gradient flows through it. KL differs from the paper's soft cross-entropy
H(q_h, softmax(z_h / T)) by the entropy of q_h, a constant: the gradients are the same, and the
reported loss is 0 where the heads agree. T^2 keeps the soft term's gradient scale independent
of T (Hinton et al. 2015). With the rescaling, each head's own layers receive the gradient of
its own L_h at full scale and the shared layers the mean over the heads.

At inference one head is kept (head 0): `forward(x)` runs the plain network itself, and
`export` returns that network (same class, parameters and cost as `build_model`'s).

The network is split without model-specific code (colam.models.split): the automatic choice
takes the starts of the last log2(H) resolution stages; `method.collaborative.split` names them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from colam.errors import require
from colam.methods.base import Method
from colam.models import MODELS, build_model
from colam.models.split import Splitter
from colam.seeding import derive_seed

# Offset of the seed streams that initialise the extra copies (copy of head h: SEED_STREAM + h).
SEED_STREAM = 5_170_001


# ----------------------------------------------------------------------------- loss


class _ScaleGrad(torch.autograd.Function):
    """Identity forward (a fresh tensor, so a child's in-place op cannot touch its siblings' input);
    backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Backpropagation rescaling (Sec. 3): x forward, scale * gradient backward."""
    return _ScaleGrad.apply(x, scale)


def consensus_log_targets(logits: list[torch.Tensor], temperature: float) -> list[torch.Tensor]:
    """log q_h for every head h (Eq. 2): log_softmax of the mean logits of the other heads / T.

    Computed without gradient: the consensus is a target, not a path to the other heads.
    """
    heads = len(logits)
    if heads < 2:
        raise ValueError("the consensus of the other heads needs at least 2 heads")
    with torch.no_grad():
        stacked = torch.stack([z.detach().float() for z in logits])
        others = [torch.cat([stacked[:h], stacked[h + 1:]]).mean(dim=0) for h in range(heads)]
        return [F.log_softmax(mean / temperature, dim=1) for mean in others]


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


# ----------------------------------------------------------------------------- the multi-head network


class CollaborativeNet(nn.Module):
    """A network with `heads` classifier heads on a binary tree of shared segments.

    `net` is the plain network: the trunk and copy 0 of every segment, i.e. head 0.
    `copies["level{l}_copy{j}"]` (j >= 1) is copy j of the segment that starts at split point l
    (1-based); level l has 2**l copies and the parent of copy j is copy j // 2 of level l - 1.
    Head h runs the trunk, then copy h >> (L - l) of level l for l = 1..L.
    """

    def __init__(self, net: nn.Module, own_segments: list[nn.Module], copies: dict[str, nn.Module],
                 split: list[str]) -> None:
        super().__init__()
        self.net = net
        self.levels = len(split)
        self.heads = 2**self.levels
        self.split = list(split)
        self.copies = nn.ModuleDict(copies)
        # The trunk and copy 0 of each level run `net`'s own modules: kept out of the module tree
        # so that their parameters are registered (and saved) once, under `net`.
        object.__setattr__(self, "_own_segments", own_segments)

    def segment(self, level: int, copy_index: int) -> nn.Module:
        """Level 0 is the trunk; copy 0 of every level is part of `net`."""
        if copy_index == 0:
            return self._own_segments[level]
        return self.copies[f"level{level}_copy{copy_index}"]

    def head_path(self, head: int) -> list[tuple[int, int]]:
        """(level, copy) of every segment head `head` runs, trunk first."""
        return [(0, 0)] + [(level, head >> (self.levels - level)) for level in range(1, self.levels + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Head 0's logits: the plain network itself (what evaluation and export see)."""
        return self.net(x)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every head's logits in one pass; each shared segment runs once and, at every split into
        2 children, passes each child its output with the gradient scaled by 1/2."""
        outputs = [self.segment(0, 0)(x)]
        for level in range(1, self.levels + 1):
            outputs = [self.segment(level, j)(scale_grad(outputs[j // 2], 0.5)) for j in range(2**level)]
        return outputs


def build_collaborative(model: nn.Module, config, num_classes: int) -> CollaborativeNet:
    """The multi-head network of `config.method.collaborative` around the plain network `model`."""
    section, name = config.method.collaborative, config.model.name
    levels = int(math.log2(section.heads))
    spec = MODELS.get(name)
    plan = Splitter(model, name, spec.input_size if spec is not None else 32)
    positions = plan.named(section.split, "method.collaborative.split") if section.split else plan.automatic(levels)
    if len(positions) != levels:
        found = ", ".join(plan.describe(p) for p in positions) or "none"
        raise plan.error(f"{section.heads} heads need {levels} split points, it has {len(positions)} ({found}); "
                         f"lower method.collaborative.heads")
    plan.check_untied(positions)
    # Head h >= 1 takes every copy it starts (copy j of level l starts with head j << (L - l))
    # from a network built like `model` from its own derived seed.
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


# ----------------------------------------------------------------------------- the method


@dataclass
class CollaborativeSettings:
    heads: int = 4  # classifier heads, a power of 2: log2(heads) binary splits (hierarchical ILR sharing)
    temperature: float = 2.0  # T of the heads' consensus soft targets (Song & Chai 2018; the paper uses 2)
    beta: float = 0.5  # the paper's beta: weight of the hard-label term; 1 - beta on the consensus term
    split: list[str] = field(default_factory=list)  # where the copies start, one module per split, outermost
    # first (e.g. [layers.4, layers.6]); empty: the starts of the last log2(heads) resolution stages


class Collaborative(Method):
    """Collaborative learning (Song & Chai 2018, "Collaborative Learning for Deep Neural Networks",
    NeurIPS; Sec. 3, Eq. 1-2): H heads on a binary tree of shared layers with backpropagation
    rescaling; each head fits the hard labels (weight beta) and the other heads' consensus
    softmax(mean_{j != h} z_j / T) (weight 1 - beta, T^2 * KL, no gradient through the target);
    the objective sums the heads' losses. One head is deployed (`export`): the plain network.

    See the module docstring for how the network is split (`method.collaborative.split`).
    """

    name = "collaborative"
    settings = CollaborativeSettings
    headline = ("temperature",)
    paper = "Song & Chai 2018, NeurIPS, arXiv:1805.11761"
    summary = "heads on a shared trunk (binary tree, backprop rescaling) fit labels and each other's consensus"
    data_parallel = False  # trains through forward_all, which a DDP wrapper would bypass

    @classmethod
    def validate(cls, config):
        section = config.method.collaborative
        heads = section.heads
        require(heads >= 2 and heads & (heads - 1) == 0, "method.collaborative.heads", heads,
                "must be a power of 2 >= 2 (binary-tree splits)")
        require(section.temperature > 0, "method.collaborative.temperature", section.temperature, "must be > 0")
        require(0.0 <= section.beta <= 1.0, "method.collaborative.beta", section.beta, "must be in [0, 1]")
        levels = int(math.log2(heads))
        require(not section.split or len(section.split) == levels, "method.collaborative.split", section.split,
                f"must name {levels} module(s) for {heads} heads (one per split), or be empty (automatic)")
        require(all(isinstance(s, str) and s for s in section.split), "method.collaborative.split", section.split,
                "must hold module names such as layers.6")

    @classmethod
    def hyperparameters(cls, config):
        section = config.method.collaborative
        return {"heads": section.heads, "temperature": section.temperature, "beta": section.beta,
                "split": list(section.split) or "auto"}

    @classmethod
    def wrap_model(cls, model, config, num_classes):
        return build_collaborative(model, config, num_classes)

    def forward_loss(self, model, images, targets, indices, stage):
        if not isinstance(model, CollaborativeNet):
            raise TypeError(f"collaborative learning trains the network of Collaborative.wrap_model, "
                            f"got {type(model).__name__}")
        section = self.config.method.collaborative
        logits = model.forward_all(images)
        return collaborative_loss(logits, targets, section.temperature, section.beta), logits[0]

    def loss(self, logits, targets, indices, stage):
        raise NotImplementedError("collaborative learning needs every head's logits: use forward_loss")

    def export(self, model):
        """Head 0 alone: the plain network (same class and parameters as `build_model` gives)."""
        return copy.deepcopy(model.net) if isinstance(model, CollaborativeNet) else model
