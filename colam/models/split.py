"""Splitting a network into consecutive segments without model-specific code (torch.fx).

Split points fall between top-level blocks (modules that are not containers) where exactly one tensor flows across; the
automatic choice takes the starts of the last resolution stages, then earlier block starts. Networks that cannot be
traced or split are refused naming `model.name`.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from colam.errors import ColamError

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _stack_paths(node: fx.Node) -> list[str]:
    """The paths of the modules whose forward produced `node`, outermost first."""
    stack = (node.meta.get("nn_module_stack") or {}).values()
    return [entry[0] if isinstance(entry, tuple) else entry for entry in stack]


def _units(module: nn.Module, prefix: str = "") -> set[str]:
    """Paths of the blocks a split may fall between: submodules that are not containers."""
    found = set()
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        found |= _units(child, path + ".") if isinstance(child, _CONTAINERS) else {path}
    return found


def _restore(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


class Splitter:
    """The traced network `model` (registered as `name`, designed for `input_size` inputs): what may be split where, and
    the segments between split points (positions in its traced nodes)."""

    def __init__(self, model: nn.Module, name: str, input_size: int) -> None:
        self.model, self.name = model, name
        modes = {m: m.training for m in model.modules()}
        try:
            traced = [fx.symbolic_trace(model.train(training)) for training in (True, False)]
        except Exception as exc:  # data-dependent control flow, unsupported ops, ...
            raise self.error(f"its forward cannot be traced by torch.fx: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        finally:
            _restore(modes)
        if traced[0].code != traced[1].code:
            raise self.error("its forward computes differently in train and eval mode outside its modules")
        self.graph_module = traced[0]
        *self.nodes, self.output = self.graph_module.graph.nodes  # a traced graph ends with its output
        position = {n: i for i, n in enumerate(self.nodes)}
        # where each value is last used (the output counts as after every node)
        self.last_use = [max((position.get(user, len(self.nodes)) for user in n.users), default=-1) for n in self.nodes]
        units = _units(model)
        # the outermost block whose forward produced each node (None: the root's own code)
        self.owner = [next((p for p in _stack_paths(n) if p in units), None) for n in self.nodes]
        self.first, self.last = {}, {}  # each block's first and last node
        for i, unit in enumerate(self.owner):
            if unit is not None:
                self.first.setdefault(unit, i)
                self.last[unit] = i
        called = [model.get_submodule(n.target) for n in self.nodes if n.op == "call_module"]
        self.in_channels = next((m.in_channels for m in called if isinstance(m, nn.modules.conv._ConvNd)), 3)
        if [n.op for n in self.nodes].count("placeholder") != 1:
            raise self.error("its forward takes more than the input batch")
        if any(n.op == "get_attr" for n in self.nodes):  # every registered model runs its weights in modules
            raise self.error("its forward reads parameters or buffers outside its modules")
        self.first_weight = next((i for i, n in enumerate(self.nodes) if self.has_weights([n])), len(self.nodes))
        sample = torch.zeros(1, self.in_channels, input_size, input_size, device=next(model.parameters()).device)
        try:
            model.eval()  # running statistics untouched
            with torch.no_grad():
                ShapeProp(self.graph_module).propagate(sample)
        except Exception as exc:
            raise self.error(f"a {input_size}x{input_size} input with {self.in_channels} channels "
                             f"does not run: {type(exc).__name__}") from None
        finally:
            _restore(modes)

    def error(self, what: str) -> ColamError:
        return ColamError(f"model.name: {self.name!r} cannot be split into heads ({what})")

    def resolution(self, i: int) -> int | None:
        meta = self.nodes[i].meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        return math.prod(shape[2:]) if shape is not None and len(shape) >= 3 else None

    def crossing(self, p: int) -> list[fx.Node]:
        """Values computed before position p and used at or after it (the output counts as after)."""
        return [n for i, n in enumerate(self.nodes[:p]) if self.last_use[i] >= p]

    def has_weights(self, nodes, matrices_only: bool = False) -> bool:
        modules = [self.model.get_submodule(n.target) for n in nodes if n.op == "call_module"]
        return any(q.ndim >= 2 or not matrices_only for module in modules for q in module.parameters())

    def why_not(self, p: int) -> str | None:
        """Why position p is no split point (None: it is one)."""
        if not 1 <= p < len(self.nodes):
            return "it is not inside the network"
        unit = next((u for u, first in self.first.items() if first < p <= self.last[u]), None)
        if unit is not None:
            return f"it would cut through block {unit!r}"
        flows = len(self.crossing(p))
        if flows != 1:
            return f"{flows} tensors flow across it, not 1"
        if p <= self.first_weight:
            return "no layer with parameters would be shared before it"
        return None

    def automatic(self, count: int) -> list[int]:
        """`count` split points: the starts of the last `count` resolution stages, then earlier block starts (fewer
        where the network has fewer split points)."""
        weighted = sorted(self.first[u] for u in self.first
                          if self.has_weights([n for n, o in zip(self.nodes, self.owner) if o == u], True))
        limit = weighted[-1] if weighted else len(self.nodes)  # the classifier stays below every split
        starts = sorted(set(self.first.values()) | {i for i, o in enumerate(self.owner) if o is None})
        valid = [p for p in starts if p < limit and self.why_not(p) is None]
        boundaries, current = [], self.resolution(0)
        for i in range(1, len(self.nodes)):
            size = self.resolution(i)
            if size is None:
                continue
            smaller, current = current is not None and size < current, size
            if smaller and size > 1:  # a smaller feature map, not the global pooling
                before = [p for p in valid if p <= self.first.get(self.owner[i], i)]
                if before and before[-1] not in boundaries:
                    boundaries.append(before[-1])
        chosen = boundaries[-count:]
        if len(chosen) < count:
            bound = chosen[0] if chosen else limit
            chosen = sorted([p for p in valid if p < bound and p in weighted][-(count - len(chosen)):] + chosen)
        return chosen

    def named(self, names: list[str], key: str) -> list[int]:
        """Positions of the split points the configuration key `key` names (the first node of each module)."""
        positions = []
        for name in names:
            hits = [i for i, n in enumerate(self.nodes) if name in _stack_paths(n)]
            if not hits:
                starts = sorted(p for p in set(self.first.values()) if self.why_not(p) is None)
                raise ColamError(f"{key}: {name!r} is not a module that model {self.name!r} runs; blocks: "
                                 f"{', '.join(self.describe(p) for p in starts)}")
            reason = self.why_not(hits[0])
            if reason is not None:
                raise ColamError(f"{key}: model {self.name!r} cannot be split before {name!r}: {reason}")
            positions.append(hits[0])
        if positions != sorted(set(positions)):
            raise ColamError(f"{key}: the modules must come in the order the network runs them, outermost split "
                             f"first, got {names!r}")
        return positions

    def describe(self, p: int) -> str:
        return self.owner[p] or self.nodes[p].name

    def segments(self, root: nn.Module, positions: list[int]) -> list[fx.GraphModule]:
        """The segments of `root` (the traced network or one built alike) before, between and after the split points at
        `positions`."""
        bounds = [1, *positions, len(self.nodes)]
        return [self._segment(root, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]

    def _segment(self, root: nn.Module, start: int, end: int) -> fx.GraphModule:
        """Nodes [start, end) as a module of `root`'s layers: one input (the tensor flowing in at `start`), one output
        (the tensor flowing out at `end`, or the network's output)."""
        graph = fx.Graph()
        inflow = self.nodes[0] if start == 1 else self.crossing(start)[0]
        env = {inflow: graph.placeholder("x")}

        def value(node: fx.Node) -> fx.Node:
            if node not in env:
                raise self.error(f"{node.name} is needed across a split point")
            return env[node]

        for node in self.nodes[start:end]:
            env[node] = graph.node_copy(node, value)
        result = self.output.args[0] if end == len(self.nodes) else self.crossing(end)[0]
        graph.output(fx.map_arg(result, value))
        return fx.GraphModule(root, graph, class_name="Segment")

    def check_untied(self, positions: list[int]) -> None:
        """A parameterised module may not run on both sides of a split point (its copies would untie it)."""
        seen: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if self.has_weights([n]):
                level = sum(i >= p for p in positions)
                if seen.setdefault(n.target, level) != level:
                    raise self.error(f"{n.target!r} runs on both sides of a split point")
