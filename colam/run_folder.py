"""The run folder: its layout, the run's identity, what it was trained from, how a run continues.

    config.yaml, checkpoint.pt (the state after the last epoch), history.csv (a row per epoch), metrics.json
    stage_K/model.pt, state.pt (what stage K+1 starts from), history.csv, metrics.json, export.pt,
            NAME.npy, soft_labels.json (what the method learned at the stage's end)
    .provenance.json  what the run (stage_K/: the stage, trained alone) was trained from, and if it is complete
    .partial.pt       stage_K/ of a stage trained alone: its state after each epoch while it trains
    estimation.json   an estimate step's folder (colam.steps): what it estimated, with digests
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import io
import json
import logging
import os
import shutil
from contextlib import suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: folders are not locked there
    fcntl = None

import numpy as np
import torch
import yaml

from colam import distributed
from colam import io as cio
from colam.config import Config, parse_yaml
from colam.errors import ColamError
from colam.methods import METHODS
from colam.soft_labels import check_soft_labels

log = logging.getLogger("colam")

HISTORY_FIELDS = ["epoch", "stage", "lr", "train_loss", "train_acc", "val_acc", "test_acc", "seconds"]
# Ignored by DVC (.dvcignore), so that they never change an output's hash.
PROVENANCE, PARTIAL = ".provenance.json", ".partial.pt"
ESTIMATION = "estimation.json"
RUN, STAGE = "training run", "stage"  # the kinds of output (colam.io manifests) a run folder and a stage folder are
CHECKPOINT_KEYS = {"epoch", "model", "optimizer", "method", "history", "elapsed", "config"}


def stage_ends(config: Config) -> list[int]:
    """The epoch each stage of the run ends at (the epochs its stage_K folders are written at)."""
    return np.cumsum(METHODS[config.method.name].stage_epochs(config)).tolist()


# Keys added after runs were first written, with the value every earlier run had: at that value they are left out
# of a run's identity, so a run from before they existed (its checkpoint, MLflow protocol, estimate digests) is still
# the same run. data.num_workers among them: it was taken for an execution key, but each DataLoader worker draws the
# augmentation from its own random stream, so the worker count changes the numbers.
LATER_KEYS = {("train", "precision"): "auto", ("train", "data_on_device"): "auto", ("train", "eval_every"): 1,
              ("train", "threads"): "auto", ("data", "num_workers"): 0}

# Keys that change how a run is executed or where its data lives, never its numbers.
EXECUTION_KEYS = {"data": ("root", "download"),
                  "train": ("device", "eval_batch_size", "channels_last", "compile")}


def run_identity(settings: dict) -> dict:
    """What makes two configs (dicts) the same run: all but the execution keys and other methods' settings."""
    identity = {section: ({k: v for k, v in value.items() if k not in EXECUTION_KEYS.get(section, ())}
                          if isinstance(value, dict) else value) for section, value in settings.items()}
    method, later = identity.get("method"), dict(LATER_KEYS)
    if isinstance(method, dict) and method.get("name") in method:
        name = method["name"]
        identity["method"] = {"name": name, name: method[name]}
        if name in METHODS:  # the method's own later keys
            later.update({("method", name, key): value for key, value in METHODS[name].later_defaults.items()})
    identity = copy.deepcopy(identity)
    for (*path, key), default in later.items():
        node = identity
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key) == default:
            del node[key]
    return identity


def run_digest(config: Config | dict) -> str:
    """The sha256 (hex) of the run's identity: the one digest of a run (.provenance.json holds it whole,
    estimation.json its first 16 digits; tracking may key its runs by it)."""
    settings = config if isinstance(config, dict) else config.to_dict()
    return hashlib.sha256(json.dumps(run_identity(settings), sort_keys=True).encode()).hexdigest()


def refuse_other_run(folder: Path, saved: object, config: Config, what: str = "run") -> None:
    ours, theirs = run_identity(config.to_dict()), run_identity(saved) if isinstance(saved, dict) else None
    if theirs != ours:
        difference = "unreadable" if theirs is None else _first_difference(theirs, ours)
        raise ColamError(f"--out: '{folder}' holds a {what} with a different configuration ({difference}); "
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
    """What a run or stage is trained from (the same provenance: the same numbers): its configuration, the colam
    code, and digests of the split files, the stage it starts from and other input `files`."""
    inputs = {}
    if files:
        inputs["files"] = {name: cio.sha256_file(path) for name, path in sorted(files.items())}
    if split_dir is not None:
        inputs["split"] = {p.name: cio.sha256_file(p) for p in sorted(Path(split_dir).glob("split.*")) if p.is_file()}
    if previous is not None:
        inputs["previous_stage"] = {name: cio.sha256_file(previous / name, "--stage")
                                    for name in ("model.pt", "state.pt") if (previous / name).exists()}
    return {"run": run_digest(config), "code": code_digest(), "inputs": inputs}


def _read(path: Path, parse=json.loads) -> object:
    """The parsed file, or None when it is missing, unreadable or not a regular file (a FIFO would hang)."""
    if not path.is_file():
        return None
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def check_out_dir(out_dir: Path, kind: str, whole: bool = True) -> None:
    """Refuse an --out that is a file, holds another `kind` of colam's outputs or (`whole`: colam's output, not a
    folder of stage folders checked one by one) what colam did not write, by its manifest (colam.io); claim it."""
    claim(out_dir)  # a file or a dangling link is not claimed, and refused next
    cio.check_folder(out_dir, kind, shared=not whole)


def make_dir(out_dir: Path, kind: str) -> None:
    try:
        cio.take_folder(out_dir, kind)
    except OSError as exc:
        raise ColamError(f"--out: cannot create '{out_dir}' ({exc.strerror})") from None
    claim(out_dir)


_claims: dict[str, int] = {}  # a claimed folder's path -> the open descriptor that holds its lock


def claim(folder: Path) -> None:
    """Lock `folder` for this process (rank 0 under torchrun) until the claiming command ends (`releasing_claims`),
    refusing a second colam; flock on the folder leaves no file in it, and the kernel drops it when the holder dies."""
    if fcntl is None or not folder.is_dir() or not distributed.env_world().main:
        return
    key, inode = str(folder.resolve()), folder.stat().st_ino
    if key in _claims and os.fstat(_claims[key]).st_ino == inode:
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that can be written but not opened for reading: unlocked, as before
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ColamError(f"--out: '{folder}' is being written by another colam process{_holder(inode)}; wait "
                         f"for it to end or choose another --out") from None
    except OSError:  # a file system without flock (some network mounts): train unlocked rather than not at all
        os.close(fd)
        return
    if key in _claims:  # the folder was deleted and made afresh (--restart-if-changed)
        os.close(_claims[key])
    _claims[key] = fd


def _holder(inode: int) -> str:
    """' (pid N)' of the process holding the flock of the folder with `inode`, from /proc/locks
    (lines such as '1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF'), or '' where it cannot tell."""
    with suppress(OSError):
        for fields in map(str.split, Path("/proc/locks").read_text().splitlines()):
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                return f" (pid {fields[4]})"
    return ""


def releasing_claims(command):
    """Decorate a library entry point: the folders it claimed are released when it returns or raises."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        before = set(_claims)
        try:
            return command(*args, **kwargs)
        finally:
            for key in set(_claims) - before:
                os.close(_claims.pop(key))
    return run


def write_history(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()  # epochs that were not scored (train.eval_every) leave val_acc and test_acc empty
    writer = csv.DictWriter(buffer, fieldnames=[f for f in HISTORY_FIELDS if any(f in row for row in history)])
    writer.writeheader()
    writer.writerows({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} for row in history)
    cio.write_text(path, buffer.getvalue())


def _load_checkpoint(path: Path, config: Config, what: str, refusal: str, keys=CHECKPOINT_KEYS) -> dict:
    """A saved training state of this run (checkpoint.pt, .partial.pt, a stage's state.pt), else `refusal`."""
    state = cio.load_torch(path, what)
    if not isinstance(state, dict) or not keys <= state.keys():
        raise ColamError(refusal)
    refuse_other_run(path.parent, state["config"], config, "run" if path.name == "checkpoint.pt" else "stage")
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= config.train.epochs:
        raise ColamError(f"{what}: '{path}' holds epoch {str(epoch)[:40]!r}, not an epoch of this run (0 to "
                         f"{config.train.epochs}); delete it or choose another --out")
    state["model_file"] = path  # where the weights came from, for error messages
    return state


def write_stage(folder: Path, resume: dict, metrics: dict) -> None:
    """The rest of a stage's folder: what the next stage resumes from, the curves so far, the metrics."""
    cio.save_torch(folder / "state.pt", resume)  # the weights are in model.pt, next to it
    write_history(folder / "history.csv", resume["history"])
    cio.write_json(folder / "metrics.json", metrics)


def load_stage_state(stage_dir: str | Path, config: Config, epoch: int | None = None,
                     key: str = "", then: str = "") -> dict:
    """The training state saved at the end of a stage (model.pt + state.pt), checked against `config`;
    given `epoch`, refused with "KEY: 'DIR' ends at epoch E, THEN epoch N" unless it ends there."""
    path = Path(stage_dir) / "state.pt"
    state = _load_checkpoint(path, config, "stage state", f"stage state: '{path}' is not a colam stage state",
                             CHECKPOINT_KEYS - {"model"})
    state["model_file"] = path.parent / "model.pt"
    state["model"] = cio.load_torch(state["model_file"], "stage model")
    if epoch is not None and state["epoch"] != epoch:
        raise ColamError(f"{key}: '{stage_dir}' ends at epoch {state['epoch']}, {then} epoch {epoch}")
    return state


def check_resumable(state: dict, prepared) -> None:
    """Refuse a saved state this run (`colam.engine.Prepared`) cannot continue from, before anything is written:
    one trained on another kind of device path (what `auto` chose there), or whose weights do not fit the model."""
    where, saved = state["model_file"].parent, state.get("execution")  # absent from checkpoints before it was
    if saved is not None and saved != prepared.execution:
        there, here = (f"{e['precision']} on the {'device-resident' if e['data_on_device'] else 'DataLoader'} data "
                       f"path" for e in (saved, prepared.execution))
        raise ColamError(f"--out: '{where}' was trained in {there}; `auto` settings would continue it in {here} on "
                         f"this machine; resume it on the same kind of device")
    if state.get("world_size", prepared.world.size) != prepared.world.size:
        log.warning("%s was trained by %d process(es), it continues with %d: the global batch is the same, the "
                    "per-process batches and BatchNorm statistics are not", where, state["world_size"],
                    prepared.world.size)
    cio.load_weights(prepared.model, state["model"], "--out checkpoint", state["model_file"])
    _check_optimizer(state["optimizer"], list(prepared.model.parameters()), state["model_file"])


def _check_optimizer(saved: object, parameters: list[torch.Tensor], path: Path) -> None:
    """Refuse optimizer state of another model: another parameter count, or a buffer (momentum) of another shape
    than its parameter; torch would fail later, or broadcast it silently."""
    refusal = ColamError(f"--out checkpoint: '{path}' holds optimizer state of another model; delete it or choose "
                         f"another --out")
    groups, buffers = (saved.get("param_groups"), saved.get("state")) if isinstance(saved, dict) else (None, None)
    if not (isinstance(groups, list) and isinstance(buffers, dict) and all(isinstance(g, dict) for g in groups)):
        raise refusal
    if sum(len(group.get("params", ())) for group in groups) != len(parameters):
        raise refusal
    for index, held in buffers.items():
        if not (isinstance(index, int) and 0 <= index < len(parameters) and isinstance(held, dict)):
            raise refusal
        if any(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != parameters[index].shape
               for t in held.values()):
            raise refusal


class Epochs:
    """Where the epochs of one training call, up to epoch `until`, go (the folder of each stage end and
    of `until`); a call `resume`s, `begin`s, trains, and `record`s it complete after the run log heard the end."""

    root: Path
    until: int
    folder: Path  # where .provenance.json records `origin`, what the epochs are trained from
    origin: dict | None = None
    estimate = True  # learn at a stage end (soft labels); a pipeline step leaves it to its estimate step
    info: dict = {}  # added to the metrics.json of the folders written

    def stage_dir(self, stage: int) -> Path:
        return self.root / f"stage_{stage}"

    # (metrics, None) when the folder holds these epochs trained, else (None, the state to continue)
    def resume(self, config: Config) -> tuple[dict | None, dict | None]: ...
    def begin(self, prepared) -> None: ...
    def save(self, state: dict) -> None: ...
    def last_good(self, stage: int) -> Path: ...
    def finish(self, metrics: dict) -> None: ...

    def recorded(self) -> dict | None:
        found = _read(self.folder / PROVENANCE)
        return found if isinstance(found, dict) else None

    def record(self, complete: bool) -> None:
        if self.origin is not None:
            cio.write_json(self.folder / PROVENANCE, {**self.origin, "complete": complete})


class WholeRun(Epochs):
    """A whole run (`fit`): checkpoint.pt and history.csv after every epoch, metrics.json at the end."""

    def __init__(self, root: str | Path, config: Config, split_dir: str | Path | None = None,
                 inputs: dict[str, str | Path] | None = None):
        self.root = self.folder = Path(root)
        self.until = config.train.epochs
        check_out_dir(self.root, RUN)
        # where the folder is renamed to be deleted (ignored by DVC as a temporary, .*.tmp)
        self.aside = self.root.resolve().parent / f".{self.root.resolve().name}.deleting.tmp"
        if (self.aside / cio.MANIFEST).is_file():  # a deletion a kill cut off (`delete`); only ever colam's
            shutil.rmtree(self.aside, ignore_errors=True)
        self.origin = provenance(config, split_dir, files=inputs)

    def save(self, state: dict) -> None:
        write_history(self.root / "history.csv", state["history"])
        cio.save_torch(self.root / "checkpoint.pt", state)

    def last_good(self, stage: int) -> Path:
        return self.root / "checkpoint.pt"

    def finish(self, metrics: dict) -> None:
        cio.write_json(self.root / "metrics.json", metrics)

    def changed(self) -> bool:
        """Whether the folder holds a run trained from something other than `origin` (another config, colam code or
        input), to be trained afresh (`check_out_dir` refused one holding what colam did not write)."""
        written = cio.written_here(self.root)
        found, origin = self.recorded(), self.origin
        if not written or (found is not None and {k: v for k, v in found.items() if k != "complete"} == origin):
            return False
        why = ("no record of what it was trained from" if found is None else
               ", ".join(k for k in ("run", "code", "inputs") if found.get(k) != origin[k]) + " changed")
        log.info("%s holds a run trained from something else (%s); training afresh", self.root, why)
        return True

    def delete(self) -> None:
        """Delete the folder at once: it is renamed aside first, so that a kill during the deletion
        leaves no half-deleted run, only the renamed folder, which the next start removes."""
        cio.refuse_foreign(self.root, "--out")  # checked at the start; something may have been put there since
        if os.path.lexists(self.aside):  # not colam's, else the start removed it
            raise ColamError(f"--out: '{self.root}' is to be trained afresh, and '{self.aside}', where it is moved to "
                             f"be deleted, holds what colam did not write; move that away")
        folder = self.root.resolve()
        os.replace(folder, self.aside)
        cio.fsync_dir(self.aside.parent)
        shutil.rmtree(self.aside)
        if self.root.is_symlink():  # --out links to the folder: the link is kept, the folder made again
            folder.mkdir()

    def resume(self, config: Config) -> tuple[dict | None, dict | None]:
        """The checkpoint of an earlier run of the same config in the folder, or its metrics when it
        is finished and reported (folders from before provenance was written count as reported)."""
        cio.remove_stale_temporaries(self.root)  # a write cut off by a kill leaves its temporary file
        path, state = self.root / "checkpoint.pt", None
        if path.exists():
            state = _load_checkpoint(path, config, "--out checkpoint", f"--out: '{path}' is not a colam training "
                                     f"checkpoint; use another --out or delete it")
        elif (self.root / "config.yaml").exists():  # a run that never finished its first epoch, or lost its checkpoint
            refuse_other_run(self.root, _read(self.root / "config.yaml", lambda text: parse_yaml(text, "config.yaml")),
                             config)
        found, metrics = self.recorded(), _read(self.root / "metrics.json")
        if (state is not None and state["epoch"] == self.until and (found is None or found.get("complete", True))
                and isinstance(metrics, dict)):
            log.info("%s already holds a completed run; nothing to do", self.root)
            return metrics, None
        return None, state

    def begin(self, prepared) -> None:
        make_dir(self.root, RUN)
        if prepared.world.main:
            cio.write_text(self.root / "config.yaml", yaml.safe_dump(prepared.config.to_dict(), sort_keys=False))
            self.record(complete=False)


class OneStage(Epochs):
    """Stage `stage` of a stage-by-stage run (`fit_stage`): .partial.pt after each epoch, a kill loses one at most."""

    def __init__(self, root: str | Path, stage: int, config: Config, split_dir: str | Path | None = None):
        ends = stage_ends(config)
        if not 1 <= stage <= len(ends):
            raise ColamError(f"--stage: {stage} is not a stage of this run ({config.method.name} trains "
                             f"{len(ends)} stage(s))")
        self.root, self.stage, self.until = Path(root), stage, ends[stage - 1]
        self.start = ends[stage - 2] if stage > 1 else 0
        self.folder, self.previous = self.stage_dir(stage), self.stage_dir(stage - 1) if stage > 1 else None
        self.partial, self.resumed = self.folder / PARTIAL, False
        check_out_dir(self.root, "folder of stages", whole=False)  # each stage folder is an output of its own
        self.origin = provenance(config, split_dir, previous=self.previous)

    def resume(self, config: Config) -> tuple[dict | None, dict | None]:
        """The stage's metrics when the folder holds it finished; else the state after its last epoch when a kill
        cut it off, else the stage before's (None for stage 1)."""
        state = None
        if self.previous is not None:
            if not (self.previous / "state.pt").exists():
                raise ColamError(f"--stage: stage {self.stage} starts from '{self.previous}', which holds no "
                                 f"finished stage; train --stage {self.stage - 1} first")
            state = load_stage_state(self.previous, config, self.start, "--stage", f"stage {self.stage} starts after")
        check_out_dir(self.folder, STAGE)
        found, metrics = self.recorded(), _read(self.folder / "metrics.json")
        if found == {**self.origin, "complete": True} and isinstance(metrics, dict):
            self.partial.unlink(missing_ok=True)
            log.info("%s already holds stage %d of this run; nothing to do", self.folder, self.stage)
            return metrics, None
        if found == {**self.origin, "complete": False} and self.partial.exists():
            self.resumed = True  # killed mid-stage: continue after its last epoch
            return None, _load_checkpoint(self.partial, config, "stage checkpoint", f"stage checkpoint: "
                                          f"'{self.partial}' is not a colam training checkpoint; delete it")
        return None, state

    def begin(self, prepared) -> None:
        """Rank 0: a stage not resumed starts from an empty folder, so that no file of an earlier
        attempt (a soft-label file another setting wrote) stays beside the new ones."""
        if not prepared.world.main:
            return
        make_dir(self.folder, STAGE)
        if not self.resumed:
            cio.empty_folder(self.folder, "--out")
        cio.remove_stale_temporaries(self.folder)
        self.record(complete=False)

    def save(self, state: dict) -> None:  # at the stage's end too: its files are whole then
        cio.save_torch(self.partial, state)

    def last_good(self, stage: int) -> Path:
        return self.partial if self.partial.exists() else self.stage_dir(stage - 1)

    def record(self, complete: bool) -> None:
        super().record(complete)
        if complete:  # the stage's files are whole: the state after its last epoch is spent
            self.partial.unlink(missing_ok=True)


class PipelineStep(Epochs):
    """Step `step` of a pipeline (colam.steps.train_step): `out` alone holds the files of the step's last epoch; it
    starts from the previous step's `checkpoint` and the soft labels estimated after it."""

    estimate = False

    def __init__(self, out: str | Path, step: int, steps: int, ends: list[int], checkpoint: str | Path | None,
                 soft_labels: str | Path | None):
        self.root, self.step, self.until = Path(out), step, ends[step - 1]
        self.start = ends[step - 2] if step > 1 else 0
        self.checkpoint, self.soft_labels, self.learned = checkpoint, soft_labels, {}
        self.info = {"step": step, "steps": steps, "soft_labels_sha256": None}

    def stage_dir(self, stage: int) -> Path:
        return self.root

    def last_good(self, stage: int) -> Path:
        return Path(self.checkpoint) if self.checkpoint is not None else self.root / f"stage_{stage - 1}"

    def resume(self, config: Config) -> tuple[dict | None, dict | None]:
        if self.step == 1:
            return None, None
        if self.checkpoint is None:
            raise ColamError(f"checkpoint: step {self.step} starts from the checkpoint of step {self.step - 1}; "
                             f"none was given")
        state = load_stage_state(self.checkpoint, config, self.start, "checkpoint", f"step {self.step} starts after")
        after_stage = self.start in stage_ends(config)
        self.learned = self.read_estimation(config, METHODS[config.method.name].uses_soft_labels and after_stage)
        state["method"] = {**state["method"], **self.learned}
        if after_stage:  # estimated: the previous stage's online sums are spent
            state["method"].pop("online_sums", None)
        return None, state

    def begin(self, prepared) -> None:
        """Refuse soft labels of other data: C x C for the class labels, N x C for per-sample labels."""
        rows = {"soft_labels": prepared.data.num_classes, "sample_soft_labels": len(prepared.data.train)}
        for name, tensor in self.learned.items():
            where = f"soft_labels: '{Path(self.soft_labels) / name}.npy'"
            check_soft_labels(tensor, prepared.data.num_classes, where)
            if name in rows and len(tensor) != rows[name]:
                raise ColamError(f"{where} has {len(tensor)} rows, this run needs {rows[name]}")
        make_dir(self.root, STAGE)

    def read_estimation(self, config: Config, needed: bool) -> dict:
        """The tensors the estimate step wrote at the step's start, checked against its estimation.json; `needed`:
        the step trains on soft labels, which must be there."""
        step, folder = self.step, self.soft_labels
        if folder is None:
            if needed:
                raise ColamError(f"soft_labels: step {step} of {config.method.name} trains on the soft labels "
                                 f"estimated after step {step - 1}; none were given")
            return {}
        folder = Path(folder)
        summary = _read(folder / ESTIMATION)
        if not isinstance(summary, dict):
            raise ColamError(f"soft_labels: '{folder}' holds no {ESTIMATION}; it is not an estimate step's output")
        if summary.get("epoch") != self.start:
            raise ColamError(f"soft_labels: '{folder}' was estimated at epoch {summary.get('epoch')}, step {step} "
                             f"starts after epoch {self.start}")
        if summary.get("run") != run_digest(config)[:16]:
            raise ColamError(f"soft_labels: '{folder}' was estimated for a run with another configuration")
        if needed and "soft_labels" not in summary.get("artifacts", []):
            raise ColamError(f"soft_labels: '{folder}' holds no soft_labels.npy, which step {step} of "
                             f"{config.method.name} trains on")
        learned, digests = {}, summary.get("sha256", {})
        for name in summary.get("artifacts", []):
            path = folder / f"{name}.npy"
            if not path.is_file() or cio.sha256_file(path) != digests.get(name):
                raise ColamError(f"soft_labels: '{path}' is missing or differs from the file the estimate step "
                                 f"wrote (sha256 in {ESTIMATION})")
            try:
                learned[name] = torch.from_numpy(np.load(path, allow_pickle=False))
            except (OSError, ValueError) as exc:
                raise ColamError(f"soft_labels: cannot read '{path}' ({exc})") from None
        self.info["soft_labels_sha256"] = digests["soft_labels"] if "soft_labels" in learned else None
        return learned


def write_estimation(out: Path, config: Config, fields: dict, artifacts: list[str], main: bool) -> dict:
    """out/estimation.json, the record of an estimate step that `PipelineStep.read_estimation` checks: `fields` (step,
    stage, epoch, seconds), the NAME.npy files it wrote with their digests, and the run's digest. Written last: its
    presence means the folder is complete."""
    summary = {**fields, "artifacts": artifacts,
               "sha256": {name: cio.sha256_file(out / f"{name}.npy") for name in artifacts},
               "run": run_digest(config)[:16]}
    if main:
        cio.write_json(out / ESTIMATION, summary)
    return summary
