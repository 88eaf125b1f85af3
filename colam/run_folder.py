"""The run folder: its layout, the run's identity, what it was trained from, how a run continues.

    config.yaml, checkpoint.pt (the state after the last epoch), history.csv (a row per epoch), metrics.json
    stage_K/model.pt, state.pt (what stage K+1 starts from), history.csv, metrics.json, export.pt,
            NAME.npy, soft_labels.json (what the method learned at the stage's end)
    .provenance.json  what the run (stage_K/: the stage, trained alone) was trained from, and if it is complete
    .partial.pt       stage_K/ of a stage trained alone: its state after each epoch while it trains
    estimation.json   an estimate step's folder (colam.steps): what it estimated, with digests

Where the epochs of one training call go is an `Epochs`: a `WholeRun` (`fit`), `OneStage` trained
alone (`fit_stage`, the DVC chain) or a `PipelineStep` (the Kubeflow steps). `run_digest(config)`
is the run's one digest: the same run on any machine, device or data path.
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
from pathlib import Path

import numpy as np
import torch
import yaml

from colam import io as cio
from colam.config import Config
from colam.errors import ColamError
from colam.methods import METHODS

log = logging.getLogger("colam")

HISTORY_FIELDS = ["epoch", "stage", "lr", "train_loss", "train_acc", "val_acc", "test_acc", "seconds"]
# Beside a run's (or a stage's) files, and ignored by DVC (.dvcignore) so that they never change an
# output's hash: what the files were trained from, and a stage's state while it trains.
PROVENANCE = ".provenance.json"
PARTIAL = ".partial.pt"
ESTIMATION = "estimation.json"
# What colam and its runners write into a run folder: anything else is someone's own and is never deleted.
RUN_FILES = {"config.yaml", "checkpoint.pt", "history.csv", "metrics.json", PROVENANCE}
# The files of a stage folder: its weights and states (.pt), learned arrays (.npy) and these.
STAGE_FILES = {"history.csv", "metrics.json", "soft_labels.json", ESTIMATION, PROVENANCE}
CHECKPOINT_KEYS = {"epoch", "model", "optimizer", "method", "history", "elapsed", "config"}


def stage_ends(config: Config) -> list[int]:
    """The epoch each stage of the run ends at (the epochs its stage_K folders are written at)."""
    return np.cumsum(METHODS[config.method.name].stage_epochs(config)).tolist()


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


def run_digest(config: Config | dict) -> str:
    """The sha256 (hex) of the run's identity: the one digest of a run (.provenance.json holds it
    whole, estimation.json its first 16 digits; tracking may key its runs by it)."""
    settings = config if isinstance(config, dict) else config.to_dict()
    return hashlib.sha256(json.dumps(run_identity(settings), sort_keys=True).encode()).hexdigest()


def refuse_other_run(folder: Path, saved: object, config: Config, what: str = "run") -> None:
    """Refuse a run or stage whose saved configuration is another run's than `config`."""
    if not isinstance(saved, dict) or run_identity(saved) != run_identity(config.to_dict()):
        difference = (_first_difference(run_identity(saved), run_identity(config.to_dict()))
                      if isinstance(saved, dict) else "unreadable")
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
    return {"run": run_digest(config), "code": code_digest(), "inputs": inputs}


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_provenance(folder: Path) -> dict | None:
    found = _read_json(folder / PROVENANCE)
    return found if isinstance(found, dict) else None


def _write_provenance(folder: Path, origin: dict, complete: bool) -> None:
    cio.write_json(folder / PROVENANCE, {**origin, "complete": complete})



def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ColamError(f"--out: '{out_dir}' exists and is not a folder")


def make_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ColamError(f"--out: cannot create '{out_dir}' ({exc.strerror})") from None


def write_history(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()  # epochs that were not scored (train.eval_every) leave val_acc and test_acc empty
    writer = csv.DictWriter(buffer, fieldnames=[f for f in HISTORY_FIELDS if any(f in row for row in history)])
    writer.writeheader()
    writer.writerows({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} for row in history)
    cio.write_text(path, buffer.getvalue())


def write_stage(folder: Path, resume: dict, metrics: dict) -> None:
    """The rest of a stage's folder: what the next stage resumes from, the curves so far, the metrics."""
    cio.save_torch(folder / "state.pt", resume)  # the weights are in model.pt, next to it
    write_history(folder / "history.csv", resume["history"])
    cio.write_json(folder / "metrics.json", metrics)


def _load_checkpoint(path: Path, config: Config | None, what: str, refusal: str, keys=CHECKPOINT_KEYS) -> dict:
    """A saved training state of this run (checkpoint.pt, .partial.pt, a stage's state.pt) holding
    `keys`; `refusal`: the error for a file that is none."""
    state = cio.load_torch(path, what)
    if not isinstance(state, dict) or not keys <= state.keys():
        raise ColamError(refusal)
    if config is not None:
        refuse_other_run(path.parent, state["config"], config, "run" if path.name == "checkpoint.pt" else "stage")
    state["model_file"] = path  # where the weights came from, for error messages
    return state


def load_stage_state(stage_dir: str | Path, config: Config | None = None) -> dict:
    """The training state saved at the end of a stage (model.pt + state.pt), checked against `config`."""
    path = Path(stage_dir) / "state.pt"
    state = _load_checkpoint(path, config, "stage state", f"stage state: '{path}' is not a colam stage state",
                             CHECKPOINT_KEYS - {"model"})
    state["model"] = cio.load_torch(path.parent / "model.pt", "stage model")
    state["model_file"] = path.parent / "model.pt"
    return state


def check_resumable(where: Path, state: dict, execution: dict, world_size: int) -> None:
    """Refuse a saved state trained on another kind of device path (what `auto` chose there)."""
    saved = state.get("execution")  # absent from checkpoints written before it was recorded
    if saved is not None and saved != execution:
        def describe(e):
            return f"{e['precision']} on the {'device-resident' if e['data_on_device'] else 'DataLoader'} data path"

        raise ColamError(f"--out: '{where}' was trained in {describe(saved)}; `auto` settings would continue it in "
                         f"{describe(execution)} on this machine; resume it on the same kind of device")
    if state.get("world_size", world_size) != world_size:
        log.warning("%s was trained by %d process(es), it continues with %d: the global batch is the same, the "
                    "per-process batches and BatchNorm statistics are not", where, state["world_size"], world_size)


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



class Epochs:
    """Where the epochs of one training call, up to epoch `until`, go: the folder of each stage end
    (and of `until` when it ends mid-stage), the state kept after each epoch (`save`, on rank 0),
    the state a diverged epoch names (`last_good`), the files of the run's end (`finish`)."""

    root: Path
    until: int
    estimate = True  # learn at a stage end (soft labels); a pipeline step leaves it to its estimate step
    info: dict = {}  # added to the metrics.json of the folders written

    def stage_dir(self, stage: int) -> Path:
        return self.root / f"stage_{stage}"

    def save(self, history: list[dict], state: dict) -> None: ...
    def last_good(self, stage: int) -> Path: ...
    def finish(self, metrics: dict) -> None: ...


class WholeRun(Epochs):
    """A whole run (`fit`): checkpoint.pt and history.csv after every epoch, metrics.json at the end,
    .provenance.json says what it was trained from and whether the run log heard its end."""

    def __init__(self, root: str | Path, config: Config):
        self.root, self.until = Path(root), config.train.epochs
        check_out_dir(self.root)
        # where the folder is renamed to be deleted (ignored by DVC as a temporary, .*.tmp)
        self.aside = self.root.resolve().parent / f".{self.root.resolve().name}.deleting.tmp"
        if self.aside.is_dir():  # a deletion a kill cut off (`delete`)
            shutil.rmtree(self.aside, ignore_errors=True)

    def save(self, history: list[dict], state: dict) -> None:
        write_history(self.root / "history.csv", history)
        cio.save_torch(self.root / "checkpoint.pt", state)

    def last_good(self, stage: int) -> Path:
        return self.root / "checkpoint.pt"

    def finish(self, metrics: dict) -> None:
        cio.write_json(self.root / "metrics.json", metrics)

    def changed(self, origin: dict) -> bool:
        """Whether the folder holds a run trained from something other than `origin` (another config,
        colam code or input), to be trained afresh; refuses a folder holding files colam did not write."""
        entries = [p for p in self.root.iterdir() if not cio.is_temporary(p)] if self.root.is_dir() else []
        found = _read_provenance(self.root)
        if not entries or (found is not None and {k: v for k, v in found.items() if k != "complete"} == origin):
            return False
        foreign = [p.name for p in entries if not (p.name in RUN_FILES or (p.is_dir() and p.name.startswith("stage_")))]
        if foreign or not any(p.name in RUN_FILES for p in entries):
            raise ColamError(f"--out: '{self.root}' was trained from something else and holds files the run did "
                             f"not write ({', '.join(sorted(foreign)[:3]) or 'no run files'}); it is not deleted: move "
                             f"them or choose another --out")
        for folder in entries:
            if folder.is_dir() and folder.name.startswith("stage_"):
                _check_stage_folder(folder)
        why = ("no record of what it was trained from" if found is None else
               ", ".join(k for k in ("run", "code", "inputs") if found.get(k) != origin[k]) + " changed")
        log.info("%s holds a run trained from something else (%s); training afresh", self.root, why)
        return True

    def delete(self) -> None:
        """Delete the folder at once: it is renamed aside first, so that a kill during the deletion
        leaves no half-deleted run, only the renamed folder, which the next start removes."""
        os.replace(self.root.resolve(), self.aside)
        cio.fsync_dir(self.aside.parent)
        shutil.rmtree(self.aside)

    def resume_state(self, config: Config) -> dict | None:
        """The checkpoint of an earlier run of the same config in the folder, or None to start afresh."""
        cio.remove_stale_temporaries(self.root)  # a write cut off by a kill leaves its temporary file
        path = self.root / "checkpoint.pt"
        if path.exists():
            return _load_checkpoint(path, config, "--out checkpoint", f"--out: '{path}' is not a colam training "
                                    f"checkpoint; use another --out or delete it")
        if (self.root / "config.yaml").exists():  # a run that never finished its first epoch, or lost its checkpoint
            try:
                saved = yaml.safe_load((self.root / "config.yaml").read_text())
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                saved = None
            refuse_other_run(self.root, saved, config)
        return None

    def finished(self, state: dict | None) -> dict | None:
        """The metrics of the run when the folder holds it finished and reported (folders from before
        provenance was written count as reported), else None."""
        if state is None or state["epoch"] != self.until:
            return None
        found = _read_provenance(self.root)
        metrics = _read_json(self.root / "metrics.json")
        return metrics if (found is None or found.get("complete", True)) and isinstance(metrics, dict) else None

    def begin(self, config: Config, origin: dict, main: bool) -> None:
        make_dir(self.root)
        if main:
            cio.write_text(self.root / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
            _write_provenance(self.root, origin, complete=False)

    def complete(self, origin: dict) -> None:
        _write_provenance(self.root, origin, complete=True)  # after the run log heard the end


class OneStage(Epochs):
    """Stage `stage` of a stage-by-stage run (`fit_stage`): stage_K/ holds the stage's files, its
    .provenance.json, and .partial.pt after every epoch so that a killed stage loses at most one."""

    def __init__(self, root: str | Path, stage: int, config: Config):
        ends = stage_ends(config)
        if not 1 <= stage <= len(ends):
            raise ColamError(f"--stage: {stage} is not a stage of this run ({config.method.name} trains "
                             f"{len(ends)} stage(s))")
        self.root, self.stage, self.until = Path(root), stage, ends[stage - 1]
        self.start, self.folder = ends[stage - 2] if stage > 1 else 0, self.stage_dir(stage)
        self.previous = self.stage_dir(stage - 1) if stage > 1 else None
        check_out_dir(self.root)
        if (self.root / "checkpoint.pt").exists():
            raise ColamError(f"--out: '{self.root}' holds a whole run (checkpoint.pt); train --stage writes a folder "
                             f"of stages, choose another --out")

    def open(self, config: Config) -> dict | None:
        """The state this stage starts from (the stage before's, None for stage 1), refusing a folder
        it cannot train into."""
        state = None
        if self.previous is not None:
            if not (self.previous / "state.pt").exists():
                raise ColamError(f"--stage: stage {self.stage} starts from '{self.previous}', which holds no "
                                 f"finished stage; train --stage {self.stage - 1} first")
            state = load_stage_state(self.previous, config)
            if state["epoch"] != self.start:
                raise ColamError(f"--stage: '{self.previous}' ends at epoch {state['epoch']}, stage {self.stage} "
                                 f"starts after epoch {self.start}")
        check_out_dir(self.folder)
        return state

    def resume(self, origin: dict, config: Config) -> tuple[dict | None, dict | None]:
        """(metrics, None) when the folder holds this stage finished; (None, the state after its last
        epoch) when a kill cut it off; (None, None) to train it afresh."""
        found = _read_provenance(self.folder)
        if found == {**origin, "complete": True} and (self.folder / "metrics.json").exists():
            (self.folder / PARTIAL).unlink(missing_ok=True)
            log.info("%s already holds stage %d of this run; nothing to do", self.folder, self.stage)
            return json.loads((self.folder / "metrics.json").read_text()), None
        if found == {**origin, "complete": False} and (self.folder / PARTIAL).exists():
            partial = self.folder / PARTIAL
            return None, _load_checkpoint(partial, config, "stage checkpoint", f"stage checkpoint: '{partial}' is not "
                                          f"a colam training checkpoint; delete it")
        _check_stage_folder(self.folder)
        return None, None

    def begin(self, origin: dict, resumed: bool) -> None:
        """Rank 0, before training: a stage not resumed starts from an empty folder, so that no file of
        an earlier attempt (a soft-label file another setting wrote) stays beside the new ones."""
        if not resumed and self.folder.is_dir():
            _check_stage_folder(self.folder)
            for path in self.folder.iterdir():
                path.unlink()
        cio.remove_stale_temporaries(self.folder)
        _write_provenance(self.folder, origin, complete=False)

    def save(self, history: list[dict], state: dict) -> None:  # at the stage's end too: its files are whole then
        cio.save_torch(self.folder / PARTIAL, state)

    def last_good(self, stage: int) -> Path:
        partial = self.folder / PARTIAL
        return partial if partial.exists() else self.stage_dir(stage - 1)

    def complete(self, origin: dict) -> None:
        _write_provenance(self.folder, origin, complete=True)  # after the run log heard the end
        (self.folder / PARTIAL).unlink(missing_ok=True)


class PipelineStep(Epochs):
    """A pipeline step (colam.steps.train_step): `out` alone holds the files of the step's last epoch."""

    estimate = False

    def __init__(self, out: Path, until: int, checkpoint: Path | None, info: dict):
        self.root, self.until, self.checkpoint, self.info = out, until, checkpoint, info

    def stage_dir(self, stage: int) -> Path:
        return self.root

    def last_good(self, stage: int) -> Path:
        return self.checkpoint or self.root / f"stage_{stage - 1}"


def write_estimation(out: Path, config: Config, fields: dict, artifacts: list[str], main: bool) -> dict:
    """out/estimation.json, the record of an estimate step: `fields` (step, stage, epoch, seconds),
    the NAME.npy files it wrote with their digests, and the run's digest. Written last: its
    presence means the folder is complete."""
    summary = {**fields, "artifacts": artifacts,
               "sha256": {name: cio.sha256_file(out / f"{name}.npy") for name in artifacts},
               "run": run_digest(config)[:16]}
    if main:
        cio.write_json(out / ESTIMATION, summary)
    return summary


def read_estimation(folder: str | Path | None, epoch: int, config: Config, step: int,
                    needed: bool) -> tuple[dict, str | None]:
    """The tensors an estimate step wrote at `epoch`, checked against its record, and the digest of
    soft_labels.npy; `needed`: the step trains on soft labels, which must be there."""
    if folder is None:
        if needed:
            raise ColamError(f"soft_labels: step {step} of {config.method.name} trains on the soft labels estimated "
                             f"after step {step - 1}; none were given")
        return {}, None
    folder = Path(folder)
    summary = _read_json(folder / ESTIMATION)
    if summary is None:
        raise ColamError(f"soft_labels: '{folder}' holds no {ESTIMATION}; it is not an estimate step's output")
    if not isinstance(summary, dict) or summary.get("epoch") != epoch:
        found = summary.get("epoch") if isinstance(summary, dict) else None
        raise ColamError(f"soft_labels: '{folder}' was estimated at epoch {found}, step {step} starts after "
                         f"epoch {epoch}")
    if summary.get("run") != run_digest(config)[:16]:
        raise ColamError(f"soft_labels: '{folder}' was estimated for a run with another configuration")
    if needed and "soft_labels" not in summary.get("artifacts", []):
        raise ColamError(f"soft_labels: '{folder}' holds no soft_labels.npy, which step {step} of "
                         f"{config.method.name} trains on")
    learned = {}
    for name in summary.get("artifacts", []):
        path = folder / f"{name}.npy"
        if not path.is_file() or cio.sha256_file(path) != summary.get("sha256", {}).get(name):
            raise ColamError(f"soft_labels: '{path}' is missing or differs from the file the estimate step wrote "
                             f"(sha256 in {ESTIMATION})")
        try:
            learned[name] = torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise ColamError(f"soft_labels: cannot read '{path}' ({exc})") from None
    return learned, (cio.sha256_file(folder / "soft_labels.npy") if "soft_labels" in learned else None)
