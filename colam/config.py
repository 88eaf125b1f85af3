"""Typed run configuration: one YAML file (plus `--set KEY=VALUE` overrides) -> `Config`.

Every section is a dataclass, every key has a type and a one-line reason; `load_config` refuses unknown keys, wrong
types and out-of-range values with a `ColamError` naming the key. The defaults are the paper's CIFAR settings (COLAM,
Sec. 4.2). `method.<name>` is the `settings` class of the method's file in colam/methods/ (the method registry).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from colam import io as cio
from colam.errors import ColamError, require
from colam.methods import METHODS
from colam.methods.base import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, Check, one_of, run_checks, within


@dataclass
class DataConfig:
    name: str = "digits"  # a registered data set (`colam datasets`); digits ships with scikit-learn
    root: str = "data"  # where file-backed data sets live (ignored by digits)
    download: bool = False  # let torchvision download the data set into root
    train_subset: int | None = None  # keep this many training samples (stratified); None keeps all
    val_fraction: float = 0.0  # hold out this fraction of the training set (stratified) for model selection
    label_noise: float = 0.0  # fraction of training labels flipped to another class
    noise_type: str = "symmetric"  # symmetric: to a uniformly drawn other class; asymmetric: class c -> c + 1 mod C
    split_seed: int = 0  # fixes subset, validation split and noise, independent of the training seed
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class ModelConfig:
    name: str = "preact_resnet34"  # a registered model (`colam models`)
    options: dict = field(default_factory=dict)  # builder keyword arguments, e.g. {depth: 40, widen_factor: 4}


@dataclass
class TrainConfig:
    epochs: int = 160  # the paper's CIFAR budget (240 for DenseNet-BC)
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "multistep"  # multistep | cosine | constant
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs (multistep)
    gamma: float = 0.1  # multistep decay factor
    device: str = "auto"  # auto picks cuda when available, else cpu
    eval_batch_size: int = 256
    eval_every: int = 1  # score val and test every k epochs; every stage end and the last epoch always
    precision: str = "auto"  # fp32 | bf16 (autocast); auto: bf16 on a CUDA device that supports it, else fp32
    channels_last: bool | str = "auto"  # NHWC memory layout for the convolutions; auto: on CUDA
    compile: bool = False  # torch.compile the model (the first epochs pay for compiling)
    data_on_device: bool | str = "auto"  # hold the training set on the device, crop/flip there in batches
    # (CIFAR, digits; colam.feed); auto: on CUDA when the data set has a tensor form; false: DataLoader
    threads: int | str = "auto"  # torch's CPU threads. On CPU the numbers depend on the count (sums split
    # otherwise), so it is part of the run; auto: torch's default, this machine's cores


def method_section(methods: dict) -> type:
    """The `method` section: `name` and each registered method's `settings`, so a method's file alone adds one."""
    section = dataclasses.make_dataclass("MethodConfig", [
        ("name", str, field(default="colam")),  # a registered method (`colam methods`)
        *((name, method.settings, field(default_factory=method.settings)) for name, method in methods.items())])
    section.__module__ = __name__
    return section


MethodConfig = method_section(METHODS)


@dataclass
class Config:
    seed: int = 0  # seeds initialisation, shuffling, augmentation and method randomness
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML `path` (or the defaults), apply `KEY=VALUE` overrides, validate, return Config."""
    config = from_dict(read_yaml(path, overrides))
    validate(config)
    return config


def from_dict(raw: dict) -> Config:
    return build_section(Config, raw, prefix="")


def read_yaml(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    raw = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides or []:
        _set_dotted(raw, *_parse_override(item))
    return raw


CONFIG_BYTES = 1 << 20  # a config is a few KB: a bigger file is a wrong path, not read whole
YAML_VALUES = 100_000  # nor a document that expands past this many values (an alias "bomb")
YAML_DEPTH = 32  # or nests deeper (a config nests 3 levels)


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ColamError(f"--config: file '{path}' does not exist")
    cio.check_file(path, "--config", CONFIG_BYTES)
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"), f"--config: '{path}'")
    except (OSError, UnicodeDecodeError) as exc:
        raise ColamError(f"--config: cannot read '{path}' ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        where = f" at line {exc.problem_mark.line + 1}" if getattr(exc, "problem_mark", None) else ""
        raise ColamError(f"--config: '{path}' is not valid YAML{where}") from None
    if not isinstance(raw, (dict, type(None))):
        raise ColamError(f"--config: '{path}' must hold a mapping of sections, not {type(raw).__name__}")
    return raw or {}


def parse_yaml(text: str, what: str) -> Any:
    """yaml.safe_load, refusing (naming `what`) a document whose aliases expand past YAML_VALUES values or that nests
    deeper than YAML_DEPTH, counted on the parser's events before any node is built (no memory, no RecursionError)."""
    sizes: dict[str, int] = {}  # an anchor -> the values it expands to
    open_nodes: list[list] = [[None, 0]]  # [anchor, values so far] of the document and each collection being read
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append([event.anchor, 1])
            if len(open_nodes) > YAML_DEPTH + 1:
                raise ColamError(f"{what} nests deeper than {YAML_DEPTH} levels")
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, count = open_nodes.pop()
        elif isinstance(event, yaml.AliasEvent):
            anchor, count = None, sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            anchor, count = event.anchor, 1
        else:
            continue
        if anchor:
            sizes[anchor] = count
        open_nodes[-1][1] += count
        if open_nodes[-1][1] > YAML_VALUES:
            raise ColamError(f"{what} expands to more than {YAML_VALUES:,} values (aliases of aliases?)")
    return yaml.safe_load(text)


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ColamError(f"--set: '{item}' is not of the form KEY=VALUE")
    try:
        value = parse_yaml(text, f"--set: {key.strip()!r}") if text.strip() else None
    except yaml.YAMLError:
        value = text  # a bare string such as a path with colons
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node, parts = raw, key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ColamError(f"--set: '{'.'.join(parts[: depth + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def dotted_items(node: dict, prefix: str = ""):
    """(KEY, value) for every value of a nested config mapping, KEY dotted as `--set` takes it; `options` mappings
    (a model's builder arguments) are one value, as their keys are the builder's, not the config's."""
    for key, value in node.items():
        if isinstance(value, dict) and value and key != "options":
            yield from dotted_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from `raw`, refusing unknown keys and wrong types; `prefix` names the keys in errors."""
    if not isinstance(raw, dict):
        raise ColamError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ColamError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    return cls(**{name: _convert(hints[name], value, f"{prefix}{name}") for name, value in raw.items()})


def _convert(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            with contextlib.suppress(ColamError):  # the next option may take it
                return _convert(option, value, key)
        names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
        raise ColamError(f"{key}: expected {names}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ColamError(f"{key}: expected a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_convert(item_hint, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is dict:
        if not isinstance(value, dict):
            raise ColamError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return _scalar(hint, value, key)


def _scalar(hint: type, value: Any, key: str) -> Any:
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        # PyYAML follows YAML 1.1, which reads 1e-3 (no dot) as a string: accept what float() parses.
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise ColamError(f"{key}: expected float, got {value!r}") from None
        if not math.isfinite(number):
            raise ColamError(f"{key}: must be a finite number, got {value!r}")
        return number
    if isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):  # a bool is no number here
        return value
    raise ColamError(f"{key}: expected {hint.__name__}, got {value!r}")


AUTO_OR_BOOL: Check = (lambda v: isinstance(v, bool) or v == "auto", "must be true, false or auto")
DATA_CHECKS: dict[str, Check] = {
    "train_subset": (lambda v: v is None or 1 <= v <= 10**9, "must be >= 1 and <= 10**9"), "val_fraction": FRACTION,
    "label_noise": FRACTION, "split_seed": within(0, 2**32 - 1),
    # colam.data.NOISE_TYPES (not imported: it imports this module)
    "noise_type": (lambda v: v in ("symmetric", "asymmetric"), "must be symmetric or asymmetric"),
    "num_workers": within(0, 256)}
TRAIN_CHECKS: dict[str, Check] = {
    "epochs": within(1, 100_000), "batch_size": within(1, 2**20), "eval_batch_size": within(1, 2**20),
    "eval_every": AT_LEAST_1, "lr": POSITIVE, "momentum": FRACTION, "weight_decay": NON_NEGATIVE,
    "lr_schedule": one_of(("multistep", "cosine", "constant")), "gamma": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "must be auto, cpu, cuda or cuda:N"),
    "precision": (lambda v: v in ("auto", "fp32", "bf16"), "must be auto, fp32 or bf16"),
    "channels_last": AUTO_OR_BOOL, "data_on_device": AUTO_OR_BOOL,
    "threads": (lambda v: v == "auto" or (not isinstance(v, str) and 1 <= v <= 1024), "must be auto or 1 to 1024")}


def validate(config: Config) -> None:
    """Range checks that need no data or model; the rest is checked when those are built."""
    require(0 <= config.seed < 2**32, "seed", config.seed, "must be in [0, 2**32)")
    name = config.method.name
    require(name in METHODS, "method.name", name, f"unknown method; choose one of: {', '.join(METHODS)}")
    run_checks(config.data, DATA_CHECKS, "data.")
    run_checks(config.train, TRAIN_CHECKS, "train.")
    for i, fraction in enumerate(config.train.milestones):
        require(0.0 < fraction < 1.0, f"train.milestones[{i}]", fraction, "must be a fraction of the epochs in (0, 1)")
    METHODS[name].validate(config)
