"""MLflow tracking for colam runs: the one place that knows MLflow.

One parent run per training run, holding the run's parameters, the per-epoch curves and the final
metrics; one nested run per stage, holding that stage's curves (step = epoch), its checkpoint
(`model.pt`, a state_dict), its soft labels (`soft_labels.npy` and a heatmap) and its metrics.

A run trained in pieces (a resumed run, or a pipeline that runs each stage as its own step)
continues the same parent run: the parent is found again by its `colam.run_key` tag, a digest of
the output folder and the configuration, among the experiment's unfinished runs.

The tracking store is `MLFLOW_TRACKING_URI`, or `sqlite:///mlflow.db` in the current folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from colam import io as cio
from colam.config import Config
from colam.engine import RunLog, run_identity
from colam.errors import ColamError
from colam.methods import METHODS

log = logging.getLogger("colam")

DEFAULT_URI = "sqlite:///mlflow.db"
CURVES = ("train_loss", "train_acc", "val_acc", "test_acc", "lr", "seconds")
FINAL = ("test_acc", "val_acc", "train_acc", "train_loss", "wall_time_s")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def connect(uri: str | None = None) -> MlflowClient:
    """A client of `uri` that has answered once, so a wrong server fails before training starts."""
    uri = uri or tracking_uri()
    remote = uri.startswith(("http://", "https://"))
    # MLflow retries a refused connection for minutes by default: one quick try tells us enough.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    if remote:
        os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # connection refused, DNS, auth, a bad sqlite path: one line
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ColamError(f"MLFLOW_TRACKING_URI: cannot use the tracking store '{uri}' ({reason})") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            elif remote:
                os.environ[key] = value
    return client


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name)


def protocol_digest(config: Config) -> str:
    """12 hex digits naming the data, model and training settings: runs compare only within one."""
    identity = run_identity(config.to_dict())
    return _digest({section: identity[section] for section in ("data", "model", "train")})[:12]


def variant(config: Config) -> str:
    """The method and its settings other than the temperature, e.g. 'ls(eps=0.1, convention=C)'."""
    settings = {k: v for k, v in METHODS[config.method.name].hyperparameters(config).items() if k != "temperature"}
    inner = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"{config.method.name}({inner})" if inner else config.method.name


def flat_params(config: Config) -> dict[str, str]:
    """The config as dotted keys; of the method sections only the one of the method trained."""
    settings = config.to_dict()
    method = settings.pop("method")
    settings["method"] = {"name": method["name"], method["name"]: method[method["name"]]}
    flat: dict[str, str] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value and key != "options":
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)

    walk(settings, "")
    return flat


def summary_params(config: Config) -> dict[str, str]:
    """The parameters the runs are compared by, under short names."""
    summary = {"method": config.method.name, "model": config.model.name, "dataset": config.data.name,
               "seed": str(config.seed), "git_commit": git_commit() or "unknown"}
    if config.method.name == "colam":
        section = config.method.colam
        summary.update(T=str(section.temperature), m=str(section.stages), t=str(section.epochs_per_stage),
                       peers=str(section.peers))
    return summary


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def soft_label_heatmap(soft_labels: np.ndarray, class_names: list[str], title: str, path: Path) -> Path:
    """A C×C heatmap of the soft labels as a PNG: row c is the label of class c."""
    from pipelines import figures

    return figures.save_png(figures.soft_label_heatmap(soft_labels, class_names, title), path, dpi=110)


STAGE_FILES = ("model.pt", "export.pt", "metrics.json", "soft_labels.npy", "soft_labels.json", "sample_soft_labels.npy",
               "learned_labels.npy", "learned_sample_labels.npy")


def log_stage_files(client: MlflowClient, run_id: str, stage_dir: Path, stage: int, config: Config) -> None:
    """A stage folder's checkpoint, metrics and soft labels (with their heatmap) as artifacts of `run_id`."""
    for name in STAGE_FILES:
        if (stage_dir / name).exists():
            client.log_artifact(run_id, str(stage_dir / name))
    if (stage_dir / "soft_labels.npy").exists():
        soft_labels = np.load(stage_dir / "soft_labels.npy")
        names = json.loads((stage_dir / "soft_labels.json").read_text())["class_names"]
        title = f"soft labels after stage {stage} (T = {config.method.colam.temperature:g})"
        with tempfile.TemporaryDirectory() as scratch:
            figure = soft_label_heatmap(soft_labels, names, title, Path(scratch) / f"soft_labels_stage_{stage}.png")
            client.log_artifact(run_id, str(figure), artifact_path="figures")


def parent_key(config: Config, key: str) -> str:
    """The `colam.run_key` tag of a run: its configuration and the name of the run it belongs to."""
    return _digest({"out_dir": key, "run": run_identity(config.to_dict())})[:16]


def find_parent(client: MlflowClient, experiment: str, config: Config, key: str) -> str:
    """The newest parent run tagged with this run key, finished or not (pipeline steps after training)."""
    found = _newest_parent(client, experiment, parent_key(config, checked_key(key)))
    if found is None:
        raise ColamError(f"MLFLOW_TRACKING_URI: no run of this pipeline run ('{key}') in experiment '{experiment}'; "
                         f"the training step logs it first")
    return found


def run_parent(client: MlflowClient, experiment: str, config: Config, out_dir: str | Path) -> str:
    """The newest parent run of the run trained into `out_dir` (by `colam train --track`) with `config`."""
    found = _newest_parent(client, experiment, parent_key(config, str(Path(out_dir).resolve())))
    if found is None:
        uri = re.sub(r"://[^/@]*@", "://***@", client.tracking_uri)  # a database URI may carry a password
        raise ColamError(f"--run: no MLflow run of '{out_dir}' in experiment '{experiment}' at {uri}; "
                         f"train it with --track first, or analyse without --track")
    return found


def _newest_parent(client: MlflowClient, experiment: str, run_key: str) -> str | None:
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs(
        [found.experiment_id], f"tags.`colam.run_key` = '{run_key}' and tags.`colam.role` = 'parent'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def log_estimate(client: MlflowClient, experiment: str, config: Config, key: str, folder: Path, summary: dict) -> None:
    """An estimate step's soft labels, heatmap and time, on the stage run of the stage they end."""
    if summary["stage"] is None:
        return
    parent = find_parent(client, experiment, config, key)
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' and tags.`colam.stage` = '{summary['stage']}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ColamError(f"MLFLOW_TRACKING_URI: run {parent} has no stage {summary['stage']} to log soft labels to")
    run_id = runs[0].info.run_id
    client.log_metric(run_id, "estimation_seconds", float(summary["seconds"]), step=summary["epoch"])
    log_stage_files(client, run_id, folder, summary["stage"], config)


def log_evaluation(client: MlflowClient, experiment: str, config: Config, key: str, report: Path,
                   metrics: dict) -> None:
    """The evaluation's scalars (prefixed eval_) and report files on the parent run."""
    parent = find_parent(client, experiment, config, key)
    now = int(time.time() * 1000)
    scalars = [Metric(f"eval_{k}", float(v), now, metrics["evaluated_epoch"]) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith(("test_", "val_"))]
    client.log_batch(parent, metrics=scalars)
    log_files(client, parent, [report / "metrics.json", report / "predictions.csv"], "evaluation")


def log_files(client: MlflowClient, run_id: str, paths: list[Path], artifact_path: str) -> None:
    for path in paths:
        if path.exists():
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def tracking_client() -> MlflowClient | None:
    """A pipeline step tracks when MLFLOW_TRACKING_URI is set: a client that has answered, or None."""
    return connect() if os.environ.get("MLFLOW_TRACKING_URI") else None


def step_run_log(client: MlflowClient | None, experiment: str, out_dir: str | Path, run_key: str,
                 run_name: str | None = None):
    """The run log of a pipeline's training step: every step of one pipeline run shares `run_key`."""
    from contextlib import nullcontext

    if client is None:
        return nullcontext(None)
    return MlflowRunLog(client, experiment, out_dir, run_name=run_name or None, run_key=checked_key(run_key) or None)


def checked_key(run_key: str) -> str:
    """A pipeline run's key, refused when the backend left the placeholder unresolved (every run
    would then share one key, and one MLflow run)."""
    if run_key.startswith("{{"):
        raise ColamError(f"run_key: the pipeline backend passed the placeholder {run_key!r} unresolved; tracking a "
                         f"pipeline run in MLflow needs Kubeflow Pipelines 2.4 or newer")
    return run_key


class MlflowRunLog(RunLog):
    """Reports a colam run to MLflow; use it as a context manager so a crash marks the runs FAILED."""

    def __init__(self, client: MlflowClient, experiment: str, out_dir: str | Path, run_name: str | None = None,
                 run_key: str | None = None):
        """`run_key` names the run across processes whose out_dir differs (a Kubeflow run's id);
        by default the run is named by its out_dir."""
        self.client, self.experiment, self.out_dir, self.run_name = client, experiment, Path(out_dir), run_name
        self.key = run_key
        self.parent_id: str | None = None  # the parent run while it is open
        self.run_id: str | None = None  # the parent run, also after finish()
        self.stage_id: str | None = None
        self.config: Config | None = None
        self.last_stage_dir: Path | None = None
        self.resumed_from = 0

    # --------------------------------------------------------------- RunLog hooks

    def start(self, config: Config, info: dict) -> None:
        self.config = config
        self.resumed_from = info["resumed_from_epoch"]
        self.experiment_id = experiment_id(self.client, self.experiment)
        run_key = parent_key(config, self.key or str(self.out_dir.resolve()))
        if info["resumed_from_epoch"] > 0:
            condition = f"tags.`colam.run_key` = '{run_key}' and tags.`colam.role` = 'parent'"
            # A pipeline run's key is unique to it: a retried last step continues its parent even
            # after that parent finished. Without a key, a finished run with this out_dir is an old one.
            self.parent_id = self._newest(condition) if self.key else self._unfinished(condition)
        if self.parent_id is not None:
            log.info("MLflow: continuing run %s", self.parent_id)
            self.client.update_run(self.parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self.run_id = self.parent_id
            return
        tags = {"colam.role": "parent", "colam.run_key": run_key, "colam.method": config.method.name,
                "colam.variant": variant(config), "colam.seed": str(config.seed),
                "colam.protocol": protocol_digest(config), "colam.out_dir": str(self.out_dir),
                MLFLOW_RUN_NAME: self.run_name or self.out_dir.name}
        if "temperature" in METHODS[config.method.name].hyperparameters(config):
            tags["colam.temperature"] = str(float(config.method.colam.temperature))
        commit = git_commit()
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=tags[MLFLOW_RUN_NAME])
        self.parent_id = self.run_id = run.info.run_id
        params = {**flat_params(config), **summary_params(config),
                  **{k: str(v) for k, v in info.items() if k != "resumed_from_epoch"}}
        for batch in _chunks([Param(k, v[:6000]) for k, v in params.items()], 100):  # MLflow's batch limit
            self.client.log_batch(self.parent_id, params=batch)
        log.info("MLflow: run %s in experiment '%s' at %s", self.parent_id, self.experiment, self.client.tracking_uri)

    def stage_start(self, stage: int) -> None:
        self.stage_id = self._unfinished(f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_id}' and "
                                         f"tags.`colam.stage` = '{stage}'")
        if self.stage_id is not None and self._last_epoch(self.stage_id) > self.resumed_from:
            # An interrupted attempt logged epochs that this process trains again (a pipeline step
            # re-runs its stage from the start): keep that attempt as it is, log this one apart.
            self.stage_id = None
        if self.stage_id is None:
            tags = {MLFLOW_PARENT_RUN_ID: self.parent_id, "colam.role": "stage", "colam.stage": str(stage),
                    MLFLOW_RUN_NAME: f"stage {stage}"}
            self.stage_id = self.client.create_run(self.experiment_id, tags=tags, run_name=f"stage {stage}").info.run_id

    def epoch_end(self, stage: int, row: dict) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), now, row["epoch"]) for k in CURVES if k in row]
        # The parent gets the whole curve at the end, from history.csv: a stage trained again after
        # an interruption would otherwise leave its first attempt's epochs in the parent's curves.
        self.client.log_batch(self.stage_id, metrics=metrics)

    def stage_end(self, stage: int, stage_dir: Path, metrics: dict) -> None:
        now = int(time.time() * 1000)
        scalars = {f"stage_{k}": v for k, v in metrics.items() if k in ("test_acc", "val_acc", "train_acc")}
        if metrics.get("estimation_seconds") is not None:  # None: a later pipeline step estimates
            scalars["estimation_seconds"] = metrics["estimation_seconds"]
        self.client.log_batch(self.stage_id, metrics=[Metric(k, float(v), now, metrics["epoch"])
                                                      for k, v in scalars.items()])
        log_stage_files(self.client, self.stage_id, stage_dir, stage, self.config)
        self.client.set_terminated(self.stage_id, RunStatus.to_string(RunStatus.FINISHED))
        self.stage_id = None
        self.last_stage_dir = stage_dir

    def finish(self, metrics: dict, out_dir: Path) -> None:
        now = int(time.time() * 1000)
        # The last stage's state holds every epoch at full precision, however the run was split up.
        history = cio.load_torch(self.last_stage_dir / "state.pt", "stage state")["history"]
        curves = [Metric(k, float(row[k]), now, row["epoch"]) for row in history for k in CURVES if k in row]
        history_path = next(p for p in (out_dir / "history.csv", self.last_stage_dir / "history.csv") if p.exists())
        final = [Metric(k, float(metrics[k]), now, metrics["epochs"]) for k in FINAL if k in metrics]
        for batch in _chunks(curves + final, 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.parent_id, metrics=batch)
        for path in (out_dir / "config.yaml", history_path, out_dir / "metrics.json"):
            if path.exists():
                self.client.log_artifact(self.parent_id, str(path))
        self.client.set_terminated(self.parent_id, RunStatus.to_string(RunStatus.FINISHED))
        self.parent_id = None

    # --------------------------------------------------------------- context

    def __enter__(self) -> MlflowRunLog:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """On an error mark the open runs; after a stage that is not the last, the parent stays RUNNING."""
        if kind is None:
            return
        status = RunStatus.KILLED if issubclass(kind, KeyboardInterrupt) else RunStatus.FAILED
        for run_id in (self.stage_id, self.parent_id):
            if run_id is not None:
                try:
                    self.client.set_terminated(run_id, RunStatus.to_string(status))
                except Exception as exc:  # the original error matters more than this one
                    log.warning("MLflow: could not mark run %s %s (%s)", run_id, RunStatus.to_string(status), exc)

    def _last_epoch(self, run_id: str) -> int:
        return max((m.step for m in self.client.get_metric_history(run_id, "lr")), default=0)

    def _unfinished(self, condition: str) -> str | None:
        return self._newest(f"{condition} and attributes.status != 'FINISHED'")

    def _newest(self, condition: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], condition, order_by=["attributes.start_time DESC"],
                                       max_results=1)
        return runs[0].info.run_id if runs else None


def _chunks(items: list, size: int):
    return (items[i : i + size] for i in range(0, len(items), size))


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
