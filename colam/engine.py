"""The staged trainer: `fit` trains a run, `fit_stage` one stage of it, the pipeline steps (`colam.steps`) a part
of it; all through `train_into`, told where the epochs go by a `colam.run_folder.Epochs` (the folder's layout,
resume and integrity rules are there).

Every epoch seeds torch's generator and the loader's from (seed, epoch), so a resumed run repeats the uninterrupted
run's numbers on CPU. Under `torchrun` the model is wrapped in DistributedDataParallel and rank 0 alone evaluates
and writes (`colam.distributed`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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
from colam.run_folder import (STAGE, Epochs, OneStage, WholeRun, check_resumable, releasing_claims, stage_ends,
                              write_stage)
from colam.soft_labels import check_soft_labels

log = logging.getLogger("colam")

# torch's thread count when colam was imported: what `train.threads: auto` restores in a process that
# trains several runs one after another (`colam sweep`), whatever count the run before set.
DEFAULT_THREADS = torch.get_num_threads()


class RunLog:
    """Hooks the trainer calls as a run progresses (no-ops); tracking subclasses it outside the library."""

    def start(self, config: Config, info: dict) -> None: ...
    def stage_start(self, stage: int) -> None: ...
    def epoch_end(self, stage: int, row: dict) -> None: ...
    def stage_end(self, stage: int, stage_dir: Path, metrics: dict) -> None: ...
    def finish(self, metrics: dict, out_dir: Path) -> None: ...


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

    @functools.cached_property
    def feed(self) -> LoaderFeed | ResidentFeed:
        """Where the batches come from, built when first needed (it may copy the data to the device)."""
        return make_feed(self.data, self.config, self.device, self.world)

    @property
    def execution(self) -> dict:
        """What `auto` chose on this machine, where it changes the numbers: a run continues as it began."""
        return {"precision": "bf16" if self.precision else "fp32",
                "data_on_device": wants_resident(self.config, self.data, self.device)}

    @property
    def speed(self) -> dict:  # for the run log
        return {"world_size": self.world.size, "channels_last": self.channels_last,
                "compile": self.config.train.compile, "threads": torch.get_num_threads(), **self.execution}


def prepare(config: Config, split_dir: str | Path | None = None) -> Prepared:
    """Validate everything that can be checked before training: config, data, model, method.
    `split_dir`: a split of `colam prepare`, else drawn from `data.*` (the same: it depends on `data.split_seed`)."""
    validate(config)
    # On CPU the sums of a convolution are split by thread, so their count changes the numbers: pinned per run.
    torch.set_num_threads(DEFAULT_THREADS if config.train.threads == "auto" else config.train.threads)
    world, name = distributed.init(config.train.device)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device(("cuda" if available else "cpu") if name == "auto" else name)
    if device.type == "cuda" and (device.index or 0) >= available:
        raise ColamError(f"train.device: {name!r} requested but {available} CUDA device(s) are available")
    method_cls = METHODS[config.method.name]
    if not method_cls.data_parallel:
        if world.distributed:
            raise ColamError(f"method.name: {config.method.name} cannot train under torchrun "
                             f"(WORLD_SIZE={world.size}); run it as one process")
        if config.train.compile:
            raise ColamError(f"train.compile: {config.method.name} does not train through a single model call that "
                             f"torch.compile could take; set it to false")
    check_names(config)  # before a data set is read or downloaded
    data = build_data(config.data, split_dir)
    method_cls.check_data(config, data.class_counts())
    _check_shards(config, len(data.train), world)
    torch.manual_seed(config.seed)  # the model's initial weights
    model = build_model(config.model.name, data.num_classes, in_channels=data.in_channels, **config.model.options)
    model = method_cls.wrap_model(model, config, data.num_classes)
    method = method_cls(config, data.num_classes, data.train_targets)
    method.attach(model)
    method.clean_train_targets = data.clean_train_targets  # for stage_report only, never for training
    method.attach_data(data)
    t, native_bf16 = config.train, device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if t.precision == "bf16" and device.type == "cuda" and not native_bf16:
        raise ColamError(f"train.precision: bf16 needs a GPU with native bfloat16 (compute capability 8.0 or "
                         f"newer), {torch.cuda.get_device_name(device)} emulates it slowly; use fp32 or auto")
    precision = torch.bfloat16 if t.precision == "bf16" or (t.precision == "auto" and native_bf16) else None
    channels_last = device.type == "cuda" if t.channels_last == "auto" else t.channels_last
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    wants_resident(config, data, device)  # refuses data_on_device: true for data without a tensor form, now
    return Prepared(config, data, model, method.to(device), method_cls.stage_epochs(config), device, world,
                    precision, channels_last)


def _check_shards(config: Config, samples: int, world: World) -> None:
    """Under torchrun the last global batch is dropped when it has fewer samples than ranks; per-sample soft labels
    gathered online need every sample in the stage's last epoch."""
    if not world.distributed:
        return
    if config.train.batch_size % world.size:
        raise ColamError(f"train.batch_size: the global batch of {config.train.batch_size} does not split evenly over "
                         f"{world.size} processes; use a multiple of {world.size}")
    dropped = samples % config.train.batch_size
    if dropped == 0 or dropped >= world.size:
        return
    if METHODS[config.method.name].needs_every_sample(config):
        raise ColamError(f"train.batch_size: {config.train.batch_size} leaves a last batch of {dropped} sample(s) for "
                         f"{world.size} ranks, which is dropped; online per-sample soft labels need every sample. "
                         f"Choose a batch size that leaves none or at least {world.size}")
    log.warning("the last batch of each epoch (%d samples, fewer than the %d ranks) is dropped", dropped, world.size)


def check_names(config: Config) -> None:
    """The data set and the model (name and options) exist: checked without reading data or allocating weights."""
    dataset_spec(config.data.name)
    with torch.device("meta"):
        build_model(config.model.name, 2, **config.model.options)


def learning_rate(config: Config, epoch: int) -> float:
    """The lr of `epoch` (0-based): a pure function of the epoch, so resuming needs no scheduler state. A method
    that trains a fresh model in each stage (label refinery) restarts it at every stage."""
    t, method, epochs = config.train, METHODS[config.method.name], config.train.epochs
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
    layout = torch.channels_last if channels_last and images.dim() == 4 else torch.preserve_format
    return images.to(device, non_blocking=True, memory_format=layout)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def train_one_epoch(net: nn.Module, batches, p: Prepared, optimizer: torch.optim.Optimizer, stage: int, desc: str,
                    progress: bool) -> tuple[float, float]:
    """One pass of `net` (the model, wrapped for training) over `batches` of (x, y, index); returns mean loss and
    accuracy on the given labels (over every rank's samples under torchrun)."""
    device = p.device
    net.train()
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    seen, losses = 0, []  # each step's loss, read only when the epoch's sum is not finite
    for images, targets, indices in tqdm(batches, desc=desc, leave=False, disable=not progress, file=sys.stderr):
        images, targets = to_device(images, device, p.channels_last), targets.to(device, non_blocking=True)
        with autocast(device, p.precision):
            loss, logits = p.method.forward_loss(net, images, targets, indices, stage)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Accumulate on the device: a .item() per step would synchronise with the GPU every step.
        losses.append(loss.detach())
        loss_sum += losses[-1].float() * len(targets)
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        seen += len(targets)
    totals = torch.stack([loss_sum.double(), correct.double(), loss_sum.new_tensor(seen, dtype=torch.float64)])
    loss_sum, correct, seen = distributed.all_reduce_sum(totals).tolist()
    if not math.isfinite(loss_sum):
        bad = next((step for step, loss in enumerate(losses, 1) if not torch.isfinite(loss)), None)
        if bad is None:  # every step of this rank was finite: another rank's diverged
            raise NonFiniteLoss("another process", "on another rank")
        raise NonFiniteLoss(bad, losses[bad - 1].item())
    return loss_sum / seen, correct / seen


class NonFiniteLoss(FloatingPointError):
    """A training step's loss was NaN or infinite; its args: the step (1-based, in its epoch) and the loss."""


@torch.no_grad()
def predict(model: nn.Module, batches, device: torch.device, precision: torch.dtype | None = None,
            channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (on the device) and targets of every sample, in data order (eval mode: BatchNorm's running statistics)."""
    model.eval()
    logits, targets = [], []
    for images, labels, *_ in batches:
        with autocast(device, precision):
            logits.append(model(to_device(images, device, channels_last)).float())
        targets.append(labels)
    return torch.cat(logits), torch.cat(targets)


def evaluate(model: nn.Module, batches, device: torch.device, precision: torch.dtype | None = None,
             channels_last: bool = False) -> float:
    logits, targets = predict(model, batches, device, precision, channels_last)
    return (logits.argmax(dim=1).cpu() == targets).sum().item() / len(targets)


@releasing_claims
def fit(config: Config, out_dir: str | Path, *, run_log: RunLog | None = None, progress: bool | None = None,
        split_dir: str | Path | None = None, restart_if_changed: bool = False,
        inputs: dict[str, str | Path] | None = None) -> dict:
    """Train one run into `out_dir`, resuming from its checkpoint when it holds the same run. `restart_if_changed` (DVC
    `persist: true`): a folder trained from another config, colam code or `inputs` (fixed soft labels) starts afresh."""
    run = WholeRun(out_dir, config, split_dir, inputs)
    prepared = None
    if restart_if_changed and run.changed():
        prepared = prepare(config, split_dir)  # bad input is refused before the folder is deleted
        if prepared.world.main:
            run.delete()
        distributed.barrier()  # under torchrun: no rank reads the folder while rank 0 deletes it
    return train_into(run, config, split_dir, run_log, progress, prepared)


@releasing_claims
def fit_stage(config: Config, out_dir: str | Path, stage: int, *, run_log: RunLog | None = None,
              progress: bool | None = None, split_dir: str | Path | None = None) -> dict:
    """Train stage `stage` (1-based) alone: read `out_dir/stage_{stage-1}`, write `out_dir/stage_{stage}`;
    every stage in turn gives `fit`'s numbers. Returns the stage's metrics (the run's go to `run_log.finish`)."""
    validate(config)
    part = OneStage(out_dir, stage, config, split_dir)
    train_into(part, config, split_dir, run_log, progress)
    return json.loads((part.folder / "metrics.json").read_text())


def train_into(where: Epochs, config: Config, split_dir: str | Path | None, run_log: RunLog | None,
               progress: bool | None, prepared: Prepared | None = None) -> dict:
    """Train the epochs of `where` from the state its folder holds; returns the metrics it holds or `train_epochs`'."""
    done, state = where.resume(config)  # another run there, or this one finished: known before data is read
    if done is not None:
        return done
    prepared = prepared or prepare(config, split_dir)  # raises before anything is deleted or written
    if state is not None:
        check_resumable(state, prepared)
    where.begin(prepared)
    progress = sys.stderr.isatty() if progress is None else progress
    metrics = train_epochs(prepared, state, where, run_log or RunLog(), progress)
    if prepared.world.main:
        where.record(complete=True)  # after the run log heard the end
    distributed.barrier()
    return metrics


def train_epochs(p: Prepared, state: dict | None, where: Epochs, run_log: RunLog, progress: bool) -> dict:
    """Train from the epoch `state` ends at (or 0) up to epoch `where.until`; `where` keeps the files of each stage
    end and the state after each epoch. Returns the run's metrics when the epochs end the run (on rank 0), else {}."""
    config, model, method, main, t = p.config, p.model, p.method, p.world.main, p.config.train
    run_log = run_log if main else RunLog()  # rank 0 evaluates, writes and reports; every rank trains
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    history, start = [], 0
    if state is not None:  # its weights are in the model already: check_resumable loaded them
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        history, start = state["history"], state["epoch"]
        log.info("continuing %s after epoch %d of %d", where.root, start, t.epochs)
    net = model  # what training calls (DDP under torchrun, compiled on request); the model is evaluated and saved
    if p.world.distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[p.device.index] if p.device.type == "cuda" else None)
    net = torch.compile(net) if t.compile else net
    run_log.start(config, {"num_classes": p.data.num_classes, "train_samples": len(p.data.train),
                           "device": str(p.device), "stage_epochs": p.stage_epochs, "resumed_from_epoch": start,
                           **p.speed})
    ends = stage_ends(config)
    if start == where.until and start in ends:  # killed after its last state was saved
        log.info("%s: stage %d was trained to its end; nothing to train again", where.root, ends.index(start) + 1)
    for epoch in range(start, where.until):
        stage = 1 + sum(epoch >= end for end in ends)
        if epoch == start or epoch in ends:
            run_log.stage_start(stage)
        if epoch == 0 or epoch in ends:
            method.stage_start(stage, model, optimizer)
        began = time.perf_counter()
        row = _train_epoch(p, net, optimizer, epoch, stage, where, progress and main)
        ending = _end_epoch(p, where, optimizer, history, row, began)
        # after the state is saved: an epoch in the log is an epoch a restart continues after
        log.info("%s  loss %.4f  train %.4f%s  (%.1fs)", _describe(config, stage, epoch), row["train_loss"],
                 row["train_acc"], "".join(f"  {k[:-4]} {row[k]:.4f}" for k in ("val_acc", "test_acc") if k in row),
                 row["seconds"])
        run_log.epoch_end(stage, row)  # after the state is saved: a resumed run never reports an epoch twice
        if epoch + 1 in ends:
            run_log.stage_end(stage, where.stage_dir(stage), ending)
    distributed.barrier()  # every file rank 0 writes exists before any rank returns
    if where.until < t.epochs or not main:
        return {}
    metrics = run_metrics(config, history, sum(row["seconds"] for row in history))
    where.finish(metrics)
    run_log.finish(metrics, where.root)
    return metrics


def _describe(config: Config, stage: int, epoch: int) -> str:
    return f"stage {stage}/{len(stage_ends(config))} epoch {epoch + 1}/{config.train.epochs}"


def _train_epoch(p: Prepared, net: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, stage: int,
                 where: Epochs, progress: bool) -> dict:
    """Train epoch `epoch` (0-based) and score it when it is due: its row of history.csv, but the seconds."""
    config, t = p.config, p.config.train
    lr = learning_rate(config, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(global_seed(config.seed, epoch, p.world))
    p.method.epoch_start(epoch + 1, stage)
    try:
        train_loss, train_acc = train_one_epoch(net, p.feed.train(epoch), p, optimizer, stage,
                                                _describe(config, stage, epoch), progress)
    except NonFiniteLoss as diverged:
        step, value = diverged.args
        good = "none: it diverged in the first epoch" if epoch == 0 else where.last_good(stage)
        raise ColamError(f"training diverged: non-finite loss ({value}) in stage {stage}, epoch "
                         f"{epoch + 1}, step {step}; the last good state is {good}") from None
    distributed.broadcast_buffers(p.model)  # every rank now holds rank 0's model exactly
    p.method.epoch_end(epoch + 1, stage)
    row = {"epoch": epoch + 1, "stage": stage, "lr": lr, "train_loss": train_loss, "train_acc": train_acc}
    scored = epoch + 1 in stage_ends(config) or (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs
    for name in ("val", "test") if p.world.main and scored else ():
        if (batches := p.feed.evaluation(name)) is not None:
            row[f"{name}_acc"] = evaluate(p.model, batches, p.device, p.precision, p.channels_last)
    return row


def _end_epoch(p: Prepared, where: Epochs, optimizer, history: list[dict], row: dict, began: float) -> dict:
    """Save what the epoch leaves (rank 0): the folder it ends (a stage end, or the last epoch of a call that ends
    mid-stage: its model, soft labels unless a later estimation step makes them, the run's export.pt after the last
    epoch) and the state after it; returns the stage's metrics for the run log."""
    stage, epoch, main = row["stage"], row["epoch"], p.world.main
    stage_end, folder = epoch in stage_ends(p.config), where.stage_dir(stage)
    kept = main and (stage_end or epoch == where.until)
    if kept:
        cio.take_folder(folder, STAGE)
        cio.save_torch(folder / "model.pt", p.model.state_dict())
    seconds = estimate_artifacts(p, stage, folder, epoch)[0] if stage_end and where.estimate else None
    row["seconds"] = time.perf_counter() - began
    history.append(row)
    resume = {"epoch": epoch, "optimizer": optimizer.state_dict(), "method": p.method.state_dict(),
              "history": history, "elapsed": sum(r["seconds"] for r in history), "config": p.config.to_dict(),
              "execution": p.execution, "world_size": p.world.size}
    if epoch == p.config.train.epochs and main:
        exported = p.method.export(p.model)
        if exported is not p.model:  # the deployable network, e.g. one head of a multi-head model
            cio.save_torch(folder / "export.pt", exported.state_dict())
    report = p.method.stage_report(stage) if stage_end and main else {}
    ending = {**row, "estimation_seconds": seconds if kept else None, **report}
    if kept:
        write_stage(folder, resume, {**ending, **where.info})
    if main:
        where.save({**resume, "model": p.model.state_dict()})
    return ending


def estimate_artifacts(p: Prepared, stage: int, stage_dir: Path, epoch: int) -> tuple[float, list[str]]:
    """Let the method learn from the model at a stage end (COLAM's soft labels) and save what it learned to
    `stage_dir`; returns the seconds it took and the names saved (NAME.npy)."""
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
        cio.write_json(stage_dir / "soft_labels.json", {
            "stage": stage, "epoch": epoch, **p.method.hyperparameters(p.config), "method": p.config.method.name,
            "class_names": p.data.classes, "train_samples_per_class": p.data.class_counts(),
            **p.method.stage_report(stage)})
    return time.perf_counter() - began, sorted(artifacts)


@torch.no_grad()
def stream_outputs(p: Prepared) -> None:
    """The stage-end pass: the model's outputs on the training set (no augmentation, eval mode), batch by batch into
    `method.observe`; under torchrun each rank passes its share."""
    p.model.eval()
    for images, targets, indices in p.feed.estimation():
        with autocast(p.device, p.precision):
            outputs = p.model(to_device(images, p.device, p.channels_last))
        p.method.observe(outputs.float(), targets.to(p.device, non_blocking=True), indices.to(p.device))


def run_metrics(config: Config, history: list[dict], elapsed: float) -> dict:
    last = history[-1]
    return {**{k: last[k] for k in ("test_acc", "train_acc", "train_loss", "val_acc") if k in last},
            "method": config.method.name, "method_params": METHODS[config.method.name].hyperparameters(config),
            "model": config.model.name, "data": config.data.name, "seed": config.seed,
            "epochs": config.train.epochs, "wall_time_s": round(elapsed, 3)}
