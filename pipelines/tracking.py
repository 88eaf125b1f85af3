"""MLflow tracking for colam runs: the one place that knows MLflow.

One parent run per training run, holding the run's parameters, the per-epoch curves and the final
metrics; one nested run per stage, holding that stage's curves (step = epoch), its checkpoint
(`model.pt`, a state_dict), its soft labels (`soft_labels.npy` and a heatmap) and its metrics.

A run trained in pieces (a resumed run, or a pipeline that runs each stage as its own step)
continues the same parent run: the parent is found again by its `colam.run_key` tag, a digest of
the output folder and the configuration, among the experiment's unfinished runs.

The tracking store is `MLFLOW_TRACKING_URI`, or `sqlite:///mlflow.db` in the current folder.

A store that stops answering during training does not stop it: each call is retried with
exponential backoff for COLAM_TRACKING_RETRY_SECONDS (default 8) in all, then the run log goes
offline and writes every record to a journal in the run's folder (`mlflow-journal/`, JSON lines
in call order), which `colam tracking sync DIR` sends later. An artifact upload that fails while
the store itself answers (its S3 is down) is journaled alone, the rest goes on being logged. At
each stage end and at the finish an offline run log tries to send the journal and go back online.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from colam import io as cio
from colam.config import Config
from colam.engine import HISTORY_FIELDS, RunLog, run_identity
from colam.errors import ColamError
from colam.methods import METHODS

log = logging.getLogger("colam")

DEFAULT_URI = "sqlite:///mlflow.db"
CURVES = ("train_loss", "train_acc", "val_acc", "test_acc", "lr", "seconds")
FINAL = ("test_acc", "val_acc", "train_acc", "train_loss", "wall_time_s")
NOT_REPORTS = ("estimation_seconds", "step", "steps")  # numbers in a stage's metrics that are no method report


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def connect(uri: str | None = None) -> MlflowClient:
    """A client of `uri` that has answered once, so a wrong server fails before training starts."""
    uri = uri or tracking_uri()
    remote = uri.startswith(("http://", "https://"))
    try:
        # MLflow retries a refused connection for minutes by default: one quick try tells us enough.
        # A fresh sqlite store is created (its migrations run) by the first process that opens it:
        # parallel runs (dvc queue start -j N) take turns there, or the migrations collide.
        with bounded_http(timeout=10) if remote else contextlib.nullcontext(), sqlite_open_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as exc:  # connection refused, DNS, auth, a bad sqlite path: one line
        raise ColamError(f"MLFLOW_TRACKING_URI: cannot use the tracking store '{uri}' ({_reason(exc)})") from None
    return client


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


@contextlib.contextmanager
def sqlite_open_lock(uri: str):
    """An exclusive lock on `DB.lock` next to a sqlite store while it is opened; nothing for other stores."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    with file_lock(path.with_name(path.name + ".lock")):
        yield


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive flock on `path` (created if missing) while the block runs; nothing where flock
    does not exist (Windows) or the folder cannot be written to (then what follows says why)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # a parallel run created it in between
        if experiment is None:
            raise
        return experiment.experiment_id


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


# --------------------------------------------------------------- faults: retries and the offline journal

RETRY_ENV = "COLAM_TRACKING_RETRY_SECONDS"  # seconds of retries of one call before the run log goes offline
DEFAULT_RETRY_S = 8.0
FIRST_DELAY_S = 0.25  # then 0.5, 1, 2, 4 ... while the total stays within the budget
HTTP_TIMEOUT_S = 30  # per request (connect, read) unless MLFLOW_HTTP_REQUEST_TIMEOUT says otherwise
JOURNAL_DIR = "mlflow-journal"  # in the run's folder; .dvcignore keeps it out of the outputs' hashes
JOURNAL_TAG = "colam.journal_id"  # the placeholder id of a run created offline, on the run a sync creates
OFFLINE_PREFIX = "offline-"
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                    "COULD_NOT_ACQUIRE_LOCK", "SERVICE_UNDER_MAINTENANCE"}
_BOTO_TRANSPORT = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                   "ConnectionError", "HTTPClientError", "ProxyConnectionError", "ResponseStreamingError"}
_S3_RETRYABLE = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "503", "500"}
_S3_REFUSALS = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket")
_STORE_MODULES = {"mlflow", "requests", "urllib3", "botocore", "boto3", "sqlalchemy", "sqlite3"}


def retry_seconds() -> float:
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ColamError(f"{RETRY_ENV}: expected seconds >= 0, got {raw!r}")
    return value


@contextlib.contextmanager
def bounded_http(timeout: float | None = None):
    """For the calls inside: no retries of MLflow's own (ours retry; its default retries a refused
    connection for minutes), a request timeout, and at most 3 attempts of boto3 (a direct s3:// store)."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout) if timeout is not None else
                os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or str(HTTP_TIMEOUT_S),
                "AWS_MAX_ATTEMPTS": os.environ.get("AWS_MAX_ATTEMPTS") or "3"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    """Whether a failed call may succeed when tried again: the store unreachable, a timeout, HTTP 5xx,
    a busy sqlite database, an S3 upload that failed on the storage side."""
    for e in _chain(exc):
        name, root, text = type(e).__name__, _root(e), str(e)
        if isinstance(e, (ConnectionError, TimeoutError)) or "database is locked" in text:
            return True
        if root == "requests":
            response = getattr(e, "response", None)
            return response is None or response.status_code >= 500  # HTTPError of a 4xx: a refusal
        if root == "urllib3":
            return True
        if name == "ClientError" and root == "botocore":
            metadata, error = e.response.get("ResponseMetadata", {}), e.response.get("Error", {})
            return metadata.get("HTTPStatusCode", 0) >= 500 or error.get("Code") in _S3_RETRYABLE
        if root == "botocore" and name in _BOTO_TRANSPORT:
            return True
        if name == "S3UploadFailedError":
            return not any(code in text for code in _S3_REFUSALS)
        if isinstance(e, RestException):
            return e.error_code in _TRANSIENT_CODES or e.get_http_status_code() >= 500
        if isinstance(e, MlflowException):
            if e.error_code in _TRANSIENT_CODES:
                return True
            lowered = text.lower()
            if "api request to" in lowered and ("failed with exception" in lowered or "timeout" in lowered
                                                or re.search(r"error code 5\d\d", lowered)):
                return True
    return False


def _reason(exc: BaseException) -> str:
    """One short line: the innermost error that says something (e.g. 'ConnectionRefusedError: ...')."""
    said = [e for e in _chain(exc) if str(e).strip()]
    if not said:
        return type(exc).__name__
    inner = said[-1]
    line = str(inner).strip().splitlines()[0]
    return f"{type(inner).__name__}: {line}"[:240]


class Refused(Exception):
    """A call the store did not take: `transient` after the retries, or refused outright."""

    def __init__(self, what: str, error: BaseException, tries: int, transient: bool):
        super().__init__(f"{what}: {_reason(error)}")
        self.what, self.error, self.tries, self.transient = what, error, tries, transient
        self.reason = _reason(error)


def with_retries(what: str, call, budget: float):
    """call(), tried again with exponential backoff on transient store errors for `budget` seconds
    in all (at least one retry unless the budget is 0); Refused when it never succeeds."""
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


def display_uri(uri: str) -> str:
    """The store's URI for a message or a command: no password, a sqlite path made absolute."""
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        return f"sqlite:///{path.resolve()}"
    return re.sub(r"(://[^/:@]*):[^/@]*@", r"\1:***@", uri)


def sync_command(run_dir: Path, uri: str) -> str:
    return f"MLFLOW_TRACKING_URI={shlex.quote(display_uri(uri))} colam tracking sync {shlex.quote(str(run_dir))}"


class Journal:
    """The offline records of one run folder, in `mlflow-journal/`: journal.jsonl (one call a line,
    in call order, numbered by `seq`), files/ (each artifact as it was when logged: a hard link, as
    colam replaces files by rename, or a copy), progress.json (the records a replay has sent, and
    the real ids of the runs created offline)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "journal.jsonl"
        self.progress_path = self.folder / "progress.json"
        self._next: int | None = None

    def exists(self) -> bool:
        return self.path.is_file()

    @contextlib.contextmanager
    def locked(self):
        """One writer or replayer at a time (a training process, a sync)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with file_lock(self.folder / "lock"):
            yield

    def records(self) -> list[dict]:
        if not self.exists():
            return []
        lines = self.path.read_text().splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # the torn last line of a process killed while writing it
                    log.warning("MLflow: %s: ignoring its unfinished last line", self.path)
                    break
                raise ColamError(f"{self.path}: line {number} is not a journal record") from None
        return records

    def append(self, record: dict) -> dict:
        with self.locked():
            if self._next is None:
                self._next = 1 + max((r["seq"] for r in self.records()), default=0)
            record = {"seq": self._next, **record}
            with open(self.path, "ab") as handle:
                _drop_torn_line(self.path, handle)
                handle.write((json.dumps(record) + "\n").encode())
                handle.flush()
                os.fsync(handle.fileno())
            self._next += 1
        return record

    def keep(self, path: Path) -> str:
        """A snapshot of `path` under files/, relative to the journal folder."""
        folder = self.folder / "files" / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        target = folder / path.name  # the artifact keeps its name
        try:
            os.link(path, target)
        except OSError:  # another file system (a temporary file), or no hard links
            shutil.copy2(path, target)
        return str(target.relative_to(self.folder))

    def progress(self) -> dict:
        progress = {"done": [], "ids": {}, "reused": [], "synced": False}
        if self.progress_path.exists():
            progress.update(json.loads(self.progress_path.read_text()))
        return progress

    def save_progress(self, progress: dict) -> None:
        cio.write_json(self.progress_path, progress)

    def pending(self) -> list[dict]:
        done = set(self.progress()["done"])
        return [r for r in self.records() if r["seq"] not in done]

    def parent_of(self, run_key: str) -> str | None:
        """The parent run an earlier process of this run noted (a real or a placeholder id)."""
        found = [r["run"] for r in self.records() if r["op"] == "parent" and r["run_key"] == run_key]
        return found[-1] if found else None


def _drop_torn_line(path: Path, handle) -> None:
    """Cut off the unfinished last line a process killed while appending left, so that the next
    record starts a line of its own (the cut record was never written whole: it is lost with the kill)."""
    size = handle.tell()
    if not size:
        return
    with open(path, "rb") as reader:
        reader.seek(size - 1)
        if reader.read(1) == b"\n":
            return
        reader.seek(0)
        keep = reader.read(size).rfind(b"\n") + 1  # 0 when the torn line is the only one
    log.warning("MLflow: %s: dropping its unfinished last line (%d bytes)", path, size - keep)
    handle.truncate(keep)
    handle.seek(keep)


def replay(client: MlflowClient, journal: Journal, budget: float) -> dict:
    """Send the journal's pending records in order, each retried for `budget` seconds, recording
    each one sent, so that a replay stopped half-way and run again sends nothing twice (a run is
    created once: a sync finds it again by its JOURNAL_TAG). Stops at the first record other than
    an artifact that the store does not take; an artifact that does not upload stays pending, and
    no other artifact is tried after it."""
    result = {"sent": 0, "runs": 0, "metrics": 0, "artifacts": 0, "left": [], "stopped": None, "artifact_error": None}
    with journal.locked():
        progress = journal.progress()
        done = set(progress["done"])
        for record in journal.records():
            if record["seq"] in done:
                continue
            artifact = record["op"] == "log_artifact"
            if artifact and result["artifact_error"] is not None:
                result["left"].append(record)
                continue
            try:
                created = _apply(client, journal, record, progress, budget)
            except Refused as refused:
                if artifact:
                    result["artifact_error"] = refused
                    result["left"].append(record)
                    continue
                result["stopped"] = (record, refused)
                break
            done.add(record["seq"])
            progress["done"] = sorted(done)
            journal.save_progress(progress)
            result["sent"] += 1
            result["runs"] += created
            result["metrics"] += len(record.get("metrics", ()))
            result["artifacts"] += artifact
        progress["synced"] = result["stopped"] is None and not result["left"]
        journal.save_progress(progress)
    result["ids"] = progress["ids"]
    return result


def _apply(client: MlflowClient, journal: Journal, record: dict, progress: dict, budget: float) -> bool:
    """Send one record; True when it created a run."""
    ids = progress["ids"]
    op = record["op"]

    def real(run_id: str) -> str:
        found = ids.get(run_id, run_id)
        if found.startswith(OFFLINE_PREFIX):
            raise ColamError(f"{journal.path}: record {record['seq']} names run {run_id}, which no earlier record "
                             f"creates")
        return found

    def call(what, fn):
        return with_retries(what, fn, budget)

    if op == "parent":
        return False
    if op == "create_run":
        placeholder = record["id"]
        if placeholder in ids:
            return False
        experiment = call(f"experiment '{record['experiment']}'", lambda: experiment_id(client, record["experiment"]))

        def newest(condition):
            runs = call("search runs", lambda: client.search_runs([experiment], condition, max_results=1,
                                                                   order_by=["attributes.start_time DESC"]))
            return runs[0].info.run_id if runs else None

        found = newest(f"tags.`{JOURNAL_TAG}` = '{placeholder}'")  # created by a replay that stopped before noting it
        if found is None and record.get("reuse"):
            found = newest(record["reuse"])  # a resumed run started offline continues its parent, as online
            if found is not None:
                progress["reused"].append(placeholder)
                call("update run", lambda: client.update_run(found, status=RunStatus.to_string(RunStatus.RUNNING)))
        if found is not None:
            ids[placeholder] = found
            return False
        tags = {k: ids.get(v, v) for k, v in record["tags"].items()}
        tags[JOURNAL_TAG] = placeholder
        run = call(f"create run '{record['run_name']}'", lambda: client.create_run(
            experiment, start_time=record["start_time"], tags=tags, run_name=record["run_name"]))
        ids[placeholder] = run.info.run_id
        return True
    if op == "log_batch":
        if record.get("unless_reused") and record["run"] in progress["reused"]:
            return False
        run_id = real(record["run"])
        metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in record.get("metrics", ())]
        params = [Param(k, v) for k, v in record.get("params", ())]
        call(f"log_batch to run {run_id}", lambda: client.log_batch(run_id, metrics=metrics, params=params))
        return False
    if op == "log_artifact":
        run_id, path = real(record["run"]), journal.folder / record["file"]
        if not path.exists():
            raise ColamError(f"{journal.folder}: the kept copy of {record['source']} ({record['file']}) is missing")
        call(f"upload {record['source']}", lambda: client.log_artifact(run_id, str(path),
                                                                         artifact_path=record.get("artifact_path")))
        return False
    if op == "set_terminated":
        run_id = real(record["run"])
        call(f"end run {run_id}", lambda: client.set_terminated(run_id, record["status"], end_time=record["end_time"]))
        return False
    if op == "update_run":
        run_id = real(record["run"])
        call(f"update run {run_id}", lambda: client.update_run(run_id, status=record["status"]))
        return False
    raise ColamError(f"{journal.path}: record {record['seq']} has an unknown kind {op!r}")


def sync(run_dir: str | Path) -> str:
    """`colam tracking sync DIR`: send DIR's journal to MLFLOW_TRACKING_URI; one line saying what was sent."""
    folder = Path(run_dir)
    journal = Journal(folder if folder.name == JOURNAL_DIR else folder / JOURNAL_DIR)
    if not journal.exists():
        raise ColamError(f"{run_dir}: no MLflow journal here ({journal.path} does not exist); a run keeps one only "
                         f"when the tracking store did not answer")
    pending = journal.pending()
    if not pending:
        return f"{run_dir}: every journaled record is in the tracking store already; nothing sent"
    client = connect()
    where = display_uri(client.tracking_uri)
    result = replay(client, journal, retry_seconds())
    sent = (f"sent {result['sent']} of {len(pending)} records ({result['runs']} runs created, {result['metrics']} "
            f"metrics, {result['artifacts']} artifacts) to {where}")
    if result["stopped"] is not None:
        record, refused = result["stopped"]
        raise ColamError(f"{run_dir}: {sent}; record {record['seq']} ({refused.what}) failed: {refused.reason}; "
                         f"run the same command again when the store answers")
    if result["left"]:
        names = ", ".join(r["source"] for r in result["left"])
        raise ColamError(f"{run_dir}: {sent}; {len(result['left'])} artifacts not uploaded ({names}): "
                         f"{result['artifact_error'].reason}; run the same command again when the store answers")
    return f"{run_dir}: {sent}; the journal is synced"


ONLINE, ARTIFACTS_DOWN, OFFLINE = "online", "artifacts down", "offline"


class Offline(Exception):
    """A search the run log cannot make now: the store does not answer."""


class ResilientStore:
    """The MlflowClient calls of a run log, made so that tracking never stops training.

    Online, each call is retried (with_retries); one that still fails sends this and every later
    record to the run folder's Journal (OFFLINE), with one warning saying how to send them later.
    An artifact that does not upload while the store otherwise answers (its S3 is down) sends only
    the artifacts there (ARTIFACTS_DOWN). checkpoint() tries to send the journal and go back online.
    """

    def __init__(self, client: MlflowClient, run_dir: Path, offline: str | None = None):
        self.client, self.uri, self.run_dir = client, client.tracking_uri, Path(run_dir)
        self.journal = Journal(self.run_dir / JOURNAL_DIR)
        self.budget = retry_seconds()
        self.mode = ONLINE
        self.warned = False
        self.unsent: list[tuple[int, str]] = []  # artifacts journaled while the store answered, not yet named
        self.parent: tuple[str, str] | None = None  # (run key, id) of the parent run, noted in the journal
        self._noted: tuple[str, str] | None = None
        self._ids: dict[str, str] = {}  # placeholder -> real id, as replays found them
        if offline is not None:
            self.go_offline(offline)

    @property
    def command(self) -> str:
        return sync_command(self.run_dir, self.uri)

    def real(self, run_id: str | None) -> str | None:
        return self._ids.get(run_id, run_id) if run_id else run_id

    def _unsent_run(self, *run_ids) -> bool:
        """Whether a run named is known only to the journal (created offline, not sent yet)."""
        return any(r and self.real(r).startswith(OFFLINE_PREFIX) for r in run_ids)

    def _record(self, record: dict) -> dict:
        if self.parent is not None and self._noted != self.parent:
            self._noted = self.parent
            self.journal.append({"op": "parent", "run_key": self.parent[0], "run": self.parent[1]})
        return self.journal.append(record)

    def go_offline(self, why: Refused | str) -> None:
        if self.mode == OFFLINE:
            return
        self.mode = OFFLINE
        if isinstance(why, Refused):
            what = (f"does not answer ({why.reason}, {why.tries} tries)" if why.transient
                    else f"refused {why.what} ({why.reason})")
        else:
            what = f"does not answer ({why})"
        if self.warned:
            log.info("MLflow: the tracking store %s again; records go to %s", what, self.journal.folder)
            return
        self.warned = True
        log.warning("MLflow: the tracking store %s %s; training goes on, and its records are kept in %s; "
                    "send them later with: %s", display_uri(self.uri), what, self.journal.folder, self.command)

    def answers(self) -> bool:
        """One quick request; tried twice, as a server that answered an error may have closed the
        connection the client keeps for the next request (which then fails at once, reset)."""
        for _ in range(2):
            try:
                with bounded_http(timeout=5):
                    self.client.search_experiments(max_results=1)
                return True
            except Exception as exc:
                if not store_error(exc):
                    raise
        return False

    # --------------------------------------------------------------- the calls

    def read(self, what: str, call, *run_ids):
        """A search or get: its answer, or Offline when the store does not answer (now or after retries)."""
        if self.mode == OFFLINE or self._unsent_run(*run_ids):
            raise Offline(what)
        try:
            return with_retries(what, call, self.budget)
        except Refused as refused:
            self.go_offline(refused)
            raise Offline(what) from None

    def _write(self, what: str, record: dict, call) -> None:
        if self.mode != OFFLINE and not self._unsent_run(record.get("run")):
            try:
                with_retries(what, call, self.budget)
                return
            except Refused as refused:
                self.go_offline(refused)
        self._record(record)

    def create_run(self, experiment: str, experiment_id: str | None, tags: dict, run_name: str,
                   reuse: str | None = None) -> str:
        """A run's id; offline a placeholder that a sync maps to the run it creates (or, with
        `reuse`, to the newest run matching that filter, if any)."""
        now = _now_ms()
        if self.mode != OFFLINE and experiment_id is not None and reuse is None and not self._unsent_run(*tags.values()):
            real_tags = {k: self.real(v) for k, v in tags.items()}
            try:
                return with_retries(f"create run '{run_name}'", lambda: self.client.create_run(
                    experiment_id, start_time=now, tags=real_tags, run_name=run_name), self.budget).info.run_id
            except Refused as refused:
                self.go_offline(refused)
        placeholder = OFFLINE_PREFIX + uuid.uuid4().hex[:24]
        self._record({"op": "create_run", "id": placeholder, "experiment": experiment, "tags": tags,
                      "run_name": run_name, "start_time": now, "reuse": reuse})
        return placeholder

    def log_batch(self, run_id: str, metrics=(), params=(), unless_reused: bool = False) -> None:
        metrics, params = list(metrics), list(params)
        record = {"op": "log_batch", "run": run_id, "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                  "params": [[p.key, p.value] for p in params]}
        if unless_reused:
            record["unless_reused"] = True
        self._write(f"log_batch to run {self.real(run_id)}", record,
                    lambda: self.client.log_batch(self.real(run_id), metrics=metrics, params=params))

    def set_terminated(self, run_id: str, status: str) -> None:
        now = _now_ms()
        self._write(f"end run {self.real(run_id)}", {"op": "set_terminated", "run": run_id, "status": status,
                                                      "end_time": now},
                    lambda: self.client.set_terminated(self.real(run_id), status, end_time=now))

    def update_run(self, run_id: str, status: str) -> None:
        self._write(f"update run {self.real(run_id)}", {"op": "update_run", "run": run_id, "status": status},
                    lambda: self.client.update_run(self.real(run_id), status=status))

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        try:
            name = str(path.resolve().relative_to(self.run_dir.resolve()))
        except ValueError:  # a temporary file (the heatmap): named by where it goes in the run
            name = f"{artifact_path}/{path.name}" if artifact_path else path.name
        if self.mode == ONLINE and not self._unsent_run(run_id):
            try:
                with_retries(f"upload {name}", lambda: self.client.log_artifact(
                    self.real(run_id), str(path), artifact_path=artifact_path), self.budget)
                return
            except Refused as refused:
                if not self.answers():
                    self.go_offline(refused)
                else:
                    self.mode = ARTIFACTS_DOWN
                    log.warning("MLflow: could not upload %s to run %s (%s, %d tries); training goes on, the files "
                                "stay in %s and the artifacts not uploaded are kept in %s; send them later with: %s",
                                name, self.real(run_id), refused.reason, refused.tries, self.run_dir,
                                self.journal.folder, self.command)
        record = self._record({"op": "log_artifact", "run": run_id, "file": self.journal.keep(path),
                               "artifact_path": artifact_path, "source": name, "sha256": cio.sha256_file(path)})
        if self.mode != OFFLINE:
            self.unsent.append((record["seq"], name))

    # --------------------------------------------------------------- back online

    def resume(self) -> None:
        """Before a run starts: send what an earlier process of this run journaled."""
        if self.mode == OFFLINE or not self.journal.exists():
            return
        self._ids.update(self.journal.progress()["ids"])
        if self.journal.pending():
            self._replay()
            left = [r["source"] for r in self.journal.pending() if r["op"] == "log_artifact"]
            if self.mode == ARTIFACTS_DOWN and left:
                log.warning("MLflow: not uploaded yet (kept in %s): %s; send them later with: %s",
                            self.journal.folder, ", ".join(left), self.command)

    def checkpoint(self) -> None:
        """At a stage end and at the finish: send the journal if the store answers again, then name
        the artifacts not uploaded."""
        if self.mode != ONLINE and (self.mode == ARTIFACTS_DOWN or self.answers()):
            self._replay()
        self.report()

    def _replay(self) -> None:
        # A short budget (two tries: see answers()); what does not go now, the next checkpoint tries again.
        result = replay(self.client, self.journal, budget=min(self.budget, 0.5))
        self._ids.update(result["ids"])
        was = self.mode
        if result["stopped"] is not None:
            self.go_offline(result["stopped"][1])
        elif result["left"]:
            self.mode = ARTIFACTS_DOWN
        else:
            self.mode = ONLINE
        if result["sent"] and was == OFFLINE:
            log.info("MLflow: the tracking store answers again; sent %d journaled records (%s)", result["sent"],
                     "all" if self.mode == ONLINE else "some artifacts are still to upload")

    def report(self) -> None:
        """One warning naming the artifacts journaled while the store answered, since the last one."""
        if self.unsent and self.mode != OFFLINE:
            pending = {r["seq"] for r in self.journal.pending()}
            names = [name for seq, name in self.unsent if seq in pending]
            if names:
                log.warning("MLflow: not uploaded (kept in %s): %s; send them later with: %s", self.journal.folder,
                            ", ".join(names), self.command)
        self.unsent = []

    def final_note(self) -> None:
        if self.mode != ONLINE and self.journal.exists():
            left = len(self.journal.pending())
            if left:
                log.info("MLflow: %d records of this run wait in %s; send them with: %s", left, self.journal.folder,
                         self.command)


def _now_ms() -> int:
    return int(time.time() * 1000)


def open_run_log(experiment: str, out_dir: str | Path, run_name: str | None = None) -> MlflowRunLog:
    """The run log of `colam train --track`: the store must answer now, unless this run already
    keeps records offline (a later stage of a pipeline run): then it goes on offline."""
    try:
        client = connect()
    except ColamError as exc:
        journal = Journal(Path(out_dir) / JOURNAL_DIR)
        if not (journal.exists() and journal.pending()):
            raise
        return MlflowRunLog(MlflowClient(tracking_uri=tracking_uri()), experiment, out_dir, run_name=run_name,
                            offline=str(exc).split(" (", 1)[-1][:-1])
    return MlflowRunLog(client, experiment, out_dir, run_name=run_name)


class MlflowRunLog(RunLog):
    """Reports a colam run to MLflow; use it as a context manager so a crash marks the runs FAILED.

    Its calls go through a ResilientStore: a store that stops answering sends the records to the
    run folder's journal, and training goes on."""

    def __init__(self, client: MlflowClient, experiment: str, out_dir: str | Path, run_name: str | None = None,
                 run_key: str | None = None, offline: str | None = None):
        """`run_key` names the run across processes whose out_dir differs (a Kubeflow run's id);
        by default the run is named by its out_dir. `offline`: why the store cannot be used now
        (the run log then starts offline)."""
        self.client, self.experiment, self.out_dir, self.run_name = client, experiment, Path(out_dir), run_name
        self.key = run_key
        self.store = ResilientStore(client, self.out_dir, offline)
        self.experiment_id: str | None = None
        self.parent_id: str | None = None  # the parent run while it is open (a placeholder when created offline)
        self._run_id: str | None = None  # the parent run, also after finish()
        self.stage_id: str | None = None
        self.config: Config | None = None
        self.last_stage_dir: Path | None = None
        self.resumed_from = 0

    @property
    def run_id(self) -> str | None:
        """The parent run's id (a placeholder while it exists only in the journal)."""
        return self.store.real(self._run_id)

    # --------------------------------------------------------------- RunLog hooks

    def start(self, config: Config, info: dict) -> None:
        self.config = config
        self.resumed_from = info["resumed_from_epoch"]
        self.store.resume()
        try:
            self.experiment_id = self.store.read(f"experiment '{self.experiment}'",
                                                 lambda: experiment_id(self.client, self.experiment))
        except Offline:
            self.experiment_id = None
        run_key = parent_key(config, self.key or str(self.out_dir.resolve()))
        reuse = None
        if info["resumed_from_epoch"] > 0:
            condition = f"tags.`colam.run_key` = '{run_key}' and tags.`colam.role` = 'parent'"
            # A pipeline run's key is unique to it: a retried last step continues its parent even
            # after that parent finished. Without a key, a finished run with this out_dir is an old one.
            if not self.key:
                condition += " and attributes.status != 'FINISHED'"
            try:
                self.parent_id = self._newest(condition)
            except Offline:  # the parent an earlier process noted, else the one a sync finds
                self.parent_id = self.store.journal.parent_of(run_key)
                reuse = condition if self.parent_id is None else None
        if self.parent_id is not None:
            log.info("MLflow: continuing run %s", self.store.real(self.parent_id))
            self.store.update_run(self.parent_id, RunStatus.to_string(RunStatus.RUNNING))
            self._run_id = self.parent_id
            self.store.parent = (run_key, self.parent_id)
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
        self.parent_id = self._run_id = self.store.create_run(self.experiment, self.experiment_id, tags,
                                                              tags[MLFLOW_RUN_NAME], reuse=reuse)
        self.store.parent = (run_key, self.parent_id)
        params = {**flat_params(config), **summary_params(config),
                  **{k: str(v) for k, v in info.items() if k != "resumed_from_epoch"}}
        for batch in _chunks([Param(k, v[:6000]) for k, v in params.items()], 100):  # MLflow's batch limit
            self.store.log_batch(self.parent_id, params=batch, unless_reused=reuse is not None)
        if self.store.mode != OFFLINE:
            log.info("MLflow: run %s in experiment '%s' at %s", self.run_id, self.experiment,
                     display_uri(self.client.tracking_uri))

    def stage_start(self, stage: int) -> None:
        try:
            self.stage_id = self._newest(f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.store.real(self.parent_id)}' and "
                                         f"tags.`colam.stage` = '{stage}' and attributes.status != 'FINISHED'",
                                         self.parent_id)
            if self.stage_id is not None and self._last_epoch(self.stage_id) > self.resumed_from:
                # An interrupted attempt logged epochs that this process trains again (a pipeline step
                # re-runs its stage from the start): keep that attempt as it is, log this one apart.
                self.stage_id = None
        except Offline:  # a stage run this process creates (a sync does not look for an interrupted one)
            self.stage_id = None
        if self.stage_id is None:
            tags = {MLFLOW_PARENT_RUN_ID: self.parent_id, "colam.role": "stage", "colam.stage": str(stage),
                    MLFLOW_RUN_NAME: f"stage {stage}"}
            self.stage_id = self.store.create_run(self.experiment, self.experiment_id, tags, f"stage {stage}")

    def stage_end_again(self, stage: int, stage_dir: Path, row: dict, metrics: dict) -> None:
        """A killed process saved stage `stage`'s end; its stage run says how much of it was reported:
        a FINISHED one all of it, an unfinished one is completed (its last epoch logged once)."""
        try:
            found = self._newest_run(f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.store.real(self.parent_id)}' and "
                                     f"tags.`colam.stage` = '{stage}'", self.parent_id)
        except Offline:  # nothing can be looked up: report it (a sync sends it as a stage run of its own)
            found = None
        if found is None:
            super().stage_end_again(stage, stage_dir, row, metrics)
            return
        if found.info.status == RunStatus.to_string(RunStatus.FINISHED):
            self.last_stage_dir = stage_dir
            return
        self.stage_id = found.info.run_id
        if self._last_epoch(self.stage_id) < row["epoch"]:
            self.epoch_end(stage, row)
        self.stage_end(stage, stage_dir, metrics)

    def epoch_end(self, stage: int, row: dict) -> None:
        now = _now_ms()
        metrics = [Metric(k, float(row[k]), now, row["epoch"]) for k in CURVES if k in row]
        # The parent gets the whole curve at the end, from history.csv: a stage trained again after
        # an interruption would otherwise leave its first attempt's epochs in the parent's curves.
        self.store.log_batch(self.stage_id, metrics=metrics)

    def stage_end(self, stage: int, stage_dir: Path, metrics: dict) -> None:
        now = _now_ms()
        scalars = {f"stage_{k}": v for k, v in metrics.items() if k in ("test_acc", "val_acc", "train_acc")}
        if metrics.get("estimation_seconds") is not None:  # None: a later pipeline step estimates
            scalars["estimation_seconds"] = metrics["estimation_seconds"]
        # what the method reports of its stage end (COLAM: label rows that did not favour their class)
        scalars.update({k: v for k, v in metrics.items() if k not in HISTORY_FIELDS and k not in NOT_REPORTS
                        and isinstance(v, (int, float)) and not isinstance(v, bool)})
        self.store.log_batch(self.stage_id, metrics=[Metric(k, float(v), now, metrics["epoch"])
                                                     for k, v in scalars.items()])
        log_stage_files(self.store, self.stage_id, stage_dir, stage, self.config)
        self.store.set_terminated(self.stage_id, RunStatus.to_string(RunStatus.FINISHED))
        self.stage_id = None
        self.last_stage_dir = stage_dir
        self.store.checkpoint()

    def finish(self, metrics: dict, out_dir: Path) -> None:
        now = _now_ms()
        # The last stage's state holds every epoch at full precision, however the run was split up.
        history = cio.load_torch(self.last_stage_dir / "state.pt", "stage state")["history"]
        curves = [Metric(k, float(row[k]), now, row["epoch"]) for row in history for k in CURVES if k in row]
        history_path = next(p for p in (out_dir / "history.csv", self.last_stage_dir / "history.csv") if p.exists())
        final = [Metric(k, float(metrics[k]), now, metrics["epochs"]) for k in FINAL if k in metrics]
        for batch in _chunks(curves + final, 1000):  # MLflow takes at most 1000 metrics per batch
            self.store.log_batch(self.parent_id, metrics=batch)
        for path in (out_dir / "config.yaml", history_path, out_dir / "metrics.json"):
            if path.exists():
                self.store.log_artifact(self.parent_id, path)
        self.store.set_terminated(self.parent_id, RunStatus.to_string(RunStatus.FINISHED))
        self.parent_id = None
        self.store.checkpoint()
        self.store.final_note()

    def log_files(self, paths: list[Path], artifact_path: str) -> None:
        """Files of the run (e.g. a pipeline's split.json) as artifacts of the parent run."""
        for path in paths:
            if Path(path).exists():
                self.store.log_artifact(self._run_id, path, artifact_path=artifact_path)
        self.store.report()

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
                    self.store.set_terminated(run_id, RunStatus.to_string(status))
                except Exception as exc:  # the original error matters more than this one
                    log.warning("MLflow: could not mark run %s %s (%s)", self.store.real(run_id),
                                RunStatus.to_string(status), exc)
        try:
            self.store.report()
            self.store.final_note()
        except Exception as exc:
            log.warning("MLflow: %s", exc)

    def _last_epoch(self, run_id: str) -> int:
        history = self.store.read("metric history", lambda: self.client.get_metric_history(self.store.real(run_id), "lr"),
                                  run_id)
        return max((m.step for m in history), default=0)

    def _newest(self, condition: str, *run_ids) -> str | None:
        run = self._newest_run(condition, *run_ids)
        return run.info.run_id if run is not None else None

    def _newest_run(self, condition: str, *run_ids):
        if self.experiment_id is None:
            raise Offline("search runs")
        runs = self.store.read("search runs", lambda: self.client.search_runs(
            [self.experiment_id], condition, order_by=["attributes.start_time DESC"], max_results=1), *run_ids)
        return runs[0] if runs else None


def _chunks(items: list, size: int):
    return (items[i : i + size] for i in range(0, len(items), size))


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
