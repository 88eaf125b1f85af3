"""MLflow tracking for colam runs: the one place that knows MLflow.

One parent run per training run, holding the run's parameters, the per-epoch curves and the final metrics; one nested
run per stage, holding that stage's curves (step = epoch), its checkpoint (`model.pt`, a state_dict), its soft labels
(`soft_labels.npy` and a heatmap) and its metrics.

The run folder is the record, the store a view of it: `MlflowRunLog.catch_up` (at every stage end and at the finish)
and `colam tracking sync DIR` (at any time) bring the store up to what the folder holds, adding only what the store
misses, so they may run any number of times and after a kill at any moment. A run trained in pieces (resumed, or a
pipeline step per stage) continues the same parent run, found by its `colam.run_key` tag (a digest of the output
folder, or the pipeline run's key, and the configuration).

The tracking store is `MLFLOW_TRACKING_URI`, or `sqlite:///mlflow.db` in the current folder. Each call is retried with
exponential backoff for COLAM_TRACKING_RETRY_SECONDS (default 8) in all; a store that still does not answer costs one
warning, never the training.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException, RestException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from colam import io as cio
from colam.config import Config, dotted_items
from colam.data import SPLIT_KEYS
from colam.engine import RunLog, run_metrics
from colam.run_folder import HISTORY_FIELDS, run_digest, run_identity
from colam.runs import RunFolder, open_run
from colam.errors import ColamError, redact
from colam.methods import METHODS

log = logging.getLogger("colam")


DEFAULT_URI = "sqlite:///mlflow.db"
CURVES = ("train_loss", "train_acc", "val_acc", "test_acc", "lr", "seconds")
FINAL = ("test_acc", "val_acc", "train_acc", "train_loss", "wall_time_s")
NOT_SCALARS = ("step", "steps")  # numbers in a stage's metrics that are not logged as its scalars
STAGE_FILES = ("model.pt", "export.pt", "metrics.json", "soft_labels.npy", "soft_labels.json", "sample_soft_labels.npy",
               "learned_labels.npy", "learned_sample_labels.npy")
# MLflow 3's UI opens an experiment by its kind: one of model training shows its runs, not the GenAI overview
KIND_TAG, TRAINING = "mlflow.experimentKind", "custom_model_development"
# The live curves: a run log sends the epochs that ended at most this often, and the rest at the stage end
# (a write per epoch was a tenth of a short run's time on sqlite; an epoch of a real run takes longer than this).
EPOCH_SECONDS = 5.0


def connect(uri: str | None = None, create: bool = True) -> MlflowClient:
    """A client of `uri` that has answered once, so a wrong server fails before training starts; a sqlite store that
    does not exist is created, or refused where the caller only reads (`create`)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    database = sqlite_path(uri)
    if database is not None and not create and not database.is_file():
        raise ColamError(f"MLFLOW_TRACKING_URI: there is no MLflow store at '{database}' to read")
    if database is not None and create and _read_only(database):  # else every write fails, each after retries
        raise ColamError(f"MLFLOW_TRACKING_URI: the MLflow store '{database}' cannot be written (a read-only "
                         f"file, folder or file system); make it writable or track into another store")
    try:
        # MLflow retries a refused connection for minutes by default: one quick try tells us enough.
        with bounded_http(timeout=10), contextlib.ExitStack() as held:
            # A fresh sqlite store is created (its migrations run) by the first process that opens it: parallel runs
            # (dvc queue start -j N) take turns there, or the migrations collide. No lock where the folder cannot be
            # written to: opening the store then says why.
            if database is not None:
                with contextlib.suppress(OSError):
                    held.enter_context(FileLock(database.with_name(database.name + ".lock")))
                if not database.exists():
                    # Made whole, then renamed into place: a kill during MLflow's migrations leaves only the temporary
                    # file (the next creation starts it again), never a half-made store.
                    scratch = database.with_name(f".{database.name}.creating.tmp")
                    scratch.unlink(missing_ok=True)
                    MlflowClient(tracking_uri=f"sqlite:///{scratch.resolve()}").search_experiments(max_results=1)
                    os.replace(scratch, database)
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as exc:  # connection refused, DNS, auth, a bad sqlite path: one line
        raise ColamError(f"MLFLOW_TRACKING_URI: cannot use the tracking store '{display_uri(uri)}' "
                         f"({_reason(exc)})") from None
    return client


def _read_only(database: Path) -> bool:
    """Whether sqlite cannot write `database`: it writes the file and a journal beside it in its folder."""
    if not database.parent.is_dir():
        return False  # opening the store says that the folder is missing
    return not os.access(database.parent, os.W_OK) or (database.exists() and not os.access(database, os.W_OK))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (None for other stores and in-memory databases)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    try:
        database = make_url(uri).database
    except Exception:  # a malformed URI: MLflow says why when it opens it
        return None
    return Path(database) if database and database != ":memory:" else None


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment `name`, made if missing, and said to be one of model training."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={KIND_TAG: TRAINING})
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # a parallel run created it in between
            if experiment is None:
                raise
    if KIND_TAG not in experiment.tags:  # made before colam said what it holds: the UI would guess
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, TRAINING)
    return experiment.experiment_id


def split_input(config: Config, source: str) -> DatasetInput:
    """The split a run trained on, as an MLflow dataset: the data set's name, a digest of the data settings that draw
    the split (the same split gives the same digest, whichever runner prepared it) and where it is."""
    digest = _digest({key: getattr(config.data, key) for key in SPLIT_KEYS})[:16]
    kind = source.split("://", 1)[0] if "://" in source else "local"
    dataset = Dataset(config.data.name, digest, kind, json.dumps({"uri": source}))
    return DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "train")])


def protocol_digest(config: Config) -> str:
    """12 hex digits naming the data, model and training settings: runs compare only within one."""
    identity = run_identity(config.to_dict())
    return _digest({section: identity[section] for section in ("data", "model", "train")})[:12]


def variant(config: Config) -> str:
    """The method and its settings other than its headline (T), e.g. 'ls(eps=0.1, convention=C)'."""
    method = METHODS[config.method.name]
    settings = {k: v for k, v in method.hyperparameters(config).items() if k not in method.headline}
    inner = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"{config.method.name}({inner})" if inner else config.method.name


def flat_params(config: Config) -> dict[str, str]:
    """The config as dotted keys; of the method sections only the one of the method trained."""
    settings = config.to_dict()
    method = settings.pop("method")
    settings["method"] = {"name": method["name"], method["name"]: method[method["name"]]}
    return {key: json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            for key, value in dotted_items(settings)}


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


@contextlib.contextmanager
def stage_files(folder: Path, stage: int, config: Config, held: set[str] = frozenset()):
    """A stage folder's checkpoint, metrics and soft labels, with a heatmap of the soft labels drawn into a temporary
    folder while the block runs (unless `held` has it already): (path, artifact folder, name to report) each."""
    from pipelines import figures

    # only what colam wrote there: a link planted in the folder must not upload a file from elsewhere
    files = [(folder / name, None, f"stage_{stage}/{name}") for name in STAGE_FILES if cio.wrote(folder / name)]
    with tempfile.TemporaryDirectory() as scratch:
        if (folder / "soft_labels.npy").exists() and f"figures/soft_labels_stage_{stage}.png" not in held:
            names = json.loads((folder / "soft_labels.json").read_text())["class_names"]
            temperature = METHODS[config.method.name].headline_values(config).get("temperature")
            title = f"soft labels after stage {stage}" + (f" (T = {temperature:g})" if temperature is not None else "")
            heatmap = figures.soft_label_heatmap(np.load(folder / "soft_labels.npy"), names, title)
            figure = figures.save_png(heatmap, Path(scratch) / f"soft_labels_stage_{stage}.png", dpi=110)
            files.append((figure, "figures", f"figures/{figure.name}"))
        yield files


def parent_key(config: Config, key: str) -> str:
    """The `colam.run_key` tag of a run: its configuration and the name of the run it belongs to."""
    return _digest({"out_dir": key, "run": run_digest(config)})[:16]


def parent_condition(run_key: str) -> str:
    return f"tags.`colam.run_key` = '{run_key}' and tags.`colam.role` = 'parent'"


def stage_condition(parent_id: str, stage: int) -> str:
    return f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and tags.`colam.stage` = '{stage}'"


def newest_run(client: MlflowClient, experiment: str, condition: str):
    """The newest run of experiment id `experiment` that meets `condition`, or None."""
    runs = client.search_runs([experiment], condition, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def find_parent(client: MlflowClient, experiment: str, config: Config, key: str) -> str:
    """The newest parent run tagged with this run key, finished or not (pipeline steps after training)."""
    return _newest_parent(client, experiment, parent_key(config, checked_key(key)),
                          f"MLFLOW_TRACKING_URI: no run of this pipeline run ('{key}') in experiment '{experiment}'; "
                          f"the training step logs it first")


def run_parent(client: MlflowClient, experiment: str, config: Config, out_dir: str | Path) -> str:
    """The newest parent run of the run trained into `out_dir` (by `colam train --track`) with `config`."""
    return _newest_parent(client, experiment, parent_key(config, str(Path(out_dir).resolve())),
                          f"--run: no MLflow run of '{out_dir}' in experiment '{experiment}' at "
                          f"{display_uri(client.tracking_uri)}; train it with --track first, or analyse without "
                          f"--track")


def _newest_parent(client: MlflowClient, experiment: str, run_key: str, missing: str) -> str:
    found = client.get_experiment_by_name(experiment)
    run = None if found is None else newest_run(client, found.experiment_id, parent_condition(run_key))
    if run is None:
        raise ColamError(missing)
    return run.info.run_id


def log_estimate(client: MlflowClient, experiment: str, config: Config, key: str, folder: Path, summary: dict) -> None:
    """An estimate step's soft labels, heatmap and time, on the stage run of the stage they end."""
    if summary["stage"] is None:
        return
    parent = find_parent(client, experiment, config, key)
    run = newest_run(client, client.get_run(parent).info.experiment_id, stage_condition(parent, summary["stage"]))
    if run is None:
        raise ColamError(f"MLFLOW_TRACKING_URI: run {parent} has no stage {summary['stage']} to log soft labels to")
    client.log_metric(run.info.run_id, "estimation_seconds", float(summary["seconds"]), step=summary["epoch"])
    with stage_files(folder, summary["stage"], config) as files:
        for path, artifact_path, _ in files:
            client.log_artifact(run.info.run_id, str(path), artifact_path=artifact_path)


def log_evaluation(client: MlflowClient, experiment: str, config: Config, key: str, report: Path,
                   metrics: dict) -> None:
    """The evaluation's scalars (prefixed eval_) and report files on the parent run."""
    parent, now = find_parent(client, experiment, config, key), _now_ms()
    scalars = [Metric(f"eval_{k}", float(v), now, metrics["evaluated_epoch"]) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith(("test_", "val_"))]
    client.log_batch(parent, metrics=scalars)
    log_files(client, parent, [report / "metrics.json", report / "predictions.csv"], "evaluation")


def log_files(client: MlflowClient, run_id: str, paths: list[Path], artifact_path: str) -> None:
    for path in filter(Path.exists, paths):
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_points(client: MlflowClient, run_id: str, metrics: dict[str, list]) -> None:
    """Each metric's (step, value) points on run `run_id`, in one batch."""
    now = _now_ms()
    batch = [Metric(key, float(value), now, int(step)) for key, points in metrics.items() for step, value in points]
    if batch:
        client.log_batch(run_id, metrics=batch)


def tracking_client() -> MlflowClient | None:
    """A pipeline step tracks when MLFLOW_TRACKING_URI is set: a client that has answered, or None."""
    return connect() if os.environ.get("MLFLOW_TRACKING_URI") else None


def step_run_log(client: MlflowClient | None, experiment: str, out_dir: str | Path, run_key: str,
                 run_name: str | None = None, data_source: str | None = None):
    """The run log of a pipeline's training step: the steps of one pipeline run share `run_key`; `data_source`: the
    URI of the split artifact it trains on."""
    if client is None:
        return contextlib.nullcontext(None)
    return MlflowRunLog(client, experiment, out_dir, run_name=run_name or None, run_key=checked_key(run_key) or None,
                        data_source=data_source)


def checked_key(run_key: str) -> str:
    """A pipeline run's key, refused if the backend left its placeholder unresolved (all would share one MLflow run)."""
    if run_key.startswith("{{"):
        raise ColamError(f"run_key: the pipeline backend passed the placeholder {run_key!r} unresolved; tracking a "
                         f"pipeline run in MLflow needs Kubeflow Pipelines 2.4 or newer")
    return run_key


# --------------------------------------------------------------- a store that may not answer

RETRY_ENV = "COLAM_TRACKING_RETRY_SECONDS"  # seconds of retries of one call before the run log falls behind
DEFAULT_RETRY_S = 8.0
FIRST_DELAY_S = 0.25  # then 0.5, 1, 2, 4 ... while the total stays within the budget
HTTP_TIMEOUT_S = 30  # per request (connect, read) unless MLFLOW_HTTP_REQUEST_TIMEOUT says otherwise
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                    "COULD_NOT_ACQUIRE_LOCK", "SERVICE_UNDER_MAINTENANCE"}
_BOTO_TRANSPORT = {"ConnectionError", "HTTPClientError"}  # the bases of botocore's transport errors
_S3_RETRYABLE = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "503", "500"}
_S3_REFUSALS = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket")
_STORE_MODULES = {"mlflow", "requests", "urllib3", "botocore", "boto3", "sqlalchemy", "sqlite3"}


def retry_seconds() -> float:
    raw = os.environ.get(RETRY_ENV, "").strip() or str(DEFAULT_RETRY_S)
    with contextlib.suppress(ValueError):
        if 0 <= float(raw) < float("inf"):
            return float(raw)
    raise ColamError(f"{RETRY_ENV}: expected seconds >= 0, got {raw!r}")


def bounded_http(timeout: float | None = None):
    """For the calls inside: no retries of MLflow's own (ours retry; its default retries a refused connection for
    minutes), a request timeout, and at most 3 attempts of boto3 (a direct s3:// store)."""
    return mock.patch.dict(os.environ, {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout or os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or HTTP_TIMEOUT_S),
        "AWS_MAX_ATTEMPTS": os.environ.get("AWS_MAX_ATTEMPTS") or "3"})


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _root(exc: BaseException) -> str:
    return type(exc).__module__.split(".")[0]


def store_error(exc: BaseException) -> bool:
    """An error of the tracking or artifact store (not a bug of ours, which is raised as it is)."""
    return isinstance(exc, OSError) or any(_root(e) in _STORE_MODULES for e in _chain(exc))


def transient(exc: BaseException) -> bool:
    """Whether a failed call may succeed when tried again: the store unreachable, a timeout, HTTP 5xx, a busy sqlite
    database, an S3 upload that failed on the storage side."""
    for e in _chain(exc):
        name, root, text = type(e).__name__, _root(e), str(e)
        if isinstance(e, (ConnectionError, TimeoutError)) or "database is locked" in text or root == "urllib3":
            return True
        if root == "requests":
            response = getattr(e, "response", None)
            return response is None or response.status_code >= 500  # HTTPError of a 4xx: a refusal
        if name == "ClientError" and root == "botocore":
            metadata, error = e.response.get("ResponseMetadata", {}), e.response.get("Error", {})
            return metadata.get("HTTPStatusCode", 0) >= 500 or error.get("Code") in _S3_RETRYABLE
        if root == "botocore" and _BOTO_TRANSPORT & {base.__name__ for base in type(e).__mro__}:
            return True
        if name == "S3UploadFailedError":
            return not any(code in text for code in _S3_REFUSALS)
        if isinstance(e, RestException):
            return e.error_code in _TRANSIENT_CODES or e.get_http_status_code() >= 500
        if isinstance(e, MlflowException) and (e.error_code in _TRANSIENT_CODES or "api request to" in text.lower()
                                               and re.search(r"failed with exception|timeout|error code 5\d\d",
                                                             text, re.IGNORECASE)):
            return True
    return False


def _reason(exc: BaseException) -> str:
    """One short line: the innermost error that says something (e.g. 'ConnectionRefusedError: ...')."""
    said = [e for e in _chain(exc) if str(e).strip()]
    if not said:
        return type(exc).__name__
    return f"{type(said[-1]).__name__}: {str(said[-1]).strip().splitlines()[0]}"[:240]


class Refused(Exception):
    """A call the store did not take: `transient` after the retries, or refused outright."""

    def __init__(self, what: str, error: BaseException, tries: int, transient: bool):
        self.what, self.tries, self.transient, self.reason = what, tries, transient, _reason(error)
        super().__init__(f"{what}: {self.reason}")


def with_retries(what: str, call, budget: float):
    """call(), tried again with exponential backoff on transient store errors for `budget` seconds in all (at least
    one retry unless the budget is 0); Refused when it never succeeds."""
    began, delay, tries = time.monotonic(), FIRST_DELAY_S, 0
    while True:
        tries += 1
        try:
            with bounded_http():
                return call()
        except Exception as exc:
            if not store_error(exc):
                raise
            if not transient(exc):
                raise Refused(what, exc, tries, transient=False) from exc
            if budget <= 0 or (tries > 1 and time.monotonic() - began + delay > budget):
                raise Refused(what, exc, tries, transient=True) from exc
            log.info("MLflow: %s failed (%s); try %d in %.2f s", what, _reason(exc), tries + 1, delay)
            time.sleep(delay)
            delay *= 2


def ui_link(uri: str, experiment: str, run_id: str) -> str:
    """Where to see a run: its page in the UI of an http(s) store, opened on model training (MLflow 3.17's UI opens on
    its GenAI pages unless told, whatever the experiment's kind), else the store."""
    if not uri.startswith(("http://", "https://")):
        return display_uri(uri)
    return f"{display_uri(uri).rstrip('/')}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"


def display_uri(uri: str) -> str:
    """The store's URI for a message or a command: no password, a sqlite path made absolute."""
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        return f"sqlite:///{path.resolve()}"
    return redact(uri)


# --------------------------------------------------------------- what a run folder holds


@dataclass
class FolderState:
    """What a run folder holds, as the store should show it: its finished stage folders and, when the run is over, its
    final metrics and the files of the parent run."""

    stages: dict[int, Path]
    final: dict | None = None
    parent_files: tuple[Path, ...] = ()
    history: list[dict] | None = None  # every epoch at full precision (the last stage's state), once the run is over


def read_folder(out_dir: Path, config: Config, stage_dirs: dict[int, Path], final: dict | None) -> FolderState:
    """The finished stages of `out_dir` (stage_K/ with its metrics.json and state.pt, plus the folders a run log was
    told of), and the final metrics once the last stage is there."""
    stages = dict(stage_dirs)
    for folder in out_dir.glob("stage_*"):
        number = folder.name.removeprefix("stage_")
        if number.isdigit() and (folder / "metrics.json").is_file() and (folder / "state.pt").is_file():
            stages.setdefault(int(number), folder)
    stages = dict(sorted(stages.items()))
    count = len(METHODS[config.method.name].stage_epochs(config))
    # A whole run ends with its metrics.json; a run trained stage by stage (or step) with its last stage.
    whole_run = (out_dir / "checkpoint.pt").is_file()
    if final is None and whole_run and (out_dir / "metrics.json").is_file():
        final = json.loads((out_dir / "metrics.json").read_text())
    last = _stage_state(stages[count]) if count in stages and (final or not whole_run) else None
    if final is None and last is not None and not whole_run and last["epoch"] == config.train.epochs:
        final = run_metrics(config, last["history"], last["elapsed"])
    if final is None or last is None:
        return FolderState(stages=stages)
    history = next(p for p in (out_dir / "history.csv", stages[count] / "history.csv") if p.exists())
    files = tuple(p for p in (out_dir / "config.yaml", history, out_dir / "metrics.json") if cio.wrote(p))
    return FolderState(stages=stages, final=final, parent_files=files, history=last["history"])


def _stage_state(folder: Path) -> dict:
    """A stage's state.pt: the history of every epoch so far at full precision, without the weights."""
    return cio.load_torch(folder / "state.pt", "stage state")


# --------------------------------------------------------------- the store as a view of the folder


class StoreView:
    """One run's runs in the store (a parent, a nested run per stage), brought up to a run folder by adding only what
    the store misses; each call is retried (`with_retries`), and one the store did not take raises `Refused`."""

    def __init__(self, client: MlflowClient, experiment: str):
        self.client, self.experiment = client, experiment
        self.budget = retry_seconds()
        self.not_uploaded: list[str] = []  # artifacts the store refused while it otherwise answered
        self.upload_error: Refused | None = None  # why, in this pass
        self.counts = {"runs": 0, "epochs": 0, "artifacts": 0}

    def call(self, what: str, fn):
        return with_retries(what, fn, self.budget)

    @functools.cached_property
    def experiment_id(self) -> str:
        return self.call(f"experiment '{self.experiment}'", lambda: experiment_id(self.client, self.experiment))

    def newest(self, condition: str):
        return self.call("search runs", lambda: newest_run(self.client, self.experiment_id, condition))

    def create(self, tags: dict, name: str) -> str:
        run = self.call(f"create run '{name}'", lambda: self.client.create_run(
            self.experiment_id, start_time=_now_ms(), tags={**tags, MLFLOW_RUN_NAME: name}, run_name=name))
        self.counts["runs"] += 1
        return run.info.run_id

    def create_stage(self, parent_id: str, stage: int) -> str:
        return self.create({MLFLOW_PARENT_RUN_ID: parent_id, "colam.role": "stage", "colam.stage": str(stage)},
                           f"stage {stage}")

    def logged_epochs(self, run_id: str) -> set[int]:
        return {m.step for m in self.call("metric history", lambda: self.client.get_metric_history(run_id, "lr"))}

    def last_epoch(self, run_id: str) -> int:
        return max(self.logged_epochs(run_id), default=0)

    def log(self, run_id: str, metrics: list[Metric] = (), params: list[Param] = ()) -> None:
        for batch in _chunks(list(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.call(f"log_batch to run {run_id}", lambda b=batch: self.client.log_batch(run_id, metrics=b))
        for batch in _chunks(list(params), 100):
            self.call(f"log_batch to run {run_id}", lambda b=batch: self.client.log_batch(run_id, params=b))

    def end(self, run_id: str, status: str) -> None:
        self.call(f"end run {run_id}", lambda: self.client.set_terminated(run_id, status, end_time=_now_ms()))

    def held(self, run_id: str) -> set[str]:
        """The artifacts a run holds; none, and no upload tried, when the store answers but its artifact storage does
        not (S3 down behind a proxying server)."""
        try:
            return self.call(f"list artifacts of run {run_id}", lambda: artifact_names(self.client, run_id))
        except Refused as refused:
            self.storage_refused(refused)
            return set()

    def upload(self, run_id: str, files: list[tuple[Path, str | None, str]], held: set[str]) -> None:
        """Upload the (path, artifact folder, name to report) the run does not hold yet. After an upload the store
        refuses while it answers (its S3 is down), the rest are noted untried."""
        for path, folder, name in files:
            if (f"{folder}/{path.name}" if folder else path.name) in held:
                continue
            if self.upload_error is None:
                try:
                    self.call(f"upload {name}", lambda p=path, f=folder: self.client.log_artifact(run_id, str(p), f))
                    self.counts["artifacts"] += 1
                    continue
                except Refused as refused:
                    self.storage_refused(refused)
            self.not_uploaded.append(name)

    def storage_refused(self, refused: Refused) -> None:
        """A call the store refused: raised on unless the store answers (then its artifact storage is down: noted)."""
        if not self.answers():
            raise refused
        self.upload_error = refused

    def answers(self) -> bool:
        """One quick request; tried twice, as a server that answered an error may have closed the connection the client
        keeps for the next request (which then fails at once, reset)."""
        for _ in range(2):
            try:
                with bounded_http(timeout=5):
                    self.client.search_experiments(max_results=1)
                return True
            except Exception as exc:
                if not store_error(exc):
                    raise
        return False


def artifact_names(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= artifact_names(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def sync_stage(view: StoreView, parent_id: str, stage: int, folder: Path, config: Config, recheck: bool) -> None:
    """The nested run of a finished stage: its epochs, its scalars, its files, FINISHED. A FINISHED run is looked into
    again only when `recheck` (a sync; a training process checked it at its end)."""
    run = view.newest(stage_condition(parent_id, stage))
    finished = run is not None and run.info.status == "FINISHED"
    if finished and not recheck:
        return
    run_id = run.info.run_id if run is not None else view.create_stage(parent_id, stage)
    logged = view.logged_epochs(run_id)  # not only the newest: the live hooks send epochs every few seconds
    rows = [r for r in _stage_state(folder)["history"] if r["stage"] == stage and r["epoch"] not in logged]
    view.log(run_id, epoch_metrics(rows))
    view.counts["epochs"] += len(rows)
    if run is None or not {"stage_test_acc", "stage_train_acc"} <= run.data.metrics.keys():
        view.log(run_id, stage_scalars(json.loads((folder / "metrics.json").read_text())))
    held = view.held(run_id)
    with stage_files(folder, stage, config, held) as files:
        view.upload(run_id, files, held)
    if not finished:
        view.end(run_id, "FINISHED")


def sync_parent_end(view: StoreView, parent_id: str, state: FolderState) -> None:
    """The parent of a finished run: every epoch's curves, the final metrics, its files, FINISHED."""
    logged, now = view.last_epoch(parent_id), _now_ms()
    curves = epoch_metrics([row for row in state.history if row["epoch"] > logged], now)
    final = [Metric(k, float(state.final[k]), now, state.final["epochs"]) for k in FINAL if k in state.final]
    view.log(parent_id, curves + (final if logged < state.final["epochs"] else []))
    view.upload(parent_id, [(path, None, path.name) for path in state.parent_files], view.held(parent_id))
    view.end(parent_id, "FINISHED")


def epoch_metrics(rows: list[dict], now: int | None = None) -> list[Metric]:
    now = now or _now_ms()
    return [Metric(k, float(row[k]), now, row["epoch"]) for row in rows for k in CURVES if k in row]


def stage_scalars(metrics: dict) -> list[Metric]:
    """A stage's accuracies, its estimation time and what the method reports of its end (COLAM: label rows that did
    not favour their class), at the stage's last epoch."""
    scalars = {f"stage_{k}": v for k, v in metrics.items() if k in ("test_acc", "val_acc", "train_acc")}
    # the other numbers: the estimation time (None where a later pipeline step estimates) and the method's reports
    scalars.update({k: v for k, v in metrics.items() if k not in HISTORY_FIELDS and k not in NOT_SCALARS
                    and isinstance(v, (int, float)) and not isinstance(v, bool)})
    now = _now_ms()
    return [Metric(k, float(v), now, metrics["epoch"]) for k, v in scalars.items()]


def log_final_model(view: StoreView, run_id: str, run: RunFolder, register: str | None) -> None:
    """The run's final network as an MLflow model of its parent run (PyTorch flavor, with test images as input example
    and the signature they give), once; and a version of the registered model `register`, once. A model that cannot be
    made or stored here costs a warning (what is missing: `view.not_uploaded`)."""
    model_id = _logged_model(view, run_id)
    if model_id is None and view.upload_error is None:  # else the artifact storage refused this pass
        try:
            from colam.datasets import build_raw_data
            from colam.runs import final_network

            data = build_raw_data(run.config.data.name, run.config.data.root, download=False)
            network = final_network(run, len(data.classes), data.in_channels, "--out")
            # the first two test images as the network sees them, as its input example (two: MLflow saves the network
            # as torch.export traces it, and a batch of one would fix the batch size at 1)
            example = np.stack([data.test[i][0].numpy() for i in range(2)])
            # a retry first looks for what the try before it logged
            model_id = view.call("log the model", lambda: _logged_model(view, run_id) or _log_model(
                view, run_id, network, example))
        except Refused as refused:  # as an upload: the store answers, its artifact storage does not
            view.storage_refused(refused)
        except Exception as exc:  # no data set here (a sync elsewhere), a network torch.export cannot trace
            view.upload_error = Refused("log the model", exc, 1, transient=False)
    if model_id is None:
        view.not_uploaded.append("the final network (an MLflow model)")
        return
    if register:
        view.call(f"register model '{register}'", lambda: _register(view.client, run_id, model_id, register))


def _logged_model(view: StoreView, run_id: str) -> str | None:
    """The id of the model run `run_id` logged whole (a log cut off by a store fault leaves one not READY)."""
    found = view.call("search logged models", lambda: view.client.search_logged_models(
        [view.experiment_id], filter_string=f"source_run_id = '{run_id}'"))
    return next((model.model_id for model in found if str(model.status) == "READY"), None)


def _log_model(view: StoreView, run_id: str, network, example: np.ndarray) -> str:
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        logits = network(torch.from_numpy(example)).numpy()
    with _fluent(view.client.tracking_uri, view.experiment_id):
        # the requirements given, not inferred (MLflow would import and trace modules for seconds)
        info = mlflow.pytorch.log_model(network, name="model", signature=infer_signature(example, logits),
                                        input_example=example, run_id=run_id,
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_id


@contextlib.contextmanager
def _fluent(uri: str, experiment: str | None = None):
    """MLflow's fluent API (it logs and registers models) pointed at this store and the run's experiment (not its
    default one) while the block runs; it keeps both in the environment, which is given back after."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    with mock.patch.dict(os.environ):
        mlflow.set_tracking_uri(uri)
        if experiment is not None:
            mlflow.set_experiment(experiment_id=experiment)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)  # None: unset


def _register(client: MlflowClient, run_id: str, model_id: str, name: str):
    """The version of registered model `name` that holds run `run_id`'s model: found, or made now."""
    import mlflow

    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        return found[0]
    with _fluent(client.tracking_uri), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):  # MLflow's own lines: colam says it below
        version = mlflow.register_model(f"models:/{model_id}", name)
    log.info("MLflow: the final network of run %s is version %s of the registered model '%s'", run_id,
             version.version, name)
    return version


def log_comparison(client: MlflowClient, comparison, files: list[Path], register: str | None, alias: str) -> str:
    """`colam compare --track`: the table and figure as artifacts of the experiment's comparison run of the protocol
    (made once, its files replaced after); with `register`, the best run's network as a version of that registered
    model, `alias` pointing at it. One line saying what was logged."""
    view = StoreView(client, comparison.experiment)
    tags = {"colam.role": "comparison", "colam.protocol": comparison.protocol}
    try:
        found = view.newest(" and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items()))
        run_id = found.info.run_id if found else view.create(tags, f"comparison {comparison.protocol}")
        for path in files:
            view.call(f"upload {path.name}", lambda p=path: client.log_artifact(run_id, str(p)))
        view.end(run_id, "FINISHED")
        said = f"MLflow: the comparison is run {run_id} of experiment '{comparison.experiment}'"
        if not register:
            return said
        if comparison.best_run is None:
            raise ColamError(f"--register: no compared run logged a val_acc to choose the {alias} by")
        model_id = _logged_model(view, comparison.best_run)
        if model_id is None:
            raise ColamError(f"--register: the best run {comparison.best_run} logged no model (trained before "
                             f"models were logged?); log it with colam tracking sync on its folder")
        version = view.call(f"register model '{register}'", lambda: _register(client, comparison.best_run, model_id,
                                                                              register))
        view.call(f"alias {alias}", lambda: client.set_registered_model_alias(register, alias, version.version))
        return f"{said}; '{register}' version {version.version} ({alias}) is run {comparison.best_run}"
    except Refused as refused:
        raise ColamError(f"MLFLOW_TRACKING_URI: the tracking store {display_uri(client.tracking_uri)} did not take "
                         f"{refused.what} ({refused.reason}); the comparison's files are written, run the same "
                         f"command again when it answers") from None


def sync(run_dir: str | Path, experiment: str) -> str:
    """`colam tracking sync DIR`: bring the store up to what the run folder DIR holds; one line."""
    run = open_run(run_dir, "DIR", finished=False)  # a run killed mid-way is synced as far as it got
    client = connect()
    run_log = MlflowRunLog(client, experiment, run.path)
    run_log.attach(run.config)
    try:
        run_log.catch_up(find_finished=True, recheck=True)
    except Refused as refused:
        raise ColamError(f"{run_dir}: the tracking store {display_uri(client.tracking_uri)} did not take "
                         f"{refused.what} ({refused.reason}); run the same command again when it answers") from None
    counts, view = run_log.view.counts, run_log.view
    said = (f"{counts['runs']} runs created, {counts['epochs']} epochs and {counts['artifacts']} artifacts sent"
            if any(counts.values()) else "nothing sent")
    if view.not_uploaded:
        raise ColamError(f"{run_dir}: {said}; not uploaded: {', '.join(view.not_uploaded)} "
                         f"({view.upload_error.reason}); run the same command again when the store answers")
    return f"{run_dir}: the tracking store holds what the folder holds ({said}) at {display_uri(client.tracking_uri)}"


def open_run_log(experiment: str, out_dir: str | Path, run_name: str | None = None, data_source: str | None = None,
                 register: str | None = None) -> MlflowRunLog:
    """The run log of `colam train --track`: the store must answer now (a wrong URI fails at once)."""
    return MlflowRunLog(connect(), experiment, out_dir, run_name=run_name, data_source=data_source, register=register)


class MlflowRunLog(RunLog, contextlib.AbstractContextManager):
    """Reports a colam run to MLflow; use it as a context manager so a crash marks the runs FAILED.

    The live hooks send the epochs that ended, every EPOCH_SECONDS at most. A store that does not answer costs one
    warning; the run log then waits for a stage end or the finish at which it answers again to `catch_up`, and
    `colam tracking sync DIR` catches up from the files at any time."""

    def __init__(self, client: MlflowClient, experiment: str, out_dir: str | Path, run_name: str | None = None,
                 run_key: str | None = None, data_source: str | None = None, register: str | None = None):
        """`run_key` names the run across processes whose out_dir differs (a Kubeflow run's id); by default the run is
        named by its out_dir. `data_source`: where the split it trains on is (a folder or URI; default data.root);
        `register`: the registered model its final network becomes a version of."""
        self.client, self.experiment, self.out_dir, self.run_name = client, experiment, Path(out_dir), run_name
        self.pipeline_key, self.data_source, self.register = run_key, data_source, register
        self.run_key = ""  # the parent run's `colam.run_key` tag, once attached
        self.view = StoreView(client, experiment)
        self.config: Config | None = None
        self.info: dict = {}
        self.parent_id: str | None = None  # the parent run while it is open
        self.run_id: str | None = None  # the parent run, also after finish()
        self.stage_id: str | None = None
        self.unsent: list[dict] = []  # epochs of the open stage not sent yet
        self.sent_at = -EPOCH_SECONDS  # time.monotonic() of the last send: the first epoch is sent at once
        self.stage_dirs: dict[int, Path] = {}
        self.synced: set[int] = set()  # stages this process found or left FINISHED (a sync looks at them again)
        self.final: dict | None = None
        self.resumed_from = 0
        self.behind = False  # the store did not take the last call: hooks wait for a sync point
        self.warned = False  # one warning per run log, however often the store falls behind

    @property
    def command(self) -> str:
        """The command that brings the store up to the run folder."""
        return (f"MLFLOW_TRACKING_URI={shlex.quote(display_uri(self.client.tracking_uri))} colam tracking sync "
                f"{shlex.quote(str(self.out_dir))} --experiment {shlex.quote(self.experiment)}")

    # --------------------------------------------------------------- RunLog hooks

    def attach(self, config: Config) -> None:
        """The run this log reports: its configuration names its parent run (`parent_key`)."""
        self.config = config
        self.run_key = parent_key(config, self.pipeline_key or str(self.out_dir.resolve()))

    def start(self, config: Config, info: dict) -> None:
        self.attach(config)
        self.resumed_from = info["resumed_from_epoch"]
        self.info = {k: str(v) for k, v in info.items() if k != "resumed_from_epoch"}
        self._guarded(lambda: self.catch_up(find_finished=bool(self.pipeline_key), resumed=self.resumed_from > 0))
        if self.parent_id is not None and not self.behind:
            log.info("MLflow: run %s in experiment '%s' at %s", self.parent_id, self.experiment,
                     ui_link(self.client.tracking_uri, self.view.experiment_id, self.parent_id))

    def stage_start(self, stage: int) -> None:
        if not self.behind:
            self._guarded(lambda: self._open_stage(stage))

    def epoch_end(self, stage: int, row: dict) -> None:
        self.unsent.append(row)
        if not self.behind and self.stage_id is not None and time.monotonic() - self.sent_at >= EPOCH_SECONDS:
            self._send_unsent()

    def stage_end(self, stage: int, stage_dir: Path, metrics: dict) -> None:
        self.stage_dirs[stage] = Path(stage_dir)
        self.stage_id, self.unsent = None, []  # the stage's sync sends every epoch the store lacks
        self.synced.discard(stage)  # trained here: its run is not the one a sync at the start may have finished
        self._sync_point()

    def finish(self, metrics: dict, out_dir: Path) -> None:
        self.final = metrics
        self._sync_point()
        self.parent_id = None

    def log_files(self, paths: list[Path], artifact_path: str) -> None:
        """Files of the run (e.g. a pipeline's split.json) as artifacts of the parent run."""
        files = [(Path(p), artifact_path, Path(p).name) for p in paths if Path(p).exists()]
        if self.run_id is not None:
            self._guarded(lambda: self.view.upload(self.run_id, files, self.view.held(self.run_id)))
        self._tell_not_uploaded()

    # --------------------------------------------------------------- catching up with the folder

    def catch_up(self, find_finished: bool = False, resumed: bool = True, recheck: bool = False) -> None:
        """Bring the store up to the folder: the parent (found by its key, or created), every finished stage, and the
        parent's end once the run is over. Idempotent; `recheck` looks into the finished stage runs again (their
        files)."""
        self.view.upload_error = None  # each pass tries the uploads again
        if self.parent_id is None:
            # A pipeline run's key is unique to it: a retried last step continues its parent even after that parent
            # finished. Without a key, a finished run with this out_dir is an old one.
            unfinished = "" if find_finished else " and attributes.status != 'FINISHED'"
            found = self.view.newest(parent_condition(self.run_key) + unfinished) if resumed else None
            if found is None:
                self.parent_id = self._create_parent()
            else:
                self.parent_id = found.info.run_id
                if found.info.status != "RUNNING":
                    self.view.call("update run", lambda: self.client.update_run(self.parent_id, status="RUNNING"))
            self.run_id = self.parent_id
        folder = read_folder(self.out_dir, self.config, self.stage_dirs, self.final)
        for stage, stage_dir in folder.stages.items():
            if recheck or stage not in self.synced:  # one look a stage: a grid cell has dozens
                sync_stage(self.view, self.parent_id, stage, stage_dir, self.config, recheck)
                self.synced.add(stage)
        if folder.history is not None:
            last = folder.stages[max(folder.stages)]
            log_final_model(self.view, self.parent_id, RunFolder(self.out_dir, self.config, (last,)), self.register)
            sync_parent_end(self.view, self.parent_id, folder)

    def _create_parent(self) -> str:
        """A parent run with the tags runs are found and compared by, and the configuration as params."""
        config, method, commit = self.config, METHODS[self.config.method.name], git_commit()
        tags = {"colam.role": "parent", "colam.run_key": self.run_key, "colam.method": config.method.name,
                "colam.variant": variant(config), "colam.seed": str(config.seed),
                "colam.protocol": protocol_digest(config), "colam.out_dir": str(self.out_dir),
                **{f"colam.{key}": str(float(value)) for key, value in method.headline_values(config).items()}}
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
        parent_id = self.view.create(tags, self.run_name or self.out_dir.name)
        params = {**flat_params(config), "method": config.method.name, "model": config.model.name,
                  "dataset": config.data.name, "seed": str(config.seed), "git_commit": commit or "unknown",
                  **method.short_settings(config), **self.info}
        self.view.log(parent_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        source = self.data_source or str(Path(config.data.root).expanduser().resolve())
        self.view.call("log the data set", lambda: self.client.log_inputs(parent_id, [split_input(config, source)]))
        return parent_id

    def _open_stage(self, stage: int) -> None:
        run = self.view.newest(stage_condition(self.parent_id, stage) + " and attributes.status != 'FINISHED'")
        # An interrupted attempt that logged epochs this process trains again (a pipeline step re-runs its stage from
        # the start) is kept as it is; this attempt gets a run of its own.
        if run is not None and self.view.last_epoch(run.info.run_id) <= self.resumed_from:
            self.stage_id = run.info.run_id
        else:
            self.stage_id = self.view.create_stage(self.parent_id, stage)

    def _send_unsent(self) -> None:
        """The open stage's epochs not sent yet, to its run (a store that does not take them: the stage's sync)."""
        rows, self.unsent, self.sent_at = self.unsent, [], time.monotonic()
        self._guarded(lambda: self.view.log(self.stage_id, epoch_metrics(rows)))

    def _sync_point(self) -> None:
        """At a stage end and at the finish: catch up, if the store answers again after falling behind."""
        was_behind = self.behind
        if was_behind and not self.view.answers():
            return
        self.behind = False
        self._guarded(self.catch_up)
        if was_behind and not self.behind:
            log.info("MLflow: the tracking store answers again; it holds what %s holds", self.out_dir)
        self._tell_not_uploaded()

    def _guarded(self, call) -> None:
        """Run `call`; a store that does not take it costs one warning, never the training."""
        try:
            call()
        except Refused as refused:
            self.behind = True
            if not self.warned:
                what = (f"does not answer ({refused.reason}, {refused.tries} tries)" if refused.transient
                        else f"refused {refused.what} ({refused.reason})")
                log.warning("MLflow: the tracking store %s %s; training goes on, the run folder keeps everything; "
                            "bring the store up to it later with: %s", display_uri(self.client.tracking_uri), what,
                            self.command)
                self.warned = True

    def _tell_not_uploaded(self) -> None:
        if self.view.not_uploaded:
            log.warning("MLflow: could not upload %s (%s); the files stay in %s; send them later with: %s",
                        ", ".join(self.view.not_uploaded), self.view.upload_error.reason, self.out_dir, self.command)
            self.view.not_uploaded = []

    def __exit__(self, kind, error, traceback) -> None:
        """On an error send the open stage's saved epochs (a run never resumed shows them too) and mark the open runs;
        after a stage that is not the last, the parent stays RUNNING."""
        if kind is None or self.behind:
            return
        if self.stage_id is not None and self.unsent:
            self._send_unsent()
            if self.behind:
                return
        status = "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        for run_id in filter(None, (self.stage_id, self.parent_id)):
            try:
                self.view.end(run_id, status)
            except Exception as exc:  # the original error matters more than this one
                log.warning("MLflow: could not mark run %s %s (%s)", run_id, status, exc)


def _chunks(items: list, size: int):
    return (items[i : i + size] for i in range(0, len(items), size))


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _now_ms() -> int:
    return int(time.time() * 1000)
