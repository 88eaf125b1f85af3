"""MLflow tracking of colam runs (pipelines.tracking, pipelines.cli): run structure, artifacts, runs
trained in pieces, interrupted runs, the CLI's tracking switch, and a real server with S3 artifacts."""

import csv
import json
import os
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import matplotlib.image
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

import colam.engine
import pipelines.tracking
from colam.config import load_config
from colam.engine import fit, fit_stage
from colam.models import build_model
from colam.run_folder import WholeRun
from pipelines import cli as pipelines_cli
from pipelines.tracking import MlflowRunLog, connect, flat_params, protocol_digest, variant
from tests.conftest import TINY

TIMINGS = {"seconds", "wall_time_s", "estimation_seconds"}  # differ between two runs of the same config
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module: creating one runs the migrations (seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    client = connect(f"sqlite:///{root / 'mlflow.db'}")
    client.artifact_root = root / "artifacts"  # read by new_experiment
    return client


def new_experiment(client, name):
    """Create `name` with its artifacts under the store's temp folder (MLflow's default is ./mlruns)."""
    location = (client.artifact_root / name).as_uri()
    client.create_experiment(name, artifact_location=location)
    return name


def runs_of(client, name):
    """(parent runs, stage runs sorted by stage) of experiment `name`; every run is one or the other."""
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("colam.role") == "parent"]
    stages = sorted((r for r in runs if r.data.tags.get("colam.role") == "stage"),
                    key=lambda r: int(r.data.tags["colam.stage"]))
    assert len(parents) + len(stages) == len(runs), "runs that are neither parent nor stage"
    return parents, stages


def history(client, run_id, key):
    """[(step, value), ...] of one metric, in step order."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def curves(client, run):
    """Every metric's whole history, timings left out: what two runs of one config must agree on."""
    return {key: history(client, run.info.run_id, key) for key in run.data.metrics if key not in TIMINGS}


def artifact_paths(client, run_id, path=None):
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def download(client, run_id, path, dst):
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst)))


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def write_config(config, path):
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return str(path)


def tracked_fit(client, name, config, out):
    with MlflowRunLog(client, name, out) as run_log:
        return fit(config, out, run_log=run_log)


@pytest.fixture(scope="module")
def colam_run(store, tmp_path_factory):
    """One tracked tiny COLAM run (4 epochs, 2 stages, T = 2 by default): the reference of the other tests."""
    config = load_config(None, TINY)
    out = tmp_path_factory.mktemp("colam_run") / "tiny-colam"
    name = new_experiment(store, "structure")
    metrics = tracked_fit(store, name, config, out)
    parents, stages = runs_of(store, name)
    return config, out, metrics, parents, stages


# ----------------------------------------------------------------------------- 1. one tracked run


def test_one_parent_and_one_finished_nested_run_per_stage(colam_run):
    _, out, _, parents, stages = colam_run
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == out.name  # the --out folder's name by default
    assert [s.data.tags["colam.stage"] for s in stages] == ["1", "2"]
    for stage in stages:
        assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert stage.info.status == "FINISHED"
        assert stage.info.run_name == f"stage {stage.data.tags['colam.stage']}"


def test_parent_params_are_the_summary_and_the_flattened_config(colam_run):
    config, _, _, parents, _ = colam_run
    params = parents[0].data.params
    assert {k: params[k] for k in ("method", "T", "m", "t", "peers", "model", "dataset", "seed")} == {
        "method": "colam", "T": "2.0", "m": "2", "t": "2", "peers": "all", "model": "small_cnn",
        "dataset": "digits", "seed": "0"}
    assert params["git_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", params["git_commit"])
    # Flattened config, spelled out for a few keys so the test does not only mirror flat_params.
    assert params["train.epochs"] == "4" and params["data.train_subset"] == "200"
    assert params["method.name"] == "colam" and params["method.colam.temperature"] == "2.0"
    assert params["method.colam.stages"] == "2" and json.loads(params["model.options"]) == {"width": 8}
    for key, value in flat_params(config).items():
        assert params[key] == value, key
    assert not any(k.startswith(("method.ls.", "method.cp.", "method.hl")) for k in params), \
        "settings of methods that were not trained"


def test_per_epoch_curves_have_step_epoch_and_equal_history_csv(store, colam_run):
    _, out, metrics, parents, stages = colam_run
    parent_id = parents[0].info.run_id
    rows = read_csv(out / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]

    test_acc = history(store, parent_id, "test_acc")
    # One value per epoch; the final metric is the last epoch's point (MLflow stores it once).
    assert [step for step, _ in test_acc] == [1, 2, 3, 4]
    assert test_acc[-1][1] == metrics["test_acc"]
    for key in ("train_loss", "train_acc", "val_acc", "test_acc", "lr"):
        by_epoch = dict(history(store, parent_id, key))
        assert sorted(by_epoch) == [1, 2, 3, 4], key
        for row in rows:
            assert by_epoch[int(row["epoch"])] == pytest.approx(float(row[key]), abs=1e-6), (key, row["epoch"])
    assert [step for step, _ in history(store, parent_id, "lr")] == [1, 2, 3, 4]  # each epoch once

    for stage, epochs in zip(stages, ([1, 2], [3, 4]), strict=True):
        stage_id = stage.info.run_id
        for key in ("train_loss", "train_acc", "val_acc", "test_acc", "lr"):
            by_epoch = dict(history(store, parent_id, key)[:4])  # the epochs, not the final value
            assert history(store, stage_id, key) == [(e, by_epoch[e]) for e in epochs], key
        stage_metrics = json.loads((out / f"stage_{stage.data.tags['colam.stage']}" / "metrics.json").read_text())
        assert stage.data.metrics["stage_test_acc"] == stage_metrics["test_acc"]
        assert history(store, stage_id, "stage_test_acc")[0][0] == epochs[-1]
        # what the method reports of its stage end: the label rows that did not favour their class
        assert stage.data.metrics["collapsed_rows"] == stage_metrics["collapsed_rows"]


def test_stage_runs_hold_checkpoint_soft_labels_and_figure(store, colam_run, tmp_path):
    config, out, _, _, stages = colam_run
    model = build_model(config.model.name, 10, in_channels=1, **config.model.options)
    for stage in stages:
        k, run_id = stage.data.tags["colam.stage"], stage.info.run_id
        assert artifact_paths(store, run_id) == {"model.pt", "soft_labels.npy", "soft_labels.json", "metrics.json",
                                                 f"figures/soft_labels_stage_{k}.png"}
        local = out / f"stage_{k}"
        dst = tmp_path / k

        state = torch.load(download(store, run_id, "model.pt", dst), weights_only=True)
        assert set(state) == set(model.state_dict())
        model.load_state_dict(state)  # strict: same keys and shapes
        expected = torch.load(local / "model.pt", weights_only=True)
        assert all(torch.equal(state[key], expected[key]) for key in expected)

        soft = np.load(download(store, run_id, "soft_labels.npy", dst))
        assert soft.shape == (10, 10)
        assert np.allclose(soft.sum(axis=1), 1.0, atol=1e-5) and (soft >= 0).all()
        assert np.array_equal(soft, np.load(local / "soft_labels.npy"))
        assert json.loads(download(store, run_id, "soft_labels.json", dst).read_text())["stage"] == int(k)
        assert download(store, run_id, "metrics.json", dst).read_bytes() == (local / "metrics.json").read_bytes()

        figure = download(store, run_id, f"figures/soft_labels_stage_{k}.png", dst)
        assert figure.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(figure)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_parent_holds_history_config_and_metrics(store, colam_run, tmp_path):
    _, out, metrics, parents, _ = colam_run
    run_id = parents[0].info.run_id
    assert artifact_paths(store, run_id) == {"history.csv", "config.yaml", "metrics.json"}
    for name in ("history.csv", "config.yaml", "metrics.json"):
        assert download(store, run_id, name, tmp_path).read_bytes() == (out / name).read_bytes(), name
    final = parents[0].data.metrics
    assert final["test_acc"] == metrics["test_acc"] and final["wall_time_s"] == metrics["wall_time_s"]


def test_tags_name_method_variant_temperature_seed_protocol(colam_run, tiny_config):
    config, _, _, parents, _ = colam_run
    tags = parents[0].data.tags
    assert tags["colam.method"] == "colam" and tags["colam.seed"] == "0" and tags["colam.temperature"] == "2.0"
    assert tags["colam.variant"] == variant(config)
    assert tags["colam.variant"].startswith("colam(") and "temperature" not in tags["colam.variant"]
    assert tags["colam.protocol"] == protocol_digest(config) and re.fullmatch(r"[0-9a-f]{12}", tags["colam.protocol"])
    # The protocol names data, model and training, not the method or its temperature.
    assert protocol_digest(tiny_config("method.colam.temperature=0.5")) == tags["colam.protocol"]
    assert protocol_digest(tiny_config("train.lr=0.1")) != tags["colam.protocol"]
    assert variant(tiny_config("method.colam.temperature=0.5")) == tags["colam.variant"]


def test_baseline_run_has_no_temperature_and_shares_the_protocol(store, colam_run, tiny_config, tmp_path):
    name = new_experiment(store, "baseline-hl")
    tracked_fit(store, name, tiny_config("method.name=hl"), tmp_path / "hl")
    parents, stages = runs_of(store, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    tags, params = parents[0].data.tags, parents[0].data.params
    assert "colam.temperature" not in tags
    assert tags["colam.method"] == "hl" and tags["colam.variant"] == "hl"
    assert tags["colam.protocol"] == colam_run[3][0].data.tags["colam.protocol"]  # comparable with COLAM
    assert params["method"] == "hl" and not {"T", "m", "t", "peers"} & set(params)
    assert [s.data.tags["colam.stage"] for s in stages] == ["1"]  # one stage of all 4 epochs
    assert [step for step, _ in history(store, stages[0].info.run_id, "lr")] == [1, 2, 3, 4]
    assert artifact_paths(store, stages[0].info.run_id) == {"model.pt", "metrics.json"}  # no soft labels, no figure


# ----------------------------------------------------------------------------- 2. stage by stage


def test_stages_trained_in_separate_calls_continue_one_parent(store, colam_run, tmp_path):
    config, _, _, (reference,), reference_stages = colam_run
    name = new_experiment(store, "stage-by-stage")
    out = tmp_path / "chain"

    with MlflowRunLog(store, name, out) as run_log:
        fit_stage(config, out, 1, run_log=run_log)
    (parent,), stages = runs_of(store, name)
    assert parent.info.status == "RUNNING"
    assert [(s.data.tags["colam.stage"], s.info.status) for s in stages] == [("1", "FINISHED")]

    # Another process: a new client and a new run log find the parent by its colam.run_key tag.
    with MlflowRunLog(connect(store.tracking_uri), name, out) as run_log:
        fit_stage(config, out, 2, run_log=run_log)
    parents, stages = runs_of(store, name)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert parents[0].info.status == "FINISHED"
    assert [(s.data.tags["colam.stage"], s.info.status) for s in stages] == [("1", "FINISHED"), ("2", "FINISHED")]
    assert all(s.data.tags["mlflow.parentRunId"] == parent.info.run_id for s in stages)

    # The same numbers as one `fit` of the same config, in the parent and in each stage run.
    assert curves(store, parents[0]) == curves(store, reference)
    for stage, expected in zip(stages, reference_stages, strict=True):
        assert curves(store, stage) == curves(store, expected)


def break_training_on_call(monkeypatch, call: int, error: type[BaseException]) -> None:
    """Make `colam.engine.train_one_epoch` raise `error` on its `call`-th call (1-based)."""
    real, calls = colam.engine.train_one_epoch, []

    def breaking(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error(f"stopped on training call {call}")
        return real(*args, **kwargs)

    monkeypatch.setattr(colam.engine, "train_one_epoch", breaking)


@pytest.mark.parametrize("partial_kept", [True, False], ids=["resumed", "trained-again"])
def test_a_stage_step_run_again_after_a_crash_logs_its_epochs_once(store, colam_run, tmp_path, monkeypatch,
                                                                   partial_kept):
    # A stage step run again continues after its last saved epoch (stage_2/.partial.pt) in the
    # crashed attempt's stage run. Without that file (a retry on a fresh pod) it trains the whole
    # stage again: the crashed attempt's epochs stay in its own (FAILED) stage run. Either way the
    # parent's curve holds every epoch once.
    config, _, _, (reference,), _ = colam_run
    name = new_experiment(store, f"stage-step-crash-{partial_kept}")
    out = tmp_path / "chain"
    with MlflowRunLog(store, name, out) as run_log:
        fit_stage(config, out, 1, run_log=run_log)
    break_training_on_call(monkeypatch, 2, RuntimeError)  # epoch 4, the second of stage 2
    with pytest.raises(RuntimeError), MlflowRunLog(connect(store.tracking_uri), name, out) as run_log:
        fit_stage(config, out, 2, run_log=run_log)
    monkeypatch.undo()
    assert (out / "stage_2" / ".partial.pt").exists()  # epoch 3 was saved
    if not partial_kept:
        (out / "stage_2" / ".partial.pt").unlink()
    (_,), (_, crashed) = runs_of(store, name)
    with MlflowRunLog(connect(store.tracking_uri), name, out) as run_log:
        fit_stage(config, out, 2, run_log=run_log)

    (parent,), stages = runs_of(store, name)
    assert parent.info.status == "FINISHED"
    statuses = sorted((s.data.tags["colam.stage"], s.info.status) for s in stages)
    if partial_kept:
        assert statuses == [("1", "FINISHED"), ("2", "FINISHED")]
        assert stages[1].info.run_id == crashed.info.run_id
        assert [step for step, _ in history(store, crashed.info.run_id, "lr")] == [3, 4]  # epoch 3 once
    else:
        assert statuses == [("1", "FINISHED"), ("2", "FAILED"), ("2", "FINISHED")]
        assert [step for step, _ in history(store, crashed.info.run_id, "lr")] == [3]
    assert not (out / "stage_2" / ".partial.pt").exists()
    assert [step for step, _ in history(store, parent.info.run_id, "lr")] == [1, 2, 3, 4]
    assert curves(store, parent) == curves(store, reference)


class Killed(BaseException):
    """Stands for SIGKILL: raised from a run log hook, outside any `with MlflowRunLog` (which would mark
    the runs FAILED), so the runs stay RUNNING as a killed process leaves them."""


def kill_in_hook(monkeypatch, hook: str, call: int = 1) -> None:
    """Make MlflowRunLog.`hook` raise Killed on its `call`-th call, before it does anything."""
    real, calls = getattr(MlflowRunLog, hook), []

    def killed(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Killed(hook)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowRunLog, hook, killed)


@pytest.mark.parametrize("hook, call, what", [
    ("stage_end", 1, "stage 1's end saved, not reported"),
    ("stage_start", 2, "stage 1's end reported, stage 2 not begun"),
    ("finish", 1, "the last checkpoint saved, the run's end not reported"),
    ("stage_end", 2, "the last stage's end saved, not reported"),
], ids=["stage-end", "after-stage-end", "finish", "last-stage-end"])
def test_a_run_killed_at_a_stage_end_reports_it_once_when_resumed(store, colam_run, tmp_path, monkeypatch,
                                                                  hook, call, what):
    # The state after a stage's last epoch is on disk before the run log hears the stage's end: a
    # restart trains nothing of that stage again and reports what the killed process did not.
    config, _, _, (reference,), reference_stages = colam_run
    name = new_experiment(store, f"killed-{hook}-{call}")
    out = tmp_path / "run"
    kill_in_hook(monkeypatch, hook, call)
    with pytest.raises(Killed):
        fit(config, out, run_log=MlflowRunLog(store, name, out))
    monkeypatch.undo()
    assert json.loads((out / ".provenance.json").read_text())["complete"] is False

    tracked_fit(connect(store.tracking_uri), name, config, out)
    (parent,), stages = runs_of(store, name)
    assert parent.info.status == "FINISHED"
    assert [(s.data.tags["colam.stage"], s.info.status) for s in stages] == [("1", "FINISHED"), ("2", "FINISHED")]
    for stage, expected in zip(stages, reference_stages, strict=True):
        assert curves(store, stage) == curves(store, expected), what
        assert artifact_paths(store, stage.info.run_id) == artifact_paths(store, expected.info.run_id), what
    assert curves(store, parent) == curves(store, reference)
    assert json.loads((out / ".provenance.json").read_text())["complete"] is True


# ----------------------------------------------------------------------------- 3. interrupted, then resumed


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")])
def test_interrupted_run_is_marked_and_resumes_into_the_same_parent(store, colam_run, tmp_path, monkeypatch,
                                                                    error, status):
    config, _, _, (reference,), reference_stages = colam_run
    name = new_experiment(store, f"interrupted-{status}")
    out = tmp_path / "run"
    break_training_on_call(monkeypatch, 3, error)  # epoch 3
    with pytest.raises(error):
        tracked_fit(store, name, config, out)
    monkeypatch.undo()

    (parent,), stages = runs_of(store, name)
    assert parent.info.status == status
    assert [(s.data.tags["colam.stage"], s.info.status) for s in stages] == [("1", "FINISHED"), ("2", status)]
    # the stage runs hold the live curves; the parent gets the whole curve once the run finishes
    assert [step for step, _ in history(store, stages[0].info.run_id, "lr")] == [1, 2]
    assert history(store, parent.info.run_id, "lr") == []
    interrupted_stage_2 = stages[1].info.run_id
    if error is not KeyboardInterrupt:
        return  # resuming is the same for both

    tracked_fit(connect(store.tracking_uri), name, config, out)  # resume: as a new process would
    parents, stages = runs_of(store, name)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # no second parent
    assert parents[0].info.status == "FINISHED"
    assert [(s.data.tags["colam.stage"], s.info.status) for s in stages] == [("1", "FINISHED"), ("2", "FINISHED")]
    assert stages[1].info.run_id == interrupted_stage_2
    # Every epoch logged once (the final metrics add one test_acc at the last epoch).
    assert [step for step, _ in history(store, parent.info.run_id, "lr")] == [1, 2, 3, 4]
    assert [step for step, _ in history(store, parent.info.run_id, "test_acc")] == [1, 2, 3, 4]
    assert [step for step, _ in history(store, interrupted_stage_2, "lr")] == [3, 4]
    assert curves(store, parents[0]) == curves(store, reference)
    for stage, expected in zip(stages, reference_stages, strict=True):
        assert curves(store, stage) == curves(store, expected)
    assert "soft_labels.npy" in artifact_paths(store, interrupted_stage_2)


def test_epochs_not_sent_live_reach_the_stage_run_at_its_end_also_below_the_newest_it_holds(store, colam_run,
                                                                                            tmp_path, monkeypatch):
    """The live hooks send epochs at most every EPOCH_SECONDS (an hour here: a process sends only its
    first epoch). Killed in epoch 4 with epoch 3 unsent, the resumed process sends epoch 4 first; stage 2's
    end then sends epoch 3, which lies below the newest epoch the store holds."""
    config, _, _, (reference,), reference_stages = colam_run
    monkeypatch.setattr(pipelines.tracking, "EPOCH_SECONDS", 3600.0)
    sent = []
    live = MlflowRunLog.epoch_end

    def spy(self, stage, row):
        before = self.sent_at
        live(self, stage, row)
        if self.sent_at != before:
            sent.append(row["epoch"])

    monkeypatch.setattr(MlflowRunLog, "epoch_end", spy)
    name, out = new_experiment(store, "epochs-sent-later"), tmp_path / "run"
    train_one_epoch = colam.engine.train_one_epoch
    break_training_on_call(monkeypatch, 4, Killed)
    with pytest.raises(Killed):  # no `with`: nothing sends what the run log held back
        fit(config, out, run_log=MlflowRunLog(store, name, out))
    monkeypatch.setattr(colam.engine, "train_one_epoch", train_one_epoch)
    (_, stage_2) = runs_of(store, name)[1]
    assert history(store, stage_2.info.run_id, "lr") == []  # epoch 3 was trained, saved and not sent
    tracked_fit(connect(store.tracking_uri), name, config, out)

    assert sent == [1, 4]
    (parent,), stages = runs_of(store, name)
    assert [s.info.run_id for s in stages][1] == stage_2.info.run_id
    assert [step for step, _ in history(store, stage_2.info.run_id, "lr")] == [3, 4]
    assert curves(store, parent) == curves(store, reference)
    for stage, expected in zip(stages, reference_stages, strict=True):
        assert curves(store, stage) == curves(store, expected)


def test_a_run_stopped_by_an_error_sends_its_saved_epochs_before_it_marks_the_stage(store, colam_run, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(pipelines.tracking, "EPOCH_SECONDS", 3600.0)  # a process sends only its first epoch live
    name, out = new_experiment(store, "epochs-sent-on-error"), tmp_path / "run"
    break_training_on_call(monkeypatch, 4, RuntimeError)  # epoch 4: epoch 3, stage 2's first, is saved
    with pytest.raises(RuntimeError):
        tracked_fit(store, name, colam_run[0], out)
    _, (_, stage_2) = runs_of(store, name)
    assert stage_2.info.status == "FAILED"
    assert [step for step, _ in history(store, stage_2.info.run_id, "lr")] == [3]


def test_a_stage_trained_again_after_a_kill_between_its_files_and_the_checkpoint_ends_finished(store, colam_run,
                                                                                              tmp_path, monkeypatch):
    """Killed after stage 1's folder was written but before checkpoint.pt: the restart finishes stage 1's
    run from the folder, trains epoch 2 again into a new stage run, and that one ends FINISHED too."""
    config, _, _, (reference,), _ = colam_run
    name, out, save = new_experiment(store, "killed-at-a-stage-end"), tmp_path / "run", WholeRun.save

    def killed_at_stage_1_end(self, state):
        if state["epoch"] == 2:
            raise Killed
        save(self, state)

    monkeypatch.setattr(WholeRun, "save", killed_at_stage_1_end)
    with pytest.raises(Killed):
        fit(config, out, run_log=MlflowRunLog(store, name, out))
    monkeypatch.setattr(WholeRun, "save", save)
    tracked_fit(connect(store.tracking_uri), name, config, out)

    (parent,), stages = runs_of(store, name)
    assert [(s.data.tags["colam.stage"], s.info.status) for s in stages] == [("1", "FINISHED"), ("1", "FINISHED"),
                                                                              ("2", "FINISHED")]
    assert parent.info.status == "FINISHED" and curves(store, parent) == curves(store, reference)


# ----------------------------------------------------------------------------- 4. the CLI


def closed_port():
    with socket.socket() as probe:  # bound, never listened on, closed: connections are refused
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_training(monkeypatch):
    calls = []
    monkeypatch.setattr(colam.engine, "prepare", lambda *a, **k: calls.append(a) or pytest.fail("training started"))
    return calls


def test_cli_unreachable_tracking_server_fails_fast_before_training(tiny_config, tmp_path, monkeypatch, capsys,
                                                                     no_training):
    monkeypatch.chdir(tmp_path)
    for key in HTTP_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    config = write_config(tiny_config(), tmp_path / "tiny.yaml")
    out = tmp_path / "run"

    began = time.monotonic()
    code = pipelines_cli.main(["train", "--config", config, "--out", str(out), "--track", "--experiment", "cli"])
    seconds = time.monotonic() - began

    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and "MLFLOW_TRACKING_URI" in lines[0], captured.err
    assert seconds < 30
    assert no_training == [] and not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["tiny.yaml"]  # no mlflow.db, no mlruns either
    assert not any(key in os.environ for key in HTTP_ENV)  # connect() put back the retry settings


@pytest.fixture
def fake_fit(monkeypatch):
    """colam.engine.fit as a recorder of the run log it is given: these tests are about the CLI's choice."""
    calls = []

    def record(config, out_dir, *, run_log=None, **kwargs):
        calls.append(run_log)
        return {"test_acc": 0.5}

    monkeypatch.setattr(colam.engine, "fit", record)
    return calls


def test_cli_without_track_and_without_uri_tracks_nothing(tiny_config, tmp_path, monkeypatch, fake_fit):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(pipelines.tracking, "connect", lambda *a, **k: pytest.fail("connected to a tracking store"))
    config = write_config(tiny_config(), tmp_path / "tiny.yaml")
    assert pipelines_cli.main(["train", "--config", config, "--out", "run", "--experiment", "cli"]) == 0
    assert fake_fit == [None]
    assert sorted(os.listdir(tmp_path)) == ["tiny.yaml"]  # no mlflow.db, no mlruns


@pytest.mark.parametrize("args, experiment", [
    (["--experiment", "named"], "named"),
    ([], "from-params"),  # tracking.experiment of a params.yaml
    (["--track", "--experiment", "named"], "named"),
    (["--no-track", "--experiment", "named"], None),
])
def test_cli_tracks_when_the_uri_is_set_unless_told_not_to(store, tiny_config, tmp_path, monkeypatch, fake_fit,
                                                           args, experiment):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.tracking_uri)
    params = {**tiny_config().to_dict(), "tracking": {"experiment": "from-params"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert pipelines_cli.main(["train", "--config", "params.yaml", "--out", "run", *args]) == 0
    (run_log,) = fake_fit
    if experiment is None:
        assert run_log is None
    else:
        assert isinstance(run_log, MlflowRunLog)
        assert (run_log.client.tracking_uri, run_log.experiment, run_log.out_dir) == (
            store.tracking_uri, experiment, Path("run"))
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]


# ----------------------------------------------------------------------------- 5. real server, S3 artifacts


def test_server_with_s3_artifacts_receives_the_stage_artifacts(mlflow_s3_server, s3_server, tiny_config, tmp_path,
                                                               monkeypatch):
    # The client needs no S3 credentials: the server proxies mlflow-artifacts:/ to the bucket.
    for key in s3_server.env():
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_s3_server.uri)
    monkeypatch.chdir(tmp_path)
    config = write_config(tiny_config(), tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    assert pipelines_cli.main(["train", "--config", config, "--out", str(out), "--experiment", "server-s3"]) == 0

    client = MlflowClient(mlflow_s3_server.uri)
    parents, stages = runs_of(client, "server-s3")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert [s.data.tags["colam.stage"] for s in stages] == ["1", "2"]
    s3 = s3_server.client()
    destination = urlparse(mlflow_s3_server.artifacts_destination)  # s3://BUCKET/mlflow
    for stage in stages:
        k, run = stage.data.tags["colam.stage"], stage
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        for name in ("soft_labels.npy", "model.pt"):
            expected = (out / f"stage_{k}" / name).read_bytes()
            local = download(client, run.info.run_id, name, tmp_path / "download" / k)
            assert local.read_bytes() == expected, (k, name)
            key = destination.path.strip("/") + urlparse(run.info.artifact_uri).path + "/" + name
            assert s3.get_object(Bucket=destination.netloc, Key=key)["Body"].read() == expected, (k, name)
        assert f"figures/soft_labels_stage_{k}.png" in artifact_paths(client, run.info.run_id)
