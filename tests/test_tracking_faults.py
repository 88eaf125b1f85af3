"""Storage and tracking faults (pipelines/tracking.py), against real servers on 127.0.0.1: an MLflow
server that goes away during training, transient 5xx answers, S3 down behind the server, and
parallel runs on one fresh sqlite store. Whatever happens, the store ends equal to what the run
folder holds, however often a sync ran.

The servers here are this module's own (stopped and restarted by the tests), never the session's.
"""

import csv
import hashlib
import json
import shutil
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import yaml
from mlflow import MlflowClient

from colam.config import load_config
from colam.engine import fit
from pipelines import cli as pipelines_cli
import pipelines.tracking
from pipelines.tracking import RETRY_ENV, MlflowRunLog
from tests.conftest import TINY
from tests.test_tracking import runs_of

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"seconds", "wall_time_s", "estimation_seconds"}
CURVES = ("train_loss", "train_acc", "val_acc", "test_acc", "lr")
STAGE_FILES = ("model.pt", "soft_labels.npy", "soft_labels.json", "metrics.json")
PARENT_FILES = ("config.yaml", "history.csv", "metrics.json")


# ----------------------------------------------------------------------------- servers and helpers


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """This module's SeaweedFS and an MLflow server proxying artifacts to it (the tests stop them)."""
    from tests.servers import seaweed_s3, start_mlflow_server

    with seaweed_s3(tmp_path_factory.mktemp("faults-weed"), bucket="colam-faults") as s3:
        # The server's boto3 tries S3 once, so that an upload while S3 is down fails in a moment
        # (its default, five tries with backoff, takes ~5 s per upload).
        mlflow = start_mlflow_server(tmp_path_factory.mktemp("faults-mlflow"), f"s3://{s3.bucket}/mlflow",
                                     {**s3.env(), "AWS_MAX_ATTEMPTS": "1"})
        try:
            yield mlflow, s3
        finally:
            mlflow.stop()


@pytest.fixture
def up(servers, monkeypatch):
    """Both servers running at the start of a test (a test that failed half-way may have left one
    stopped), the client with no S3 credentials (the server proxies), tracking to the server."""
    mlflow, s3 = servers
    for server in (s3, mlflow):
        if not server.running:
            server.restart()
    for key in s3.env():
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.uri)
    return mlflow, s3


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults-config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(load_config(None, TINY).to_dict(), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def untracked(tmp_path_factory):
    """The same tiny run, untracked: what a tracked run must give, whatever happens to tracking."""
    out = tmp_path_factory.mktemp("faults-untracked") / "run"
    fit(load_config(None, TINY), out)
    return out


def train(out, experiment, config, *extra):
    return pipelines_cli.main(["train", "--config", str(config), "--out", str(out), "--experiment", experiment,
                               "--track", "--no-progress", *extra])


def sync(out, experiment):
    return pipelines_cli.main(["tracking", "sync", str(out), "--experiment", experiment])


def without_timings(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


def read_csv(path):
    with open(path) as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def assert_same_training(out, reference):
    """Numbers and files exactly those of the untracked run."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert without_timings(metrics) == without_timings(json.loads((reference / "metrics.json").read_text()))
    assert read_csv(out / "history.csv") == read_csv(reference / "history.csv")
    for stage in (1, 2):
        ours = torch.load(out / f"stage_{stage}" / "model.pt", weights_only=True)
        theirs = torch.load(reference / f"stage_{stage}" / "model.pt", weights_only=True)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), stage
        for name in ("soft_labels.npy", "soft_labels.json"):
            assert (out / f"stage_{stage}" / name).read_bytes() == (reference / f"stage_{stage}" / name).read_bytes()


def artifact_paths(client, run_id, path=None):
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def snapshot(client, experiment):
    """Everything an experiment holds, every metric point counted: what a second sync must not change."""
    parents, stages = runs_of(client, experiment)
    state = {}
    for run in parents + stages:
        full = client.get_run(run.info.run_id)
        state[run.info.run_id] = {
            "status": full.info.status, "params": full.data.params,
            "tags": {k: v for k, v in full.data.tags.items() if not k.startswith("mlflow.")},
            "metrics": {key: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id,
                                                                                                         key))
                        for key in full.data.metrics},
            "artifacts": sorted(artifact_paths(client, run.info.run_id))}
    return state


def assert_complete(client, experiment, out, tmp_path):
    """One FINISHED parent with every epoch's curves (equal to history.csv) and its files; one
    FINISHED run per stage with its curves and its files, byte-identical to the run folder's."""
    (parent,), stages = runs_of(client, experiment)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["method"] == "colam" and parent.data.params["seed"] == "0"
    rows = list(csv.DictReader(open(out / "history.csv")))
    for key in CURVES:
        points = sorted((m.step, m.value) for m in client.get_metric_history(parent.info.run_id, key))
        assert [step for step, _ in points] == [1, 2, 3, 4], key
        for (step, value), row in zip(points, rows, strict=True):
            assert value == pytest.approx(float(row[key]), abs=1e-6), (key, step)
    assert artifact_paths(client, parent.info.run_id) == set(PARENT_FILES)
    for name in PARENT_FILES:
        local = Path(client.download_artifacts(parent.info.run_id, name, str(tmp_path / "parent")))
        assert local.read_bytes() == (out / name).read_bytes(), name
    assert [(s.data.tags["colam.stage"], s.info.status) for s in stages] == [("1", "FINISHED"), ("2", "FINISHED")]
    for stage, epochs in zip(stages, ([1, 2], [3, 4]), strict=True):
        k = stage.data.tags["colam.stage"]
        assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert sorted(m.step for m in client.get_metric_history(stage.info.run_id, "lr")) == epochs
        assert artifact_paths(client, stage.info.run_id) == {*STAGE_FILES, f"figures/soft_labels_stage_{k}.png"}
        for name in STAGE_FILES:
            local = Path(client.download_artifacts(stage.info.run_id, name, str(tmp_path / f"stage{k}")))
            assert local.read_bytes() == (out / f"stage_{k}" / name).read_bytes(), (k, name)
    return parent, stages


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "colam" and r.levelno >= logging.WARNING]


def file_digests(folder):
    """sha256 of every file of a run folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------- the server goes away


class Killed(BaseException):
    """Stands for SIGKILL in the middle of a sync."""


def test_a_server_stopped_mid_run_loses_nothing_and_sync_brings_the_store_up_to_the_folder(
        up, untracked, tiny_yaml, tmp_path, monkeypatch, caplog, capsys):
    mlflow, _ = up
    caplog.set_level(logging.INFO, logger="colam")
    monkeypatch.setenv(RETRY_ENV, "2")
    original = MlflowRunLog.stage_end

    def stop_after_stage_1(self, stage, stage_dir, metrics):
        original(self, stage, stage_dir, metrics)
        if stage == 1:
            mlflow.stop()  # stage 1 is in the store, stage 2 and the end are not

    monkeypatch.setattr(MlflowRunLog, "stage_end", stop_after_stage_1)
    out = tmp_path / "run"
    assert train(out, "goes-away", tiny_yaml) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert without_timings(printed) == without_timings(json.loads((untracked / "metrics.json").read_text()))
    assert_same_training(out, untracked)

    command = f"MLFLOW_TRACKING_URI={mlflow.uri} colam tracking sync {out} --experiment goes-away"
    told = [w for w in warnings_of(caplog) if "colam tracking sync" in w]
    assert len(told) == 1, warnings_of(caplog)
    assert command in told[0] and "training goes on" in told[0] and "the run folder keeps everything" in told[0]
    local = file_digests(out)

    mlflow.restart()  # the same port and backend store
    client = MlflowClient(mlflow.uri)
    (parent,), stages = runs_of(client, "goes-away")
    assert parent.info.status == "RUNNING" and len(stages) == 1  # what got there before the server went away
    # A sync killed half-way (before the parent's end), then run again: nothing is logged twice.
    real_end = pipelines.tracking.sync_parent_end
    monkeypatch.setattr(pipelines.tracking, "sync_parent_end", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        sync(out, "goes-away")
    monkeypatch.setattr(pipelines.tracking, "sync_parent_end", real_end)
    capsys.readouterr()
    assert sync(out, "goes-away") == 0
    said = capsys.readouterr().out.strip()
    assert "the tracking store holds what the folder holds (0 runs created" in said  # stage 2's run: the first sync
    parent, stages = assert_complete(client, "goes-away", out, tmp_path / "download")
    assert file_digests(out) == local  # sync leaves the run's files as they are
    before = snapshot(client, "goes-away")

    assert sync(out, "goes-away") == 0  # a second sync: nothing to send
    assert "nothing sent" in capsys.readouterr().out
    assert snapshot(client, "goes-away") == before


def test_an_offline_run_goes_back_online_at_a_stage_end_when_the_server_answers_again(up, untracked, tiny_yaml,
                                                                                       tmp_path, monkeypatch, caplog,
                                                                                       capsys):
    mlflow, _ = up
    caplog.set_level(logging.INFO, logger="colam")
    monkeypatch.setenv(RETRY_ENV, "1")
    stage_end, epoch_end = MlflowRunLog.stage_end, MlflowRunLog.epoch_end

    def stop_after_stage_1(self, stage, stage_dir, metrics):
        stage_end(self, stage, stage_dir, metrics)
        if stage == 1:
            mlflow.stop()

    def back_after_epoch_3(self, stage, row):
        epoch_end(self, stage, row)
        if row["epoch"] == 3:
            mlflow.restart()

    monkeypatch.setattr(MlflowRunLog, "stage_end", stop_after_stage_1)
    monkeypatch.setattr(MlflowRunLog, "epoch_end", back_after_epoch_3)
    out = tmp_path / "run"
    assert train(out, "comes-back", tiny_yaml) == 0
    assert_same_training(out, untracked)
    assert len([w for w in warnings_of(caplog) if "colam tracking sync" in w]) == 1
    assert any("answers again" in r.getMessage() for r in caplog.records)
    # stage 2's epochs, missed while the store was away, came from the folder at stage 2's end
    assert_complete(MlflowClient(mlflow.uri), "comes-back", out, tmp_path / "download")
    capsys.readouterr()
    assert sync(out, "comes-back") == 0 and "nothing sent" in capsys.readouterr().out


# ----------------------------------------------------------------------------- transient faults


def test_transient_5xx_answers_are_retried_and_everything_arrives(up, untracked, tiny_yaml, tmp_path, monkeypatch,
                                                                  caplog):
    from tests.servers import fault_proxy

    mlflow, _ = up
    caplog.set_level(logging.INFO, logger="colam")
    with fault_proxy(mlflow.uri) as proxy:
        proxy.fail("/runs/log-batch", 2)  # the first batch: the run's parameters
        proxy.fail("/mlflow-artifacts/artifacts/", 2, status=500)  # the first upload, stage 1's model.pt
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
        out = tmp_path / "run"
        began = time.monotonic()
        assert train(out, "transient", tiny_yaml) == 0
        seconds = time.monotonic() - began
    assert len(proxy.failed) == 4 and proxy.forwarded > 20
    assert [method for method, _ in proxy.failed] == ["POST", "POST", "PUT", "PUT"]
    retries = [r.getMessage() for r in caplog.records if "; try " in r.getMessage()]
    assert len(retries) == 4, retries
    assert "503" in retries[0] and "try 2 in 0.25 s" in retries[0] and "try 3 in 0.50 s" in retries[1]
    assert "500" in retries[2] and "model.pt" in retries[2]
    assert warnings_of(caplog) == []
    assert_same_training(out, untracked)
    assert_complete(MlflowClient(mlflow.uri), "transient", out, tmp_path / "download")
    assert seconds < 120


# ----------------------------------------------------------------------------- S3 down behind the server


def test_s3_down_during_a_run_keeps_the_artifacts_for_sync_and_the_bucket_gets_them_byte_identical(
        up, untracked, tiny_yaml, tmp_path, monkeypatch, caplog, capsys):
    mlflow, s3 = up
    caplog.set_level(logging.INFO, logger="colam")
    monkeypatch.setenv(RETRY_ENV, "1")
    s3.stop()
    out = tmp_path / "run"
    assert train(out, "s3-down", tiny_yaml) == 0
    assert_same_training(out, untracked)

    said = " ".join(warnings_of(caplog))
    assert "does not answer" not in said  # the tracking store did: the metrics are in it already
    names = [f"stage_{k}/{n}" for k in (1, 2) for n in STAGE_FILES] + [f"figures/soft_labels_stage_{k}.png"
                                                                       for k in (1, 2)] + list(PARENT_FILES)
    assert [n for n in names if n not in said] == []
    assert f"MLFLOW_TRACKING_URI={mlflow.uri} colam tracking sync {out}" in said
    client = MlflowClient(mlflow.uri)
    (parent,), stages = runs_of(client, "s3-down")
    assert parent.info.status == "FINISHED" and [s.info.status for s in stages] == ["FINISHED", "FINISHED"]
    assert len(client.get_metric_history(parent.info.run_id, "test_acc")) == 4

    local = file_digests(out)

    s3.restart()
    capsys.readouterr()
    assert sync(out, "s3-down") == 0
    assert f"0 runs created, 0 epochs and {len(names)} artifacts sent" in capsys.readouterr().out
    assert file_digests(out) == local
    bucket = s3.client()
    destination = urlparse(mlflow.artifacts_destination)  # s3://BUCKET/mlflow
    for run, folder, files in [(stages[0], out / "stage_1", STAGE_FILES), (stages[1], out / "stage_2", STAGE_FILES),
                               (parent, out, PARENT_FILES)]:
        for name in files:  # the bucket holds the run folder's files, byte for byte
            key = destination.path.strip("/") + urlparse(run.info.artifact_uri).path + "/" + name
            body = bucket.get_object(Bucket=destination.netloc, Key=key)["Body"].read()
            assert body == (folder / name).read_bytes(), (folder, name)
    assert_complete(client, "s3-down", out, tmp_path / "download")
    assert sync(out, "s3-down") == 0 and "nothing sent" in capsys.readouterr().out


def test_a_direct_s3_artifact_store_whose_endpoint_fails_mid_run_is_synced_later(up, untracked, tiny_yaml,
                                                                                   tmp_path, monkeypatch, caplog,
                                                                                   capsys):
    """No proxying: an experiment whose artifact location is s3://, so the client uploads to S3
    itself (boto3, with the S3 keys), and S3 stops after stage 1."""
    mlflow, s3 = up
    caplog.set_level(logging.INFO, logger="colam")
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(RETRY_ENV, "1")
    MlflowClient(mlflow.uri).create_experiment("direct-s3", artifact_location=f"s3://{s3.bucket}/direct")
    original = MlflowRunLog.stage_end

    def stop_s3_after_stage_1(self, stage, stage_dir, metrics):
        original(self, stage, stage_dir, metrics)
        if stage == 1:
            s3.stop()

    monkeypatch.setattr(MlflowRunLog, "stage_end", stop_s3_after_stage_1)
    out = tmp_path / "run"
    try:
        assert train(out, "direct-s3", tiny_yaml) == 0
        assert_same_training(out, untracked)
        said = " ".join(warnings_of(caplog))
        assert "Connection refused" in said and "does not answer" not in said
        later = [f"stage_2/{n}" for n in STAGE_FILES] + ["figures/soft_labels_stage_2.png", *PARENT_FILES]
        assert [n for n in later if n not in said] == [] and "stage_1/" not in said
        local = file_digests(out)
    finally:
        if not s3.running:
            s3.restart()
    capsys.readouterr()
    assert sync(out, "direct-s3") == 0 and f"{len(later)} artifacts sent" in capsys.readouterr().out
    assert file_digests(out) == local
    client = MlflowClient(mlflow.uri)
    assert_complete(client, "direct-s3", out, tmp_path / "download")
    bucket = s3.client()
    (parent,), stages = runs_of(client, "direct-s3")
    for run, folder, names in ((stages[1], out / "stage_2", STAGE_FILES), (parent, out, PARENT_FILES)):
        location = urlparse(run.info.artifact_uri)  # s3://BUCKET/direct/RUN/artifacts
        for name in names:
            body = bucket.get_object(Bucket=location.netloc, Key=f"{location.path.strip('/')}/{name}")["Body"].read()
            assert body == (folder / name).read_bytes(), name


# ----------------------------------------------------------------------------- what is retried


def _raised(make):
    try:
        make()
    except Exception as exc:
        return exc


def _sqlite_locked():
    """The error MLflow's sqlite store raises when the database stays locked past its busy timeout."""
    import sqlite3

    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    def store():
        try:
            try:
                raise sqlite3.OperationalError("database is locked")
            except sqlite3.OperationalError as exc:
                raise sqlalchemy.exc.OperationalError("INSERT INTO metrics ...", {}, exc) from exc
        except sqlalchemy.exc.OperationalError as exc:
            raise MlflowException(message=exc, error_code=TEMPORARILY_UNAVAILABLE) from exc

    return _raised(store)


def test_store_errors_are_told_apart_transient_or_refused():
    import botocore.exceptions
    import requests
    from mlflow.exceptions import MlflowException, RestException

    from pipelines.tracking import store_error, transient

    def http_error(status):
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(f"{status} error", response=response)

    def client_error(status, code):
        return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "x"},
                                                "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    retried = [_sqlite_locked(), http_error(503), client_error(503, "SlowDown"), client_error(500, "InternalError"),
               botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ConnectionRefusedError(),
               RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}),
               MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/get failed with exception "
                               "HTTPConnectionPool: Max retries exceeded")]
    refused = [http_error(403), client_error(403, "AccessDenied"),
               RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "param changed"}),
               RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such run"})]
    assert [transient(e) for e in retried] == [True] * len(retried)
    assert [transient(e) for e in refused] == [False] * len(refused)
    assert all(store_error(e) for e in retried + refused)
    assert not store_error(TypeError("a bug of ours")) and not store_error(KeyError("x"))


def test_a_locked_sqlite_write_is_retried_with_backoff_within_the_budget(caplog):
    from pipelines.tracking import Refused, with_retries

    caplog.set_level(logging.INFO, logger="colam")
    calls = []

    def locked_twice():
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise _sqlite_locked()
        return "logged"

    assert with_retries("log_batch", locked_twice, budget=8) == "logged"
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[0] == pytest.approx(0.25, abs=0.15) and gaps[1] == pytest.approx(0.5, abs=0.15)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["MLflow: log_batch failed"] * 2
    assert "database is locked" in caplog.records[0].getMessage()

    calls.clear()
    began = time.monotonic()

    def always_locked():
        calls.append(1)
        raise _sqlite_locked()

    with pytest.raises(Refused) as refused:
        with_retries("log_batch", always_locked, budget=2)
    # 0.25 + 0.5 + 1 s of backoff: a fourth try would wait 2 s more and pass the 2 s budget
    assert len(calls) == 4 and refused.value.tries == 4 and refused.value.transient
    assert 1.6 < time.monotonic() - began < 3.5

    calls.clear()
    with pytest.raises(TypeError):  # a bug is not a store error: raised at once, not retried
        with_retries("log_batch", lambda: calls.append(1) or None + 1, budget=8)
    assert calls == [1]


# ----------------------------------------------------------------------------- sync's bad input


def test_sync_of_no_run_folder_or_with_an_unreachable_store_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    assert sync(tmp_path, "x") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not a colam run folder" in lines[0]

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(load_config(None, TINY).to_dict()))
    began = time.monotonic()
    assert sync(tmp_path, "x") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "MLFLOW_TRACKING_URI" in lines[0] and "Connection refused" in lines[0], lines
    assert time.monotonic() - began < 30


# ----------------------------------------------------------------------------- parallel runs, one sqlite store


def test_parallel_runs_on_one_fresh_sqlite_store_all_succeed(tiny_yaml, tmp_path):
    store = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "PYTHONPATH": str(ROOT),
           RETRY_ENV: "8"}
    seeds = range(4)
    runs = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--config", str(tiny_yaml), "--out",
                              f"seed{seed}", "--set", f"seed={seed}", "--set", "train.epochs=2", "--set",
                              "method.colam.epochs_per_stage=1", "--track", "--experiment", "parallel",
                              "--no-progress"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for seed in seeds]
    results = [(run.wait(timeout=300), run.stdout.read(), run.stderr.read()) for run in runs]
    for seed, (code, _, err) in zip(seeds, results, strict=True):
        assert code == 0, f"seed {seed}: exit {code}\n{err[-3000:]}"
        assert "does not answer" not in err and "refused" not in err, err[-3000:]
    client = MlflowClient(f"sqlite:///{store}")
    parents, stages = runs_of(client, "parallel")
    assert sorted(p.data.params["seed"] for p in parents) == ["0", "1", "2", "3"]
    assert {p.info.status for p in parents} == {"FINISHED"}
    assert len(stages) == 8 and {s.info.status for s in stages} == {"FINISHED"}


def test_a_sqlite_store_a_kill_left_half_made_is_created_again_whole(tmp_path):
    """A new store is migrated under a temporary name and renamed into place: a kill during MLflow's
    migrations (seen in the dvc repro kill test) leaves that file, never a half-made mlflow.db."""
    from pipelines.tracking import connect

    (tmp_path / ".mlflow.db.creating.tmp").write_bytes(b"the first pages of a database, then the kill")
    client = connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert not (tmp_path / ".mlflow.db.creating.tmp").exists()


# ----------------------------------------------------------------------------- what sync uploads


def test_sync_uploads_only_what_colam_wrote_never_a_link_planted_in_the_folder(untracked, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(untracked, out)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the store")
    (out / "stage_1" / "model.pt").unlink()
    (out / "stage_1" / "model.pt").symlink_to(secret)  # named in the manifest, but a link colam never makes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts in ./mlruns
    assert sync(out, "planted") == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,), (first, second) = runs_of(client, "planted")
    assert "model.pt" not in artifact_paths(client, first.info.run_id)
    assert "model.pt" in artifact_paths(client, second.info.run_id)
    uploaded = [p for p in (tmp_path / "mlruns").rglob("*") if p.is_file()]
    assert uploaded and not [p for p in uploaded if p.read_bytes() == secret.read_bytes()]


def test_sync_of_a_folder_given_with_a_tilde_syncs_the_folder_in_home(untracked, tmp_path, monkeypatch):
    """`colam tracking sync '~/run'` (the shell did not expand it): the run under $HOME, keyed as that folder."""
    shutil.copytree(untracked, tmp_path / "run")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts in ./mlruns
    assert sync("~/run", "tilde") == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,), stages = runs_of(client, "tilde")
    assert parent.data.tags["colam.out_dir"] == str(tmp_path / "run") and parent.info.status == "FINISHED"
    assert len(stages) == len(list((tmp_path / "run").glob("stage_*"))) >= 1
    assert sync(tmp_path / "run", "tilde") == 0  # the same run: found by its key, nothing new
    assert len(runs_of(client, "tilde")[0]) == 1
