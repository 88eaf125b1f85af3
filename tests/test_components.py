"""The Kubeflow components' Python functions (components/*.py) called directly with real kfp artifact
objects on local folders: what each writes and reports in its artifacts' metadata, that the chain
prepare -> (train_stage -> estimate_soft_labels) x m -> evaluate gives the numbers of one `fit`,
what a step refuses, and what the steps log to MLflow when MLFLOW_TRACKING_URI is set."""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Metrics, Model

from colam import io as cio
from colam.config import from_dict, load_config
from colam.engine import fit
from colam.errors import ColamError
from components.estimate_soft_labels import estimate_soft_labels
from components.evaluate import evaluate
from components.prepare import prepare
from components.train_stage import train_stage
from tests.conftest import TINY

STAGES = 2
# The base config the pipeline passes to prepare (as JSON text); the headline parameters below
# differ from it where they can, so the test sees that they win.
BASE = json.dumps(load_config(None, TINY + [f"method.colam.stages={STAGES}", "method.colam.epochs_per_stage=1",
                                            f"train.epochs={STAGES}"]).to_dict())
HEADLINE = dict(stages=STAGES, method="colam", model="small_cnn", dataset="digits", epochs_per_stage=1,
                temperature=1.5, seed=3)
CHECKPOINT_FILES = {"model.pt", "state.pt", "history.csv", "metrics.json"}
TRAIN_METRICS = ("train_loss", "train_acc", "val_acc", "test_acc")


def artifact(cls, folder, name):
    """An output artifact as the kfp executor hands it over: a uri (= path) that does not exist yet."""
    made = cls(name=name, uri=str(Path(folder) / name))
    assert made.path == str(Path(folder) / name)
    return made


def read_json(folder, name):
    return json.loads((Path(folder) / name).read_text())


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_prepare(folder, **changes):
    split = artifact(Dataset, folder, "split")
    text = prepare(BASE, split=split, **{**HEADLINE, **changes})
    return text, split


def run_chain(folder, stages=STAGES, tracking=None, **changes):
    """prepare, then train and estimate each stage, then evaluate: every step in its own folder."""
    folder = Path(folder)
    tracking = tracking or {}
    config, split = run_prepare(folder / "prepare", stages=stages, **changes)
    chain = SimpleNamespace(config=config, split=split, checkpoints={}, metrics={}, soft_labels={})
    previous = {}
    for stage in range(1, stages + 1):
        checkpoint = artifact(Model, folder / f"train_{stage}", "checkpoint")
        metrics = artifact(Metrics, folder / f"train_{stage}", "metrics")
        run_name = {"run_name": "kfp-run"} if tracking else {}
        train_stage(config, stage, stages, split, checkpoint, metrics, **previous, **tracking, **run_name)
        soft_labels = artifact(Dataset, folder / f"estimate_{stage}", "soft_labels")
        estimate_soft_labels(config, stage, stages, split, checkpoint, soft_labels, **tracking)
        chain.checkpoints[stage], chain.metrics[stage], chain.soft_labels[stage] = checkpoint, metrics, soft_labels
        previous = {"previous_checkpoint": checkpoint, "soft_labels": soft_labels}
    chain.report = artifact(Artifact, folder / "evaluate", "report")
    chain.eval_metrics = artifact(Metrics, folder / "evaluate", "metrics")
    chain.confusion = artifact(ClassificationMetrics, folder / "evaluate", "confusion")
    evaluate(config, split, previous["previous_checkpoint"], chain.report, chain.eval_metrics, chain.confusion,
             **tracking)
    return chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The whole chain once, untracked (MLFLOW_TRACKING_URI unset), run from its own folder."""
    root = tmp_path_factory.mktemp("chain")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(root)
        made = run_chain(root / "steps")
    made.root = root
    return made


@pytest.fixture(scope="module")
def whole(chain, tmp_path_factory):
    """One uninterrupted `fit` of the config prepare resolved."""
    out = tmp_path_factory.mktemp("whole") / "run"
    metrics = fit(from_dict(json.loads(chain.config)), out, progress=False)
    return SimpleNamespace(out=out, metrics=metrics)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The whole chain once more with MLFLOW_TRACKING_URI set (a sqlite store in a temporary folder)."""
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)  # a sqlite store keeps its artifacts in ./mlruns
        made = run_chain(root / "steps", tracking={"experiment": "kfp-test", "run_key": "run-abc"})
    made.uri, made.root = uri, root
    return made


# --------------------------------------------------------------------------- prepare


def test_prepare_resolves_the_headline_parameters_and_writes_the_split(tmp_path):
    text, split = run_prepare(tmp_path, stages=3, epochs_per_stage=2, method="cskd", temperature=0.5, seed=7)
    config = json.loads(text)
    assert config["method"]["name"] == "cskd"
    assert config["model"]["name"] == "small_cnn"
    assert config["data"]["name"] == "digits"
    assert config["seed"] == 7
    assert config["method"]["cskd"]["temperature"] == 0.5  # T of the method trained, not COLAM's (issue 17)
    assert config["method"]["colam"]["stages"] == 3
    assert config["method"]["colam"]["epochs_per_stage"] == 2
    assert config["train"]["epochs"] == 3 * 2
    assert config["train"]["batch_size"] == 32  # the rest is the base config's
    assert from_dict(config).to_dict() == config  # a complete config, as the later steps read it

    assert sorted(p.name for p in Path(split.path).iterdir()) == [".colam-files", "raw", "split.json", "split.npz"]
    # the digits' arrays, read by every later step instead of importing scikit-learn
    assert sorted(p.name for p in (Path(split.path) / "raw").iterdir()) == [".colam-files", "digits.json", "digits.npz"]
    summary = read_json(split.path, "split.json")
    for key in ("train_samples", "val_samples", "test_samples", "noisy_labels"):
        assert split.metadata[key] == summary[key], key
    assert summary["train_samples"] == 160 and summary["val_samples"] == 40  # 200 digits, 20 % held out


def test_prepare_of_the_chain_sets_its_parameters(chain):
    config = json.loads(chain.config)
    assert (config["method"]["name"], config["seed"], config["method"]["colam"]["temperature"]) == ("colam", 3, 1.5)
    assert config["train"]["epochs"] == STAGES * 1


@pytest.mark.parametrize("changes, key", [
    ({"temperature": -1.0}, "method.colam.temperature"),
    ({"method": "nope"}, "method.name"),
    ({"dataset": "nope"}, "data.name"),
    ({"seed": -1}, "seed"),
    ({"stages": 0}, "steps"),
    ({"epochs_per_stage": 0}, "method.colam.epochs_per_stage"),  # not train.epochs, which derives from it
    ({"method": "hl", "epochs_per_stage": 0}, "method.colam.epochs_per_stage"),
])
def test_prepare_refuses_a_bad_parameter_and_writes_nothing(tmp_path, changes, key):
    split = artifact(Dataset, tmp_path, "split")
    with pytest.raises(ColamError) as excinfo:
        prepare(BASE, split=split, **{**HEADLINE, **changes})
    message = str(excinfo.value)
    assert message.startswith(f"{key}:") and "\n" not in message, message
    assert not Path(split.path).exists()
    assert split.metadata == {}


def test_prepare_refuses_an_unknown_model(tmp_path):
    with pytest.raises(ColamError, match="^model.name:"):
        prepare(BASE, split=artifact(Dataset, tmp_path, "split"), **{**HEADLINE, "model": "nope"})


# --------------------------------------------------------------------------- the chain


def test_train_stage_writes_a_checkpoint_and_reports_its_metrics(chain):
    for stage in range(1, STAGES + 1):
        checkpoint, metrics = chain.checkpoints[stage], chain.metrics[stage]
        assert CHECKPOINT_FILES <= {p.name for p in Path(checkpoint.path).iterdir()}
        saved = read_json(checkpoint.path, "metrics.json")
        assert {k: metrics.metadata[k] for k in TRAIN_METRICS} == {k: saved[k] for k in TRAIN_METRICS}
        assert set(metrics.metadata) == set(TRAIN_METRICS)
        assert saved["epoch"] == stage and saved["stage"] == stage and saved["steps"] == STAGES
        assert checkpoint.metadata == {"epoch": stage, "stage": stage, "framework": "pytorch"}
        assert not (Path(checkpoint.path) / "soft_labels.npy").exists()  # estimation is the next step's


def test_estimate_writes_the_soft_labels_the_next_stage_trains_on(chain):
    assert read_json(chain.checkpoints[1].path, "metrics.json")["soft_labels_sha256"] is None
    for stage in range(1, STAGES + 1):
        soft_labels = chain.soft_labels[stage]
        folder = Path(soft_labels.path)
        assert {"soft_labels.npy", "soft_labels.json", "estimation.json"} <= {p.name for p in folder.iterdir()}
        assert soft_labels.metadata["artifacts"] == ["soft_labels"]
        assert soft_labels.metadata["stage"] == stage and soft_labels.metadata["epoch"] == stage
        matrix = np.load(folder / "soft_labels.npy")
        assert matrix.shape == (10, 10) and np.all(np.isfinite(matrix))
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-5)
        assert read_json(folder, "estimation.json")["sha256"]["soft_labels"] == sha256(folder / "soft_labels.npy")
        assert read_json(folder, "soft_labels.json")["temperature"] == 1.5
    stage_2 = read_json(chain.checkpoints[2].path, "metrics.json")
    assert stage_2["soft_labels_sha256"] == sha256(Path(chain.soft_labels[1].path) / "soft_labels.npy")


def test_evaluate_reports_the_final_model(chain):
    final = read_json(chain.checkpoints[STAGES].path, "metrics.json")
    metrics = chain.eval_metrics.metadata
    assert metrics["test_acc"] == final["test_acc"]
    assert metrics["val_acc"] == final["val_acc"]
    assert {"test_nll", "test_ece", "val_nll", "val_ece"} <= set(metrics)
    report = Path(chain.report.path)
    assert {"metrics.json", "predictions.csv", "history.csv"} <= {p.name for p in report.iterdir()}
    assert read_json(report, "metrics.json")["evaluated_epoch"] == STAGES

    matrix = chain.confusion.metadata["confusionMatrix"]
    assert [spec["displayName"] for spec in matrix["annotationSpecs"]] == [str(c) for c in range(10)]
    counts = np.array([row["row"] for row in matrix["rows"]])
    test_samples = chain.split.metadata["test_samples"]
    assert counts.shape == (10, 10)
    assert counts.sum() == test_samples == len((report / "predictions.csv").read_text().splitlines()) - 1
    assert np.trace(counts) / counts.sum() == pytest.approx(metrics["test_acc"], abs=1e-12)


def test_the_chain_gives_the_numbers_of_one_fit(chain, whole):
    final = read_json(chain.checkpoints[STAGES].path, "metrics.json")
    for key in ("test_acc", "val_acc", "train_loss", "train_acc"):
        assert final[key] == whole.metrics[key], key
    assert chain.eval_metrics.metadata["test_acc"] == whole.metrics["test_acc"]
    for stage in range(1, STAGES + 1):
        ours = np.load(Path(chain.soft_labels[stage].path) / "soft_labels.npy")
        theirs = np.load(whole.out / f"stage_{stage}" / "soft_labels.npy")
        assert np.array_equal(ours, theirs), stage


def test_untracked_steps_leave_no_tracking_store(chain):
    # The chain ran from chain.root with MLFLOW_TRACKING_URI unset: no sqlite:///mlflow.db default.
    assert not (chain.root / "mlflow.db").exists()
    assert not (chain.root / "mlruns").exists()


# --------------------------------------------------------------------------- refusals


def train_outputs(folder):
    return artifact(Model, folder, "checkpoint"), artifact(Metrics, folder, "metrics")


def assert_refused(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def test_stage_2_needs_the_previous_checkpoint(chain, tmp_path):
    checkpoint, metrics = train_outputs(tmp_path)
    with pytest.raises(ColamError) as excinfo:
        train_stage(chain.config, 2, STAGES, chain.split, checkpoint, metrics, soft_labels=chain.soft_labels[1])
    assert_refused(excinfo, "checkpoint")
    assert not Path(checkpoint.path).exists() and metrics.metadata == {}


def test_stage_2_of_colam_needs_the_soft_labels(chain, tmp_path):
    checkpoint, metrics = train_outputs(tmp_path)
    with pytest.raises(ColamError) as excinfo:
        train_stage(chain.config, 2, STAGES, chain.split, checkpoint, metrics,
                    previous_checkpoint=chain.checkpoints[1])
    assert_refused(excinfo, "soft_labels")
    assert not Path(checkpoint.path).exists() and metrics.metadata == {}


@pytest.mark.parametrize("previous, soft_labels, words", [
    (2, 1, ["checkpoint", "epoch 2", "epoch 1"]),  # the checkpoint of the step after
    (1, 2, ["soft_labels", "epoch 2", "epoch 1"]),  # soft labels of a later stage
])
def test_stage_2_refuses_inputs_of_another_epoch(chain, tmp_path, previous, soft_labels, words):
    checkpoint, metrics = train_outputs(tmp_path)
    with pytest.raises(ColamError) as excinfo:
        train_stage(chain.config, 2, STAGES, chain.split, checkpoint, metrics,
                    previous_checkpoint=chain.checkpoints[previous], soft_labels=chain.soft_labels[soft_labels])
    assert_refused(excinfo, *words)
    assert not Path(checkpoint.path).exists()


def test_estimate_refuses_a_checkpoint_of_another_epoch(chain, tmp_path):
    soft_labels = artifact(Dataset, tmp_path, "soft_labels")
    with pytest.raises(ColamError) as excinfo:
        estimate_soft_labels(chain.config, 1, STAGES, chain.split, chain.checkpoints[2], soft_labels)
    assert_refused(excinfo, "checkpoint", "epoch 2", "epoch 1")
    assert not Path(soft_labels.path).exists() and soft_labels.metadata == {}


def test_soft_labels_of_a_three_stage_run_refuse_the_wrong_stage(tmp_path):
    """Stage 3 of 3 given the checkpoint of stage 2 but the soft labels estimated after stage 1."""
    three, split = run_prepare(tmp_path / "prepare", stages=3)
    previous, estimates = {}, {}
    for stage in (1, 2):
        checkpoint, metrics = train_outputs(tmp_path / f"train_{stage}")
        train_stage(three, stage, 3, split, checkpoint, metrics, **previous)
        estimates[stage] = artifact(Dataset, tmp_path / f"estimate_{stage}", "soft_labels")
        estimate_soft_labels(three, stage, 3, split, checkpoint, estimates[stage])
        previous = {"previous_checkpoint": checkpoint, "soft_labels": estimates[stage]}
    checkpoint, metrics = train_outputs(tmp_path / "train_3")
    with pytest.raises(ColamError) as excinfo:
        train_stage(three, 3, 3, split, checkpoint, metrics, previous_checkpoint=previous["previous_checkpoint"],
                    soft_labels=estimates[1])
    assert_refused(excinfo, "soft_labels", "epoch 1", "epoch 2")
    assert not Path(checkpoint.path).exists()


def tampered(chain, folder, make, record_digest=True):
    """A copy of stage 1's soft-label folder whose soft_labels.npy is replaced by `make(original)`;
    with `record_digest` estimation.json records the new file's sha256, as if an estimate step had
    written the bad matrix itself (so the content checks are reached, not the digest check)."""
    copy = folder / "soft_labels"
    shutil.copytree(chain.soft_labels[1].path, copy)
    original = np.load(copy / "soft_labels.npy")
    np.save(copy / "soft_labels.npy", make(original.copy()))
    if record_digest:
        summary = json.loads((copy / "estimation.json").read_text())
        summary["sha256"]["soft_labels"] = hashlib.sha256((copy / "soft_labels.npy").read_bytes()).hexdigest()
        (copy / "estimation.json").write_text(json.dumps(summary))
    return Dataset(name="soft_labels", uri=str(copy))


def with_nan(matrix):
    matrix[3, 4] = np.nan
    return matrix


@pytest.mark.parametrize("make, words", [
    (with_nan, ["NaN"]),
    (lambda m: m[:, :9] / m[:, :9].sum(axis=1, keepdims=True), ["shape", "10"]),  # 10 x 9
    (lambda m: m[:9], ["9 rows"]),  # 9 x 10
    (lambda m: m * 2, ["sum to 1"]),
    (lambda m: m.reshape(-1), ["shape"]),
])
def test_stage_2_refuses_broken_soft_labels(chain, tmp_path, make, words):
    soft_labels = tampered(chain, tmp_path, make)
    checkpoint, metrics = train_outputs(tmp_path / "train")
    with pytest.raises(ColamError) as excinfo:
        train_stage(chain.config, 2, STAGES, chain.split, checkpoint, metrics,
                    previous_checkpoint=chain.checkpoints[1], soft_labels=soft_labels)
    assert_refused(excinfo, "soft_labels", *words)
    assert not Path(checkpoint.path).exists()


def test_stage_2_refuses_soft_labels_that_are_not_the_estimated_ones(chain, tmp_path):
    soft_labels = tampered(chain, tmp_path, lambda m: np.full_like(m, 1.0 / m.shape[1]), record_digest=False)
    checkpoint, metrics = train_outputs(tmp_path / "train")
    with pytest.raises(ColamError, match="soft_labels: .* differs from the file the estimate step wrote"):
        train_stage(chain.config, 2, STAGES, chain.split, checkpoint, metrics,
                    previous_checkpoint=chain.checkpoints[1], soft_labels=soft_labels)


@pytest.fixture(scope="module")
def hl(tmp_path_factory):
    """The chain for a one-stage method (hl): its 2 epochs cut into 2 segments."""
    root = tmp_path_factory.mktemp("hl")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        made = run_chain(root / "steps", method="hl")
    made.root = root
    return made


def test_a_one_stage_method_is_cut_into_segments_and_gives_the_numbers_of_fit(hl):
    config = json.loads(hl.config)
    assert config["method"]["name"] == "hl" and config["train"]["epochs"] == STAGES
    for stage in range(1, STAGES + 1):
        assert CHECKPOINT_FILES <= {p.name for p in Path(hl.checkpoints[stage].path).iterdir()}
        assert hl.checkpoints[stage].metadata["epoch"] == stage
        assert hl.soft_labels[stage].metadata["artifacts"] == []
        assert list(Path(hl.soft_labels[stage].path).glob("*.npy")) == []
    assert read_json(hl.checkpoints[2].path, "metrics.json")["soft_labels_sha256"] is None
    whole = fit(from_dict(config), hl.root / "whole", progress=False)
    final = read_json(hl.checkpoints[STAGES].path, "metrics.json")
    for key in ("test_acc", "val_acc", "train_loss", "train_acc"):
        assert final[key] == whole[key], key
    assert hl.eval_metrics.metadata["test_acc"] == whole["test_acc"]


def test_hl_stage_2_trains_without_soft_labels(hl, tmp_path):
    # hl learns nothing to pass on: stage 2 needs only the checkpoint, and gives the same model.
    checkpoint, metrics = train_outputs(tmp_path)
    train_stage(hl.config, 2, STAGES, hl.split, checkpoint, metrics, previous_checkpoint=hl.checkpoints[1])
    assert checkpoint.metadata["epoch"] == STAGES
    assert metrics.metadata == hl.metrics[2].metadata


# --------------------------------------------------------------------------- MLflow


def test_tracked_steps_log_one_parent_and_a_run_per_stage(tracked, chain):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracked.uri)
    experiment = client.get_experiment_by_name("kfp-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("colam.role") == "parent"]
    stages = {r.data.tags.get("colam.stage"): r for r in runs if r.data.tags.get("colam.role") == "stage"}
    assert len(parents) == 1 and sorted(stages) == [str(s) for s in range(1, STAGES + 1)]
    assert len(runs) == 1 + STAGES
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "kfp-run"
    for stage, run in stages.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"model.pt", "metrics.json", "soft_labels.npy", "soft_labels.json", "figures"} <= names, names
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert figures == {f"figures/soft_labels_stage_{stage}.png"}
        assert "estimation_seconds" in run.data.metrics
        assert run.data.metrics["stage_test_acc"] == tracked.metrics[int(stage)].metadata["test_acc"]

    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"data", "evaluation"} <= parent_files, parent_files
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "data")} == {"data/split.json"}
    assert {"evaluation/metrics.json", "evaluation/predictions.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert parent.data.metrics["eval_test_acc"] == tracked.eval_metrics.metadata["test_acc"]
    assert parent.data.metrics["test_acc"] == tracked.eval_metrics.metadata["test_acc"]
    assert parent.data.params["method"] == "colam" and parent.data.params["T"] == "1.5"
    # Tracking changes no number.
    assert tracked.eval_metrics.metadata == chain.eval_metrics.metadata
    for stage in range(1, STAGES + 1):
        assert np.array_equal(np.load(Path(tracked.soft_labels[stage].path) / "soft_labels.npy"),
                              np.load(Path(chain.soft_labels[stage].path) / "soft_labels.npy"))
    # The soft labels logged are the estimate step's file, bit for bit.
    logged = client.download_artifacts(stages["1"].info.run_id, "soft_labels.npy", str(tracked.root / "download"))
    assert sha256(logged) == sha256(Path(tracked.soft_labels[1].path) / "soft_labels.npy")


def test_estimate_without_a_tracked_training_step_names_the_run(tracked, tmp_path, monkeypatch):
    # A run key whose training step never logged: the estimate step cannot attach its soft labels.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    monkeypatch.chdir(tmp_path)
    soft_labels = artifact(Dataset, tmp_path, "soft_labels")
    with pytest.raises(ColamError) as excinfo:
        estimate_soft_labels(tracked.config, 1, STAGES, tracked.split, tracked.checkpoints[1], soft_labels,
                             experiment="kfp-test", run_key="run-other")
    assert_refused(excinfo, "MLFLOW_TRACKING_URI", "run-other")


def test_stage_2_refuses_soft_labels_of_a_run_with_another_configuration(chain, tmp_path):
    """Another temperature, same epochs: a valid folder of valid soft labels, for another run."""
    other = run_chain(tmp_path / "other", temperature=3.0)
    checkpoint, metrics = train_outputs(tmp_path / "train")
    with pytest.raises(ColamError) as excinfo:
        train_stage(chain.config, 2, STAGES, chain.split, checkpoint, metrics,
                    previous_checkpoint=chain.checkpoints[1], soft_labels=other.soft_labels[1])
    assert_refused(excinfo, "soft_labels", "another configuration")
    assert not Path(checkpoint.path).exists()


def test_estimate_lists_only_what_it_estimated(tmp_path):
    """A folder that already holds a per-sample file (from a peers run): not listed, not trained on."""
    config, split = run_prepare(tmp_path / "prepare")
    checkpoint, metrics = train_outputs(tmp_path / "train")
    train_stage(config, 1, STAGES, split, checkpoint, metrics)
    soft_labels = artifact(Dataset, tmp_path, "soft_labels")
    cio.take_folder(Path(soft_labels.path), "soft-label estimate")  # what an earlier estimate wrote there
    cio.save_array(Path(soft_labels.path) / "sample_soft_labels.npy", np.full((5, 10), 0.1, dtype=np.float32))
    estimate_soft_labels(config, 1, STAGES, split, checkpoint, soft_labels)
    assert read_json(soft_labels.path, "estimation.json")["artifacts"] == ["soft_labels"]


def test_a_retried_last_training_step_continues_the_same_mlflow_run(tmp_path, monkeypatch):
    """Kubeflow retries a train step that failed after training (say, in its upload): same parent run."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    tracking = {"experiment": "kfp-retry", "run_key": "run-retry"}
    done = run_chain(tmp_path / "steps", tracking=tracking)
    checkpoint, metrics = train_outputs(tmp_path / "retry")
    train_stage(done.config, 2, STAGES, done.split, checkpoint, metrics, previous_checkpoint=done.checkpoints[1],
                soft_labels=done.soft_labels[1], **tracking)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kfp-retry")
    parents = client.search_runs([experiment.experiment_id], "tags.`colam.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_an_unresolved_run_id_placeholder_is_refused(chain, tmp_path, monkeypatch):
    """Kubeflow Pipelines < 2.4 passes '{{$.pipeline_job_uuid}}' literally: every run would share it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    checkpoint, metrics = train_outputs(tmp_path / "train")
    with pytest.raises(ColamError) as excinfo:
        train_stage(chain.config, 1, STAGES, chain.split, checkpoint, metrics, run_key="{{$.pipeline_job_uuid}}")
    assert_refused(excinfo, "run_key", "2.4")
