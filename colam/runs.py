"""Finished run folders as inputs (a distillation teacher, the analyses): their configuration,
stages, curves and final network, whether `fit` wrote them or a stage-by-stage chain (stage_K/ only)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from colam import io as cio
from colam.config import CONFIG_BYTES, Config, from_dict, parse_yaml, validate
from colam.errors import ColamError
from colam.methods import METHODS


@dataclass(frozen=True)
class RunFolder:
    path: Path
    config: Config
    stage_dirs: tuple[Path, ...]  # stage_1 .. stage_m; the last one holds a model.pt

    @property
    def network_file(self) -> Path:
        """The deployable network's weights: export.pt when the method exported one, else model.pt."""
        exported = self.stage_dirs[-1] / "export.pt"
        return exported if exported.is_file() else self.stage_dirs[-1] / "model.pt"


def open_run(text: str | Path, key: str, finished: bool = True) -> RunFolder:
    """The run in folder `text`, finished unless `finished` is False (then only its stages so far
    are there); errors name `key`, the input that gave the folder."""
    path = Path(text).expanduser()
    if not path.exists():
        raise ColamError(f"{key}: '{text}' does not exist")
    if not path.is_dir():
        raise ColamError(f"{key}: '{text}' is not a folder; give a run folder")
    config = _run_config(path, key)
    count = len(METHODS[config.method.name].stage_epochs(config))
    stage_dirs = tuple(path / f"stage_{k}" for k in range(1, count + 1))
    if finished and not (stage_dirs[-1] / "model.pt").is_file():
        raise ColamError(f"{key}: '{text}' is not a finished run: its last stage '{stage_dirs[-1]}' holds no "
                         f"model.pt; train it to the end first")
    return RunFolder(path, config, stage_dirs)


def _run_config(path: Path, key: str) -> Config:
    """config.yaml of a whole run, else the configuration recorded in its newest stage state."""
    source = path / "config.yaml"
    states = sorted(path.glob("stage_*/state.pt"),  # in the order of K, the newest last
                    key=lambda p: int(p.parent.name[6:]) if p.parent.name[6:].isdigit() else -1)
    if source.is_file():
        try:
            cio.check_file(source, key, CONFIG_BYTES)
            raw = parse_yaml(source.read_text(encoding="utf-8"), f"{key}: '{source}'")
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ColamError(f"{key}: cannot read '{source}' ({type(exc).__name__})") from None
    elif states:
        source, state = states[-1], cio.load_torch(states[-1], key)
        raw = state.get("config") if isinstance(state, dict) else None
    else:
        raise ColamError(f"{key}: '{path}' is not a colam run folder: it is not a finished run folder (it holds no "
                         f"config.yaml), nor a stage-by-stage run (no stage_K/state.pt)")
    try:
        if not isinstance(raw, dict):
            raise ColamError("not a mapping of sections")
        config = from_dict(raw)
        validate(config)
    except ColamError as exc:
        raise ColamError(f"{key}: '{source}' is not a usable run configuration ({exc})") from None
    return config


def history(run: RunFolder, key: str = "--run") -> list[dict]:
    """The run's per-epoch rows (history.csv of the whole run, else of its last stage), numbers as floats."""
    path = run.path / "history.csv"
    path = path if path.is_file() else run.stage_dirs[-1] / "history.csv"
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            parsed = [{k: (int(v) if k in ("epoch", "stage") else float(v)) for k, v in row.items()
                       if v not in ("", None)} for row in csv.DictReader(handle)]
    except OSError as exc:
        raise ColamError(f"{key}: cannot read '{path}' ({exc.strerror})") from None
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ColamError(f"{key}: '{path}' is not a history.csv of this project ({type(exc).__name__})") from None
    if not parsed or not {"epoch", "train_acc", "test_acc"} <= parsed[-1].keys():
        raise ColamError(f"{key}: '{path}' holds no epochs with train_acc and test_acc")
    return parsed


def final_network(run: RunFolder, num_classes: int, in_channels: int, key: str) -> nn.Module:
    """The run's final network for this data's classes and channels, in eval mode, without gradients."""
    from colam.models import build_model

    config, file = run.config, run.network_file
    state = cio.load_torch(file, key)
    classifier = state.get("fc.weight") if isinstance(state, dict) else None
    if isinstance(classifier, torch.Tensor) and classifier.ndim == 2 and classifier.shape[0] != num_classes:
        raise ColamError(f"{key}: '{file}' classifies {classifier.shape[0]} classes, this data has {num_classes}")
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the global generator alone
        try:
            model = build_model(config.model.name, num_classes, in_channels=in_channels, **config.model.options)
        except ColamError as exc:
            raise ColamError(f"{key}: the run's model cannot be built ({exc})") from None
        if file.name == "model.pt":  # the method's wrapped model (wrap_model), not the plain network
            model = METHODS[config.method.name].wrap_model(model, config, num_classes)
    cio.load_weights(model, state, key, file, f"does not fit a {config.model.name} {config.model.options} for "
                     f"{num_classes} classes and {in_channels} input channel(s)")
    model.requires_grad_(False)
    return model.eval()
