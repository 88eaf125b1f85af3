"""The staged trainer: `fit(config, out_dir)` trains one run and writes its artifacts.

    out_dir/config.yaml          the resolved configuration of this run
    out_dir/history.csv          one row per epoch: stage, lr, train loss/acc, val/test acc, seconds
    out_dir/stage_K/model.pt     the state_dict at the end of stage K (load with weights_only=True)
    out_dir/stage_K/state.pt     optimizer, method state and history at the end of stage K (what stage K+1 starts from)
    out_dir/stage_K/history.csv  the epochs up to the end of stage K
    out_dir/stage_K/metrics.json metrics at the end of stage K
    out_dir/stage_K/soft_labels.npy, soft_labels.json   (methods that learn soft labels)
    out_dir/checkpoint.pt        the state after the last completed epoch, for resuming
    out_dir/metrics.json         the final metrics; `test_acc` is the last epoch's test accuracy

Every epoch starts by seeding torch's generator and the loader's from (seed, epoch), so an
interrupted run resumed from its checkpoint repeats the uninterrupted run's numbers on CPU.

Speed (train.*): batches come from a DataLoader or, for data that fits, straight from the device
(`colam.feed`); bf16 autocast, channels_last and torch.compile are options whose `auto` defaults
follow the device. Under `torchrun` the model is wrapped in DistributedDataParallel and rank 0
alone evaluates and writes (`colam.distributed`).
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from colam import distributed
from colam import io as cio
from colam.config import Config, validate
from colam.data import TrainingData, build_data
from colam.datasets import dataset_spec
from colam.distributed import World
from colam.errors import ColamError
from colam.feed import LoaderFeed, ResidentFeed, global_seed, make_feed, wants_resident
from colam.methods import METHODS, Method
from colam.models import build_model
from colam.soft_labels import check_soft_labels

log = logging.getLogger("colam")

HISTORY_FIELDS = ["epoch", "stage", "lr", "train_loss", "train_acc", "val_acc", "test_acc", "seconds"]


class RunLog:
    """Hooks the trainer calls as a run progresses; the default does nothing.

    Tracking back ends (MLflow, ...) subclass this outside the library, which never imports them.
    """

    def start(self, config: Config, info: dict) -> None: ...
    def stage_start(self, stage: int) -> None: ...
    def epoch_end(self, stage: int, row: dict) -> None: ...
    def stage_end(self, stage: int, stage_dir: Path, metrics: dict) -> None: ...
    def finish(self, metrics: dict, out_dir: Path) -> None: ...

    def stage_end_again(self, stage: int, stage_dir: Path, row: dict, metrics: dict) -> None:
        """A resumed run starts right after stage `stage`'s end, which the killed process saved but may
        not have reported, or reported in part. A log that can tell what it already holds reports
        only what is missing; by default the stage's end is reported as it happened."""
        self.stage_start(stage)
        self.epoch_end(stage, row)
        self.stage_end(stage, stage_dir, metrics)


@dataclass
class Prepared:
    config: Config
    data: TrainingData
    model: nn.Module
    method: Method
    stage_epochs: list[int]
    device: torch.device
    world: World = distributed.SINGLE
    precision: torch.dtype | None = None  # the autocast dtype (bf16), None for fp32
    channels_last: bool = False
    _feed: LoaderFeed | ResidentFeed | None = None

    @property
    def feed(self) -> LoaderFeed | ResidentFeed:
        """Where the batches come from, built when first needed (it may copy the data to the device)."""
        if self._feed is None:
            self._feed = make_feed(self.data, self.config, self.device, self.world)
        return self._feed

    @property
    def speed(self) -> dict:
        """How this run executes, for the run log and the checkpoint."""
        return {"world_size": self.world.size, "precision": "bf16" if self.precision else "fp32",
                "channels_last": self.channels_last, "compile": self.config.train.compile,
                "data_on_device": wants_resident(self.config, self.data, self.device)}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= available:
            raise ColamError(f"train.device: {name!r} requested but {available} CUDA device(s) are available")
    return device


def prepare(config: Config, split_dir: str | Path | None = None) -> Prepared:
    """Validate everything that can be checked before training: config, data, model, method.

    `split_dir` is a split written by `colam prepare` (`colam.data.save_split`); without it the
    split is drawn from `data.*` (the same one, since it depends on `data.split_seed` alone).
    """
    validate(config)
    world, device_name = distributed.init(config.train.device)
    device = resolve_device(device_name)
    method_cls = METHODS[config.method.name]
    if not method_cls.data_parallel:
        if world.distributed:
            raise ColamError(f"method.name: {config.method.name} cannot train under torchrun (WORLD_SIZE={world.size}); "
                             f"run it as one process")
        if config.train.compile:
            raise ColamError(f"train.compile: {config.method.name} does not train through a single model call that "
                             f"torch.compile could take; set it to false")
    check_names(config)  # before a data set is read or downloaded
    data = build_data(config.data, split_dir)
    method_cls.check_data(config, data.class_counts())
    _check_shards(config, len(data.train), world)
    torch.manual_seed(config.seed)  # the model's initial weights
    model = build_model(config.model.name, data.num_classes, in_channels=data.in_channels, **config.model.options)
    model = METHODS[config.method.name].wrap_model(model, config, data.num_classes)
    method = METHODS[config.method.name](config, data.num_classes, data.train_targets)
    method.attach(model)
    method.clean_train_targets = data.clean_train_targets  # for stage_report only, never for training
    method.attach_data(data)
    t = config.train
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if t.precision == "bf16" and device.type == "cuda" and not native_bf16:
        raise ColamError(f"train.precision: bf16 needs a GPU with native bfloat16 (compute capability 8.0 or "
                         f"newer), {torch.cuda.get_device_name(device)} emulates it slowly; use fp32 or auto")
    precision = torch.bfloat16 if t.precision == "bf16" or (t.precision == "auto" and native_bf16) else None
    channels_last = device.type == "cuda" if t.channels_last == "auto" else t.channels_last
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    wants_resident(config, data, device)  # refuses data_on_device: true for data without a tensor form, now
    return Prepared(config, data, model, method.to(device), method_cls.stage_epochs(config), device, world,
                    precision, channels_last)


def _check_shards(config: Config, samples: int, world: World) -> None:
    """Under torchrun the last global batch is dropped when it has fewer samples than ranks;
    per-sample soft labels gathered online need every sample in the stage's last epoch."""
    if not world.distributed:
        return
    if config.train.batch_size % world.size:
        raise ColamError(f"train.batch_size: the global batch of {config.train.batch_size} does not split evenly over "
                         f"{world.size} processes; use a multiple of {world.size}")
    dropped = samples % config.train.batch_size
    if dropped == 0 or dropped >= world.size:
        return
    colam = config.method.colam
    if config.method.name == "colam" and colam.estimation == "online" and colam.peers != "all":
        raise ColamError(f"train.batch_size: {config.train.batch_size} leaves a last batch of {dropped} sample(s) for "
                         f"{world.size} ranks, which is dropped; online per-sample soft labels need every sample. "
                         f"Choose a batch size that leaves none or at least {world.size}")
    log.warning("the last batch of each epoch (%d samples, fewer than the %d ranks) is dropped", dropped, world.size)


def check_names(config: Config) -> None:
    """The data set and the model (name and options) exist: checked without reading data or
    allocating weights (the model is built on the meta device)."""
    dataset_spec(config.data.name)
    with torch.device("meta"):
        build_model(config.model.name, 2, **config.model.options)


def learning_rate(config: Config, epoch: int) -> float:
    """The lr of `epoch` (0-based): a pure function of the epoch, so resuming needs no scheduler state.

    A method that trains a fresh model in each stage (label refinery's generations) restarts the
    schedule at every stage: the schedule then runs over the stage's epochs.
    """
    t = config.train
    epochs = t.epochs
    method = METHODS[config.method.name]
    if method.restarts_schedule:
        for length in method.stage_epochs(config):
            if epoch < length:
                break
            epoch -= length
        epochs = length
    if t.lr_schedule == "cosine":
        return 0.5 * t.lr * (1 + math.cos(math.pi * epoch / epochs))
    if t.lr_schedule == "multistep":
        return t.lr * t.gamma ** sum(epoch >= round(m * epochs) for m in t.milestones)
    return t.lr


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch of inputs on the device (non-blocking from pinned memory), NHWC when asked."""
    if channels_last and images.dim() == 4:
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device, non_blocking=True)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def train_one_epoch(model: nn.Module, batches, method: Method, optimizer: torch.optim.Optimizer, stage: int,
                    device: torch.device, desc: str = "", progress: bool = False, precision: torch.dtype | None = None,
                    channels_last: bool = False) -> tuple[float, float]:
    """One pass over `batches` of (x, y, index); returns mean loss and accuracy on the given labels
    (over every rank's samples under torchrun)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    losses = []  # each step's loss, read only when the epoch's sum is not finite
    for images, targets, indices in tqdm(batches, desc=desc, leave=False, disable=not progress, file=sys.stderr):
        images, targets = to_device(images, device, channels_last), targets.to(device, non_blocking=True)
        with autocast(device, precision):
            loss, logits = method.forward_loss(model, images, targets, indices, stage)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Accumulate on the device: a .item() per step would synchronise with the GPU every step.
        losses.append(loss.detach())
        loss_sum += losses[-1].float() * len(targets)
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        seen += len(targets)
    totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device,
                                                                             dtype=torch.float64)])
    loss_sum, correct, seen = distributed.all_reduce_sum(totals).tolist()
    if not math.isfinite(loss_sum):
        finite = torch.isfinite(torch.stack(losses).float()).tolist() if losses else []
        step = finite.index(False) if False in finite else None  # None: another rank's loss diverged
        raise NonFiniteLoss("another process" if step is None else step + 1,
                            "on another rank" if step is None else f"{losses[step].item()}")
    return loss_sum / seen, correct / seen


class NonFiniteLoss(Exception):
    """A training step's loss was NaN or infinite: `step` (1-based, in its epoch) and its `value`."""

    def __init__(self, step, value):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step, self.value = step, value


@torch.no_grad()
def predict(model: nn.Module, batches, device: torch.device) -> torch.Tensor:
    """Logits for every sample, in data order (eval mode: BatchNorm uses its running statistics)."""
    model.eval()
    return torch.cat([model(images.to(device, non_blocking=True)).float() for images, *_ in batches])


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, precision: torch.dtype | None = None,
             channels_last: bool = False) -> float:
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, targets, _ in batches:
        with autocast(device, precision):
            logits = model(to_device(images, device, channels_last))
        correct += (logits.argmax(dim=1) == targets.to(device, non_blocking=True)).sum()
        seen += len(targets)
    return correct.item() / seen


def fit(config: Config, out_dir: str | Path, *, run_log: RunLog | None = None, progress: bool | None = None,
        split_dir: str | Path | None = None, restart_if_changed: bool = False,
        inputs: dict[str, str | Path] | None = None) -> dict:
    """Train one run into `out_dir`, resuming from its checkpoint when it holds the same run.

    `restart_if_changed` is for runners that keep earlier outputs themselves and run a command
    again when its inputs change (DVC, with `persist: true`): a folder trained with another
    configuration, another version of the colam code or other inputs is deleted and the run
    trained afresh; the same run is resumed, or left alone when it is complete. `inputs` names
    files the run reads beyond the split (fixed soft labels): their contents are part of what
    the run was trained from.
    """
    run_log = run_log or RunLog()
    progress = sys.stderr.isatty() if progress is None else progress
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    origin = provenance(config, split_dir, files=inputs)
    _clear_abandoned_deletes(out_dir)
    prepared = None
    if restart_if_changed and _changed(out_dir, origin, "run"):
        prepared = prepare(config, split_dir)  # bad input is refused before the folder is deleted
        if prepared.world.main:
            _delete_run_folder(out_dir)
        distributed.barrier()  # under torchrun: no rank reads the folder while rank 0 deletes it
    cio.remove_stale_temporaries(out_dir)  # a write cut off by a kill leaves its temporary file
    # Another run in out_dir, or this run already finished: known before any data is read.
    state = _resume_state(config, out_dir)
    if state is not None and state["epoch"] == config.train.epochs and _reported(out_dir):
        metrics = _read_metrics(out_dir)
        if metrics is not None:
            log.info("%s already holds a completed run; nothing to do", out_dir)
            return metrics
    prepared = prepared or prepare(config, split_dir)  # raises before anything is written
    if state is not None:
        _check_state(prepared, state, out_dir)
    _make_dir(out_dir)
    if prepared.world.main:
        cio.write_text(out_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        cio.write_json(out_dir / PROVENANCE, {**origin, "complete": False})
    metrics = _train(prepared, out_dir, state, run_log, progress, until=config.train.epochs, whole_run=True,
                     resumed=state is not None)
    if prepared.world.main:
        cio.write_json(out_dir / PROVENANCE, {**origin, "complete": True})  # after the run log heard the end
    return metrics


def fit_stage(config: Config, out_dir: str | Path, stage: int, *, run_log: RunLog | None = None,
              progress: bool | None = None, split_dir: str | Path | None = None) -> dict:
    """Train stage `stage` (1-based) alone: read `out_dir/stage_{stage-1}`, write `out_dir/stage_{stage}`.

    Running every stage in turn gives the numbers of `fit` (each epoch reseeds from (seed, epoch)),
    which lets a pipeline make each stage a step with its own inputs and outputs. Returns the
    stage's metrics; the run's final metrics go to `run_log.finish` after the last stage.
    """
    run_log = run_log or RunLog()
    progress = sys.stderr.isatty() if progress is None else progress
    out_dir = Path(out_dir)
    validate(config)
    stage_epochs = METHODS[config.method.name].stage_epochs(config)
    if not 1 <= stage <= len(stage_epochs):
        raise ColamError(f"--stage: {stage} is not a stage of this run ({config.method.name} trains "
                         f"{len(stage_epochs)} stage(s))")
    _check_out_dir(out_dir)
    if (out_dir / "checkpoint.pt").exists():
        raise ColamError(f"--out: '{out_dir}' holds a whole run (checkpoint.pt); train --stage writes a folder of "
                         f"stages, choose another --out")
    state = None
    if stage > 1:
        previous = out_dir / f"stage_{stage - 1}"
        if not (previous / "state.pt").exists():
            raise ColamError(f"--stage: stage {stage} starts from '{previous}', which holds no finished stage; "
                             f"train --stage {stage - 1} first")
        state = load_stage_state(previous, config)
        if state["epoch"] != sum(stage_epochs[: stage - 1]):
            raise ColamError(f"--stage: '{out_dir / f'stage_{stage - 1}'}' ends at epoch {state['epoch']}, "
                             f"stage {stage} starts after epoch {sum(stage_epochs[: stage - 1])}")
    folder = out_dir / f"stage_{stage}"
    _check_out_dir(folder)
    origin = provenance(config, split_dir, previous=out_dir / f"stage_{stage - 1}" if stage > 1 else None)
    found = _read_provenance(folder)
    if found == {**origin, "complete": True} and (folder / "metrics.json").exists():
        (folder / PARTIAL).unlink(missing_ok=True)
        log.info("%s already holds stage %d of this run; nothing to do", folder, stage)
        return json.loads((folder / "metrics.json").read_text())
    resumed = found == {**origin, "complete": False} and (folder / PARTIAL).exists()
    if resumed:
        state = _read_partial(folder / PARTIAL, config)  # killed mid-stage: continue after its last epoch
    else:
        _check_stage_folder(folder)
    prepared = prepare(config, split_dir)  # raises before anything is deleted or written
    if state is not None:
        _check_state(prepared, state, folder if resumed else out_dir / f"stage_{stage - 1}")
    _make_dir(out_dir)
    main = prepared.world.main
    if main:
        if not resumed:
            _clear_stage_folder(folder)  # another stage, or one trained by other code or from other inputs
        cio.remove_stale_temporaries(folder)
        cio.write_json(folder / PROVENANCE, {**origin, "complete": False})
    _train(prepared, out_dir, state, run_log, progress, until=sum(stage_epochs[:stage]), whole_run=False,
           partial=folder / PARTIAL, resumed=resumed)
    if main:
        cio.write_json(folder / PROVENANCE, {**origin, "complete": True})  # after the run log heard the end
        (folder / PARTIAL).unlink(missing_ok=True)
    distributed.barrier()
    return json.loads((folder / "metrics.json").read_text())


# Beside a run's (or a stage's) files, and ignored by DVC (.dvcignore) so that they never change an
# output's hash: what the files were trained from, and a stage's state while it trains.
PROVENANCE = ".provenance.json"
PARTIAL = ".partial.pt"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of the colam package's source files: the code that makes a run's numbers."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def provenance(config: Config, split_dir: str | Path | None, previous: Path | None = None,
               files: dict[str, str | Path] | None = None) -> dict:
    """What a run or stage is trained from: its configuration, the colam code, the split files, the
    stage it starts from and other input `files` (digests). Two folders with the same provenance
    hold the same numbers."""
    inputs = {}
    if files:
        inputs["files"] = {name: cio.sha256_file(path) for name, path in sorted(files.items())}
    if split_dir is not None:
        inputs["split"] = {p.name: cio.sha256_file(p) for p in sorted(Path(split_dir).glob("split.*")) if p.is_file()}
    if previous is not None:
        inputs["previous_stage"] = {name: cio.sha256_file(previous / name) for name in ("model.pt", "state.pt")
                                    if (previous / name).exists()}
    run = hashlib.sha256(json.dumps(run_identity(config.to_dict()), sort_keys=True).encode()).hexdigest()
    return {"run": run, "code": code_digest(), "inputs": inputs}


def _read_provenance(folder: Path) -> dict | None:
    try:
        found = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _reported(out_dir: Path) -> bool:
    """Whether a finished run told its run log (MLflow) so; folders from before provenance was
    written count as reported."""
    found = _read_provenance(out_dir)
    return found is None or found.get("complete", True)


# What colam and its runners write into a run folder: anything else is someone's own and is never deleted.
RUN_FILES = {"config.yaml", "checkpoint.pt", "history.csv", "metrics.json", PROVENANCE}
RUN_LOG_FOLDERS = {"mlflow-journal"}  # a tracking back end's records of the run (pipelines.tracking)


def _changed(out_dir: Path, origin: dict, what: str) -> bool:
    """Whether `out_dir` holds a run trained from something other than `origin` (another config,
    colam code or input), to be trained afresh; refuses a folder holding files colam did not write."""
    if not out_dir.is_dir():
        return False
    entries = [p for p in out_dir.iterdir() if not cio.is_temporary(p)]
    if not entries:
        return False
    found = _read_provenance(out_dir)
    if found is not None and {k: v for k, v in found.items() if k != "complete"} == origin:
        return False
    foreign = [p.name for p in entries if not (p.name in RUN_FILES or p.name in RUN_LOG_FOLDERS
                                                or (p.is_dir() and p.name.startswith("stage_")))]
    if foreign or not any(p.name in RUN_FILES for p in entries):
        raise ColamError(f"--out: '{out_dir}' was trained from something else and holds files the {what} did not write "
                         f"({', '.join(sorted(foreign)[:3]) or 'no run files'}); it is not deleted: move them or choose "
                         f"another --out")
    for folder in entries:
        if folder.is_dir() and folder.name.startswith("stage_"):
            _check_stage_folder(folder)
    if found is None:
        why = "no record of what it was trained from"
    else:
        why = ", ".join(k for k in ("run", "code", "inputs") if found.get(k) != origin[k]) + " changed"
    log.info("%s holds a %s trained from something else (%s); training afresh", out_dir, what, why)
    return True


def _delete_run_folder(out_dir: Path) -> None:
    """Delete a run folder at once: it is renamed aside first, so that a kill during the deletion
    leaves no half-deleted run, only the renamed folder, which the next start removes
    (`_clear_abandoned_deletes`, first thing in fit)."""
    out_dir = out_dir.resolve()
    aside = _aside(out_dir)
    os.replace(out_dir, aside)
    cio.fsync_dir(out_dir.parent)
    shutil.rmtree(aside)


def _clear_abandoned_deletes(out_dir: Path) -> None:
    aside = _aside(out_dir.resolve())
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)


def _aside(out_dir: Path) -> Path:
    """Where a run folder is renamed to be deleted (ignored by DVC as a temporary, .*.tmp)."""
    return out_dir.parent / f".{out_dir.name}.deleting.tmp"


# The files of a stage folder: its weights and states (.pt), learned arrays (.npy) and these.
STAGE_FILES = {"history.csv", "metrics.json", "soft_labels.json", "estimation.json", PROVENANCE}


def _check_stage_folder(folder: Path) -> None:
    """Refuse a stage folder holding anything colam does not write there: it is never deleted."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        ours = path.is_file() and (path.suffix in (".pt", ".npy") or path.name in STAGE_FILES
                                   or cio.is_temporary(path))
        if not ours:
            kind = "folder" if path.is_dir() else "file"
            raise ColamError(f"--out: '{folder}' holds a {kind} '{path.name}' that colam did not write; it is not "
                             f"deleted: move it or choose another --out")


def _clear_stage_folder(folder: Path) -> None:
    """Empty a stage folder before the stage is trained into it again, so that no file of an earlier
    attempt (a soft-label file another setting wrote) stays beside the new ones."""
    if folder.is_dir():
        _check_stage_folder(folder)
        for path in folder.iterdir():
            path.unlink()


def _check_state(p: Prepared, state: dict, where: Path) -> None:
    """Refuse a saved state this run cannot continue from before anything is written: one trained on
    another kind of device path, or whose weights do not fit the model (another model or class count)."""
    execution = {"precision": p.speed["precision"], "data_on_device": p.speed["data_on_device"]}
    _refuse_other_execution(where, state, execution, p.world)
    cio.load_weights(p.model, state["model"], "--out checkpoint", state.get("model_file", where))


def _read_partial(path: Path, config: Config) -> dict:
    state = cio.load_torch(path, "stage checkpoint")
    if not isinstance(state, dict) or not _CHECKPOINT_KEYS <= state.keys():
        raise ColamError(f"stage checkpoint: '{path}' is not a colam training checkpoint; delete it")
    _refuse_other_run(path.parent, state["config"], config, what="stage")
    state["model_file"] = path
    return state


def load_stage_state(stage_dir: str | Path, config: Config | None = None) -> dict:
    """The training state saved at the end of a stage (model.pt + state.pt), checked against `config`."""
    stage_dir = Path(stage_dir)
    state = cio.load_torch(stage_dir / "state.pt", "stage state")
    if not isinstance(state, dict) or not _CHECKPOINT_KEYS - {"model"} <= state.keys():
        raise ColamError(f"stage state: '{stage_dir / 'state.pt'}' is not a colam stage state")
    if config is not None:
        _refuse_other_run(stage_dir, state["config"], config, what="stage")
    state["model"] = cio.load_torch(stage_dir / "model.pt", "stage model")
    state["model_file"] = stage_dir / "model.pt"  # where the weights came from, for error messages
    return state


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ColamError(f"--out: '{out_dir}' exists and is not a folder")


def _make_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ColamError(f"--out: cannot create '{out_dir}' ({exc.strerror})") from None


def _train(p: Prepared, out_dir: Path, state: dict | None, run_log: RunLog, progress: bool, until: int,
           whole_run: bool, stage_dir=None, estimate: bool = True, step_info: dict | None = None,
           last_good: Path | None = None, partial: Path | None = None, resumed: bool = False) -> dict:
    """Train from the epoch `state` ends at (or 0) up to epoch `until`.

    `whole_run` (fit) also keeps out_dir/checkpoint.pt after every epoch, out_dir/history.csv
    and out_dir/metrics.json; a part of a run (fit_stage, colam.steps) writes only the folder
    `stage_dir(stage)` of each stage end, and of the last epoch when `until` ends mid-stage.
    `estimate=False` leaves the stage-end soft labels to a later step (colam.steps.estimate_step);
    `step_info` is added to the metrics.json of the folders written; `last_good` is the folder a
    diverged step names as the state to go back to (default: the previous stage's folder);
    `partial` (fit_stage) is where the state after every epoch that ends no stage is kept, so that a
    killed stage loses at most the epoch it was in. `resumed`: `state` is what a killed process of
    this run saved, so a stage end it ends at may not have reached the run log.
    """
    if stage_dir is None:
        stage_dir = lambda stage: out_dir / f"stage_{stage}"  # noqa: E731
    config, model, method, data, device, world = p.config, p.model, p.method, p.data, p.device, p.world
    t = config.train
    main = world.main  # rank 0 evaluates, writes and reports; every rank trains
    if not main:
        run_log = RunLog()
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    history: list[dict] = []
    start_epoch, elapsed = 0, 0.0
    # what `auto` chose on this machine, where it changes the numbers: a run continues as it began
    execution = {"precision": p.speed["precision"], "data_on_device": p.speed["data_on_device"]}
    if state is not None:
        model.load_state_dict(state["model"])  # checked by _check_state before anything was written
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        history, start_epoch, elapsed = state["history"], state["epoch"], state["elapsed"]
        log.info("continuing %s after epoch %d of %d", out_dir, start_epoch, t.epochs)
    net = model  # what training calls; the model itself is evaluated and saved
    if world.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        net = torch.compile(net)
    run_log.start(config, {"num_classes": data.num_classes, "train_samples": len(data.train), "device": str(device),
                           "stage_epochs": p.stage_epochs, "resumed_from_epoch": start_epoch, **p.speed})
    stage_ends = np.cumsum(p.stage_epochs).tolist()
    if resumed and start_epoch in stage_ends:
        _replay_stage_end(run_log, stage_ends.index(start_epoch) + 1, stage_dir(stage_ends.index(start_epoch) + 1),
                          history[-1])
    for epoch in range(start_epoch, until):
        stage = 1 + sum(epoch >= end for end in stage_ends)
        if epoch == start_epoch or epoch in stage_ends:
            run_log.stage_start(stage)
        if epoch == 0 or epoch in stage_ends:
            method.stage_start(stage, model, optimizer)
        began = time.perf_counter()
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(global_seed(config.seed, epoch, world))
        method.epoch_start(epoch + 1, stage)
        desc = f"stage {stage}/{len(stage_ends)} epoch {epoch + 1}/{t.epochs}"
        try:
            train_loss, train_acc = train_one_epoch(net, p.feed.train(epoch), method, optimizer, stage, device, desc,
                                                    progress and main, p.precision, p.channels_last)
        except NonFiniteLoss as diverged:
            if epoch == 0:
                where = "none: it diverged in the first epoch"
            elif whole_run:
                where = out_dir / "checkpoint.pt"
            elif partial is not None and partial.exists():
                where = partial
            else:
                where = last_good or out_dir / f"stage_{stage - 1}"
            raise ColamError(f"training diverged: non-finite loss ({diverged.value}) in stage {stage}, epoch "
                             f"{epoch + 1}, step {diverged.step}; the last good state is {where}") from None
        distributed.broadcast_buffers(model)  # every rank now holds rank 0's model exactly
        method.epoch_end(epoch + 1, stage)
        row = {"epoch": epoch + 1, "stage": stage, "lr": lr, "train_loss": train_loss, "train_acc": train_acc}
        stage_end = epoch + 1 in stage_ends
        scored = stage_end or (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs
        for name in ("val", "test") if main and scored else ():
            batches_eval = p.feed.evaluation(name)
            if batches_eval is not None:
                row[f"{name}_acc"] = evaluate(model, batches_eval, device, p.precision, p.channels_last)
        saved = main and (stage_end or (not whole_run and epoch + 1 == until))  # a step may end mid-stage
        estimation_seconds = None
        if saved:
            cio.save_torch(stage_dir(stage) / "model.pt", model.state_dict())
        if stage_end and estimate:
            estimation_seconds, _ = estimate_artifacts(p, stage, stage_dir(stage), row["epoch"])
        row["seconds"] = time.perf_counter() - began
        elapsed += row["seconds"]
        history.append(row)
        resume = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "method": method.state_dict(),
                  "history": history, "elapsed": elapsed, "config": config.to_dict(), "execution": execution,
                  "world_size": world.size}
        if epoch + 1 == t.epochs and main:
            exported = method.export(model)
            if exported is not model:  # the deployable network, e.g. one head of a multi-head model
                cio.save_torch(stage_dir(stage) / "export.pt", exported.state_dict())
        report = method.stage_report(stage) if stage_end and main else {}
        if saved:
            _write_stage(stage_dir(stage), resume,
                         {**row, "estimation_seconds": estimation_seconds, **report, **(step_info or {})})
        if whole_run and main:
            _write_history(out_dir / "history.csv", history)
            cio.save_torch(out_dir / "checkpoint.pt", {**resume, "model": model.state_dict()})
        elif partial is not None and main:  # at the stage's end too: its files are whole once this exists
            cio.save_torch(partial, {**resume, "model": model.state_dict()})
        # after the state is saved: an epoch in the log is an epoch a restart continues after
        log.info("%s  loss %.4f  train %.4f%s  (%.1fs)", desc, train_loss, train_acc,
                 "".join(f"  {k[:-4]} {row[k]:.4f}" for k in ("val_acc", "test_acc") if k in row), row["seconds"])
        run_log.epoch_end(stage, row)  # after the state is saved: a resumed run never reports an epoch twice
        if stage_end:
            run_log.stage_end(stage, stage_dir(stage), {**row, "estimation_seconds": estimation_seconds, **report})
    distributed.barrier()  # every file rank 0 writes exists before any rank returns
    if until < t.epochs or not main:
        return {}
    metrics = run_metrics(config, history, elapsed)
    if whole_run:
        cio.write_json(out_dir / "metrics.json", metrics)
    run_log.finish(metrics, out_dir)
    return metrics


def _replay_stage_end(run_log: RunLog, stage: int, folder: Path, row: dict) -> None:
    """A run killed after a stage's files and the state after its last epoch were written, before
    the run log had surely heard the stage's end: nothing is trained again, the run log is told
    (`RunLog.stage_end_again` reports only what it misses)."""
    try:
        written = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):  # no stage folder beside the checkpoint (copied alone): nothing to report
        return
    log.info("%s: stage %d was trained to its end; telling the run log", folder, stage)
    run_log.stage_end_again(stage, folder, row, {**written, **row})


def _refuse_other_execution(out_dir: Path, state: dict, execution: dict, world: World) -> None:
    saved = state.get("execution")  # absent from checkpoints written before it was recorded
    if saved is not None and saved != execution:
        def describe(e):
            return f"{e['precision']} on the {'device-resident' if e['data_on_device'] else 'DataLoader'} data path"

        raise ColamError(f"--out: '{out_dir}' was trained in {describe(saved)}; `auto` settings would continue it in "
                         f"{describe(execution)} on this machine; resume it on the same kind of device")
    if state.get("world_size", world.size) != world.size:
        log.warning("%s was trained by %d process(es), it continues with %d: the global batch is the same, the "
                    "per-process batches and BatchNorm statistics are not", out_dir, state["world_size"], world.size)


def estimate_artifacts(p: Prepared, stage: int, stage_dir: Path, epoch: int) -> tuple[float, list[str]]:
    """Let the method learn from the model at a stage end (COLAM's soft labels) and save what it
    learned to `stage_dir`; returns the seconds it took and the names saved (NAME.npy)."""
    began = time.perf_counter()
    distributed.check_same_model(p.model, f"stage {stage} model (parameters and BatchNorm statistics)")
    if p.method.needs_outputs(stage):
        stream_outputs(p)
    artifacts = p.method.end_stage(stage)
    for name, tensor in artifacts.items():
        check_soft_labels(tensor, p.data.num_classes, f"stage {stage} {name} (estimated from the model's outputs)")
        if p.world.main:
            cio.save_array(stage_dir / f"{name}.npy", tensor.detach().cpu().numpy().astype(np.float32))
    if "soft_labels" in artifacts and p.world.main:
        section = p.config.method.colam
        cio.write_json(stage_dir / "soft_labels.json", {
            "stage": stage, "epoch": epoch, "temperature": section.temperature,
            "aggregation": section.aggregation, "peers": section.peers, "method": p.config.method.name,
            "class_names": p.data.classes, "train_samples_per_class": p.data.class_counts(),
            **p.method.stage_report(stage)})
    return time.perf_counter() - began, sorted(artifacts)


@torch.no_grad()
def stream_outputs(p: Prepared) -> None:
    """The stage-end pass: the model's outputs on the training set (no augmentation, eval mode),
    batch by batch into `method.observe`; under torchrun each rank passes its share."""
    p.model.eval()
    for images, targets, indices in p.feed.estimation():
        with autocast(p.device, p.precision):
            outputs = p.model(to_device(images, p.device, p.channels_last))
        p.method.observe(outputs.float(), targets.to(p.device, non_blocking=True), indices.to(p.device))


def _write_stage(stage_dir: Path, resume: dict, metrics: dict) -> None:
    """The rest of a stage's folder: what the next stage resumes from, the curves so far, the metrics."""
    cio.save_torch(stage_dir / "state.pt", resume)  # the weights are in model.pt, next to it
    _write_history(stage_dir / "history.csv", resume["history"])
    cio.write_json(stage_dir / "metrics.json", metrics)


def run_metrics(config: Config, history: list[dict], elapsed: float) -> dict:
    last = history[-1]
    metrics = {"test_acc": last["test_acc"], "train_acc": last["train_acc"], "train_loss": last["train_loss"]}
    if "val_acc" in last:
        metrics["val_acc"] = last["val_acc"]
    metrics.update({"method": config.method.name, "method_params": METHODS[config.method.name].hyperparameters(config),
                    "model": config.model.name, "data": config.data.name, "seed": config.seed,
                    "epochs": config.train.epochs, "wall_time_s": round(elapsed, 3)})
    return metrics


def _write_history(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()  # epochs that were not scored (train.eval_every) leave val_acc and test_acc empty
    writer = csv.DictWriter(buffer, fieldnames=[f for f in HISTORY_FIELDS if any(f in row for row in history)])
    writer.writeheader()
    writer.writerows({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} for row in history)
    cio.write_text(path, buffer.getvalue())


def _read_metrics(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "metrics.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


_CHECKPOINT_KEYS = {"epoch", "model", "optimizer", "method", "history", "elapsed", "config"}


def _resume_state(config: Config, out_dir: Path) -> dict | None:
    """The checkpoint of an earlier run of the same config in `out_dir`, or None to start afresh."""
    path = out_dir / "checkpoint.pt"
    if path.exists():
        state = cio.load_torch(path, "--out checkpoint")
        if not isinstance(state, dict) or not _CHECKPOINT_KEYS <= state.keys():
            raise ColamError(f"--out: '{path}' is not a colam training checkpoint; use another --out or delete it")
        _refuse_other_run(out_dir, state["config"], config)
        state["model_file"] = path
        return state
    saved_config = out_dir / "config.yaml"
    if saved_config.exists():  # a run that never finished its first epoch, or whose checkpoint was removed
        try:
            saved = yaml.safe_load(saved_config.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            saved = None
        _refuse_other_run(out_dir, saved, config)
    return None


# Keys added after runs were first written, with the value every earlier run had: at that value
# they are left out of a run's identity, so a run from before they existed (its checkpoint, its
# MLflow protocol, its estimate digests) is still the same run.
LATER_KEYS = {("train", "precision"): "auto", ("train", "data_on_device"): "auto", ("train", "eval_every"): 1}

# Keys that change how a run is executed or where its data lives, never its numbers.
EXECUTION_KEYS = {"data": ("root", "download", "num_workers"),
                  "train": ("device", "eval_batch_size", "channels_last", "compile")}


def run_identity(settings: dict) -> dict:
    """What makes two configs (as dicts) the same run: everything but the execution keys and the
    settings of methods other than the one trained."""
    identity = {section: ({k: v for k, v in value.items() if k not in EXECUTION_KEYS.get(section, ())}
                          if isinstance(value, dict) else value) for section, value in settings.items()}
    method = identity.get("method")
    if isinstance(method, dict) and method.get("name") in method:
        identity["method"] = {"name": method["name"], method["name"]: method[method["name"]]}
    identity = copy.deepcopy(identity)
    later = dict(LATER_KEYS)
    if isinstance(method, dict) and method.get("name") in METHODS:  # the method's own later keys
        name = method["name"]
        later.update({("method", name, key): value for key, value in METHODS[name].later_defaults.items()})
    for (*path, key), default in later.items():
        node = identity
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key) == default:
            del node[key]
    return identity


def _refuse_other_run(out_dir: Path, saved: object, config: Config, what: str = "run") -> None:
    if not isinstance(saved, dict) or run_identity(saved) != run_identity(config.to_dict()):
        difference = (_first_difference(run_identity(saved), run_identity(config.to_dict()))
                      if isinstance(saved, dict) else "unreadable")
        raise ColamError(f"--out: '{out_dir}' holds a {what} with a different configuration ({difference}); "
                         f"use another --out or delete it")


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} there, {b!r} now"
    return ""
