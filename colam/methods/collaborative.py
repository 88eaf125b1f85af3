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

The network is split without model-specific code: its forward is traced (torch.fx), split
points are placed between top-level blocks (modules that are not containers) where exactly one
tensor flows from the layers before to the layers after, and the automatic choice takes the
starts of the last log2(H) resolution stages (the block that first produces a smaller feature
map), filling in with earlier block starts for networks with fewer stages. Networks that cannot
be traced or split are refused naming `model.name`.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from colam.errors import ColamError, require
from colam.methods.base import Method
from colam.models import MODELS, build_model
from colam.seeding import derive_seed

# Offset of the seed streams that initialise the extra copies (copy of head h: SEED_STREAM + h).
SEED_STREAM = 5_170_001
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


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

    def __init__(self, net: nn.Module, own_segments: list[fx.GraphModule], copies: dict[str, fx.GraphModule],
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


def _model_error(name: str, what: str) -> ColamError:
    return ColamError(f"model.name: {name!r} cannot be split into collaborative heads ({what})")


def _module_path(node: fx.Node, units: set[str]) -> str | None:
    """The outermost non-container module whose forward produced `node` (None: the root's own code)."""
    for entry in (node.meta.get("nn_module_stack") or {}).values():
        path = entry[0] if isinstance(entry, tuple) else entry
        if path in units:
            return path
    return None


def _stack_paths(node: fx.Node) -> list[str]:
    return [entry[0] if isinstance(entry, tuple) else entry for entry in (node.meta.get("nn_module_stack") or {}).values()]


def _units(module: nn.Module, prefix: str = "") -> set[str]:
    """Paths of the blocks a split may fall between: submodules that are not containers."""
    found = set()
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        found |= _units(child, path + ".") if isinstance(child, _CONTAINERS) else {path}
    return found


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


class _Plan:
    """The traced network and what may be split where."""

    def __init__(self, model: nn.Module, name: str, input_size: int) -> None:
        self.model, self.name = model, name
        modes = _modes(model)
        try:
            traced = {}
            for training in (True, False):
                model.train(training)
                traced[training] = fx.symbolic_trace(model)
        except Exception as exc:  # data-dependent control flow, unsupported ops, ...
            raise _model_error(name, f"its forward cannot be traced by torch.fx: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        finally:
            _restore(modes)
        if traced[True].code != traced[False].code:
            raise _model_error(name, "its forward computes differently in train and eval mode outside its modules")
        self.graph_module = traced[True]
        self.nodes = [n for n in self.graph_module.graph.nodes if n.op != "output"]
        self.output = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.units = _units(model)
        self.owner = [_module_path(n, self.units) for n in self.nodes]
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        for i, unit in enumerate(self.owner):
            if unit is not None:
                self.first.setdefault(unit, i)
                self.last[unit] = i
        self.in_channels = next((m.in_channels for n in self.nodes if n.op == "call_module"
                                 for m in [model.get_submodule(n.target)] if isinstance(m, nn.modules.conv._ConvNd)),
                                3)
        if [n.op for n in self.nodes].count("placeholder") != 1:
            raise _model_error(name, "its forward takes more than the input batch")
        self._cuts()
        self.first_weight = next((i for i, n in enumerate(self.nodes) if self.has_weights([n])), len(self.nodes))
        self._shapes(input_size, modes)

    def _shapes(self, input_size: int, modes) -> None:
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        sample = torch.zeros(1, self.in_channels, input_size, input_size, device=device)
        try:
            self.model.eval()  # running statistics untouched
            with torch.no_grad():
                ShapeProp(self.graph_module).propagate(sample)
        except Exception as exc:
            raise _model_error(self.name, f"a {input_size}x{input_size} input with {self.in_channels} channels "
                                          f"does not run: {type(exc).__name__}") from None
        finally:
            _restore(modes)

    def resolution(self, i: int) -> int | None:
        meta = self.nodes[i].meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        return math.prod(shape[2:]) if shape is not None and len(shape) >= 3 else None

    def _cuts(self) -> None:
        """For every position p: how many values flow across a cut before node p, and through how
        many blocks it would cut (difference arrays over the nodes' lifetimes, O(nodes))."""
        end = len(self.nodes)
        self.last_use = [max((self.position.get(user, end) for user in n.users), default=-1) for n in self.nodes]
        flows, cuts = [0] * (end + 2), [0] * (end + 2)
        for i, n in enumerate(self.nodes):
            if n.op != "get_attr" and self.last_use[i] > i:
                flows[i + 1] += 1
                flows[self.last_use[i] + 1] -= 1
        for unit, first in self.first.items():
            cuts[first + 1] += 1
            cuts[self.last[unit] + 1] -= 1
        self.flows, self.through = list(itertools.accumulate(flows)), list(itertools.accumulate(cuts))

    def crossing(self, p: int) -> list[fx.Node]:
        """Values computed before position p and used at or after it (the output counts as after)."""
        return [n for i, n in enumerate(self.nodes[:p]) if n.op != "get_attr" and self.last_use[i] >= p]

    def has_weights(self, nodes, matrices_only: bool = False) -> bool:
        for n in nodes:
            if n.op == "call_module":
                params = self.model.get_submodule(n.target).parameters()
            elif n.op == "get_attr":
                attr = self.model.get_parameter(n.target) if n.target in dict(self.model.named_parameters()) else None
                params = [attr] if attr is not None else []
            else:
                continue
            if any(q.ndim >= 2 or not matrices_only for q in params):
                return True
        return False

    def why_not(self, p: int) -> str | None:
        """Why position p is no split point (None: it is one)."""
        if not 1 <= p < len(self.nodes):
            return "it is not inside the network"
        if self.through[p]:
            unit = next(u for u, first in self.first.items() if first < p <= self.last[u])
            return f"it would cut through block {unit!r}"
        if self.flows[p] != 1:
            return f"{self.flows[p]} tensors flow across it, not 1"
        if p <= self.first_weight:
            return "no layer with parameters would be shared before it"
        return None

    def automatic(self, levels: int) -> list[int]:
        """The starts of the last `levels` resolution stages, then earlier block starts."""
        weighted = sorted(self.first[u] for u in self.first
                          if self.has_weights([n for n, o in zip(self.nodes, self.owner) if o == u], True))
        limit = weighted[-1] if weighted else len(self.nodes)  # the classifier stays below every split
        starts = sorted({self.first[u] for u in self.first} | {i for i, o in enumerate(self.owner) if o is None})
        valid = [p for p in starts if p < limit and self.why_not(p) is None]
        boundaries, current = [], self.resolution(0)
        for i in range(1, len(self.nodes)):
            size = self.resolution(i)
            if size is None:
                continue
            smaller, current = current is not None and size < current, size
            if smaller and size > 1:  # a smaller feature map, not the global pooling
                start = self.first[self.owner[i]] if self.owner[i] is not None else i
                before = [p for p in valid if p <= start]
                if before and before[-1] not in boundaries:
                    boundaries.append(before[-1])
        chosen = boundaries[-levels:]
        if len(chosen) < levels:
            bound = chosen[0] if chosen else limit
            extra = [p for p in valid if p < bound and p in weighted][-(levels - len(chosen)):]
            chosen = sorted(extra + chosen)
        if len(chosen) < levels:
            names = ", ".join(self.describe(p) for p in chosen) or "none"
            raise _model_error(self.name, f"{2**levels} heads need {levels} split points, it has {len(chosen)} "
                                          f"({names}); lower method.collaborative.heads")
        return chosen

    def named(self, names: list[str]) -> list[int]:
        """Positions of the split points the configuration names (the first node of each module)."""
        positions = []
        for name in names:
            hits = [i for i, n in enumerate(self.nodes) if name in _stack_paths(n)]
            if not hits:
                raise ColamError(f"method.collaborative.split: {name!r} is not a module that model "
                                 f"{self.name!r} runs; blocks: {', '.join(self.describe(p) for p in self.block_starts())}")
            reason = self.why_not(hits[0])
            if reason is not None:
                raise ColamError(f"method.collaborative.split: model {self.name!r} cannot be split before "
                                 f"{name!r}: {reason}")
            positions.append(hits[0])
        if positions != sorted(set(positions)):
            raise ColamError(f"method.collaborative.split: the modules must come in the order the network runs "
                             f"them, outermost split first, got {names!r}")
        return positions

    def block_starts(self) -> list[int]:
        return sorted(p for p in {self.first[u] for u in self.first} if self.why_not(p) is None)

    def describe(self, p: int) -> str:
        return self.owner[p] or self.nodes[p].name

    def segment(self, root: nn.Module, start: int, end: int) -> fx.GraphModule:
        """Nodes [start, end) as a module of `root`'s layers: one input (the tensor flowing in at
        `start`), one output (the tensor flowing out at `end`, or the network's output)."""
        graph = fx.Graph()
        inflow = self.nodes[0] if start == 1 else self.crossing(start)[0]
        env = {inflow: graph.placeholder("x")}

        def value(node: fx.Node) -> fx.Node:
            if node not in env:
                if node.op != "get_attr":
                    raise _model_error(self.name, f"{node.name} is needed across a split point")
                env[node] = graph.node_copy(node)
            return env[node]

        for node in self.nodes[start:end]:
            if node.op != "get_attr":
                env[node] = graph.node_copy(node, value)
        result = self.output.args[0] if end == len(self.nodes) else self.crossing(end)[0]
        graph.output(fx.map_arg(result, value))
        return fx.GraphModule(root, graph, class_name="Segment")

    def check_untied(self, bounds: list[int]) -> None:
        """A parameterised module may not run on both sides of a split point (its copies would untie it)."""
        seen: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.op in ("call_module", "get_attr") and self.has_weights([n]):
                level = sum(i >= b for b in bounds)
                if seen.setdefault(n.target, level) != level:
                    raise _model_error(self.name, f"{n.target!r} runs on both sides of a split point")


def build_collaborative(model: nn.Module, config, num_classes: int) -> CollaborativeNet:
    """The multi-head network of `config.method.collaborative` around the plain network `model`."""
    section, name = config.method.collaborative, config.model.name
    levels = int(math.log2(section.heads))
    spec = MODELS.get(name)
    plan = _Plan(model, name, spec.input_size if spec is not None else 32)
    positions = plan.named(section.split) if section.split else plan.automatic(levels)
    if len(positions) != levels:
        raise ColamError(f"method.collaborative.split: {len(positions)} split points for {section.heads} heads, "
                         f"which need {levels}")
    plan.check_untied(positions)
    bounds = [1, *positions, len(plan.nodes)]
    own = [plan.segment(model, bounds[level], bounds[level + 1]) for level in range(levels + 1)]
    # Head h >= 1 takes every copy it starts (copy j of level l starts with head j << (L - l))
    # from a network built like `model` from its own derived seed.
    copies: dict[str, fx.GraphModule] = {}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    device = next(model.parameters()).device
    for head in range(1, section.heads):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, SEED_STREAM + head))
            fresh = build_model(name, num_classes, in_channels=plan.in_channels, **config.model.options)
        if {k: v.shape for k, v in fresh.state_dict().items()} != expected:
            raise _model_error(name, "a network rebuilt from model.name and model.options differs from the one given")
        fresh.to(device)
        for level in range(1, levels + 1):
            shift = levels - level
            if head >> shift << shift == head:  # head is the first head below copy head >> shift
                copies[f"level{level}_copy{head >> shift}"] = plan.segment(fresh, bounds[level], bounds[level + 1])
    wrapped = CollaborativeNet(model, own, dict(sorted(copies.items())), [plan.describe(p) for p in positions])
    return wrapped


# ----------------------------------------------------------------------------- the method


class Collaborative(Method):
    """Collaborative learning (Song & Chai 2018, "Collaborative Learning for Deep Neural Networks",
    NeurIPS; Sec. 3, Eq. 1-2): H heads on a binary tree of shared layers with backpropagation
    rescaling; each head fits the hard labels (weight beta) and the other heads' consensus
    softmax(mean_{j != h} z_j / T) (weight 1 - beta, T^2 * KL, no gradient through the target);
    the objective sums the heads' losses. One head is deployed (`export`): the plain network.

    See the module docstring for how the network is split (`method.collaborative.split`).
    """

    name = "collaborative"
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
