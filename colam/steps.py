"""A run as pipeline steps with explicit inputs and outputs: what the Kubeflow components call.

    config = step_config(base, steps=m, method=..., epochs_per_step=t, temperature=T, ...)
    prepare_step(config, split)                                   # split.npz, split.json (+ raw/ when downloaded)
    for k in 1..m:
        train_step(config, k, m, checkpoint_k, checkpoint=checkpoint_{k-1}, soft_labels=soft_labels_{k-1},
                   split_dir=split)                               # model.pt, state.pt, history.csv, metrics.json
        estimate_step(config, k, m, checkpoint_k, soft_labels_k)  # soft_labels.npy/.json, estimation.json
    colam.evaluation.evaluate_run(config, checkpoint_m, report, split)

Each step reads only the folders it is given and writes only its output folder, with the numbers of one `colam train`
process. COLAM's m steps are its m stages; a one-stage method is cut into m equal segments with nothing to estimate,
so one pipeline trains every method on m * t epochs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import yaml

from colam import distributed
from colam import io as cio
from colam.config import Config, from_dict, parse_yaml, validate
from colam.data import save_split
from colam.datasets import BUNDLED, DATASETS, get_data
from colam.engine import RunLog, check_names, estimate_artifacts, prepare, train_into
from colam.errors import ColamError, require
from colam.methods import METHODS, headline_section
from colam.run_folder import (STAGE, PipelineStep, check_out_dir, load_stage_state, make_dir, releasing_claims,
                              stage_ends, write_estimation)

RAW_DATA = "raw"  # the folder of a prepared split that holds a data set downloaded by prepare_step


def step_config(base: dict | str, *, steps: int, method: str | None = None, model: str | None = None,
                dataset: str | None = None, epochs_per_step: int | None = None, temperature: float | None = None,
                seed: int | None = None) -> Config:
    """The config of an m-step run: `base` (a mapping, or its YAML/JSON text) with the headline settings a pipeline
    exposes laid over it; the epoch budget is m * t for every method."""
    raw = _parse(base) if isinstance(base, str) else copy.deepcopy(base)
    if not isinstance(raw, dict):
        raise ColamError(f"config: expected a mapping, got {type(base).__name__}")
    sections = {}
    for name in ("data", "model", "train", "method", "method.colam"):
        parent, _, key = name.rpartition(".")
        sections[name] = (sections[parent] if parent else raw).setdefault(key, {})
        require(isinstance(sections[name], dict), name, sections[name], "expected a mapping")
    require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1, "steps", steps,
            "must be an integer >= 1")
    colam = sections["method.colam"]
    colam["stages"] = steps
    # Where a step runs is the pipeline's business (its GPU requests): a step uses what it is given.
    sections["train"]["device"] = "auto"
    headline = headline_section(sections["method"], method, "temperature")  # T: of whichever method has one
    for value, section, key in ((method, sections["method"], "name"), (model, sections["model"], "name"),
                                (dataset, sections["data"], "name"), (seed, raw, "seed"),
                                (temperature, headline, "temperature"), (epochs_per_step, colam, "epochs_per_stage")):
        if value is not None:
            section[key] = value
    epochs_per_stage = colam.get("epochs_per_stage")
    if isinstance(epochs_per_stage, int) and not isinstance(epochs_per_stage, bool):
        require(epochs_per_stage >= 1, "method.colam.epochs_per_stage", epochs_per_stage, "must be >= 1")
        sections["train"]["epochs"] = steps * epochs_per_stage
    config = from_dict(raw)
    validate(config)
    check_names(config)
    step_ends(config, steps)
    return config


def step_ends(config: Config, steps: int) -> list[int]:
    """The epoch each of the `steps` steps ends at: every stage of the method cut into the same number of equal
    segments (COLAM: a step per stage; hl: m segments of its one stage; label refinery's 2 generations in 4 steps)."""
    stage_epochs = METHODS[config.method.name].stage_epochs(config)
    per_stage, rest = divmod(steps, len(stage_epochs))
    if rest == 0 and all(epochs % per_stage == 0 for epochs in stage_epochs):
        return [end - epochs + epochs * k // per_stage for epochs, end in zip(stage_epochs, stage_ends(config))
                for k in range(1, per_stage + 1)]
    described = f"{len(stage_epochs)} stage(s) of {'/'.join(map(str, sorted(set(stage_epochs))))} epochs"
    key = "train.epochs" if len(stage_epochs) == 1 else f"method.{config.method.name}"
    raise ColamError(f"{key}: {config.method.name} trains {described}, which do not split into {steps} equal "
                     f"pipeline steps per stage; compile the pipeline for a multiple of {len(stage_epochs)} stages "
                     f"that divides them")


def prepare_step(config: Config, out: str | Path) -> dict:
    """Write the split of `config` to `out`, and to `out/raw` a data set that is downloaded and the bundled digits'
    arrays: the steps after it read them there, not downloading again (or importing scikit-learn, a second a step)."""
    data, out = config.data, Path(out)
    if data.download and DATASETS[data.name].needs_files:
        cio.take_folder(out, "split")
        cio.make_folder(out / RAW_DATA, manifest=False)  # what torchvision downloads there is colam's
        data = dataclasses.replace(data, root=str(out / RAW_DATA))
    summary = save_split(data, out)
    if not DATASETS[data.name].needs_files:
        get_data(data.name, BUNDLED, out / RAW_DATA)
    return summary


def run_config(text: str, split_dir: str | Path) -> Config:
    """The config a step receives (JSON text, as prepare wrote it), reading the data of `split_dir`."""
    config = from_dict(_parse(text))
    validate(config)
    return with_split(config, split_dir)


def _parse(text: str) -> dict:
    # Text, not a mapping: a Kubeflow struct parameter turns every integer into a float.
    try:
        raw = parse_yaml(text, "config")
    except yaml.YAMLError as exc:
        raise ColamError(f"config: not valid YAML or JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ColamError(f"config: expected a mapping, got {type(raw).__name__}")
    return raw


def with_split(config: Config, split_dir: str | Path) -> Config:
    """`config` reading its images where prepare_step left them: `split_dir/raw` when it exists."""
    raw = Path(split_dir) / RAW_DATA
    data = dataclasses.replace(config.data, root=str(raw), download=False)
    return dataclasses.replace(config, data=data) if raw.is_dir() else config


ESTIMATE = "soft-label estimate"  # the kind of output (colam.io manifests) an estimate step's folder is


def _open_step(config: Config, step: int, steps: int, out: str | Path, kind: str) -> list[int]:
    ends = step_ends(config, steps)
    if not 1 <= step <= steps:
        raise ColamError(f"step: {step} is not a step of a {steps}-step run")
    check_out_dir(Path(out), kind)
    return ends


@releasing_claims
def train_step(config: Config, step: int, steps: int, out: str | Path, *, checkpoint: str | Path | None = None,
               soft_labels: str | Path | None = None, split_dir: str | Path | None = None,
               run_log: RunLog | None = None, progress: bool = False) -> dict:
    """Train step `step` (1-based) of `steps` into `out` from the step before's folders; returns out/metrics.json."""
    ends = _open_step(config, step, steps, out, STAGE)
    train_into(PipelineStep(out, step, steps, ends, checkpoint, soft_labels), config, split_dir, run_log, progress)
    return json.loads((Path(out) / "metrics.json").read_text())


@releasing_claims
def estimate_step(config: Config, step: int, steps: int, checkpoint: str | Path, out: str | Path, *,
                  split_dir: str | Path | None = None) -> dict:
    """What the method learns at the end of `step` (COLAM: soft labels), into `out`; returns out/estimation.json."""
    ends = _open_step(config, step, steps, out, ESTIMATE)
    out, epoch = Path(out), ends[step - 1]
    state = load_stage_state(checkpoint, config, epoch, "checkpoint", f"step {step} ends at")
    seconds, stage, artifacts = 0.0, None, []
    make_dir(out, ESTIMATE)
    if epoch in stage_ends(config):  # a one-stage method learns nothing at a segment's end
        stage = stage_ends(config).index(epoch) + 1
        prepared = prepare(config, split_dir)
        cio.load_weights(prepared.model, state["model"], "checkpoint model", state["model_file"])
        prepared.method.load_state_dict(state["method"])
        seconds, artifacts = estimate_artifacts(prepared, stage, out, epoch)
        distributed.barrier()  # under torchrun: rank 0 has written the files the digests are taken of
    return write_estimation(out, config, {"step": step, "stage": stage, "epoch": epoch, "seconds": round(seconds, 3)},
                            artifacts, distributed.current().main)
