"""MLflow as its users expect it (issue 20): a training experiment, the split as a dataset input, the final
network as a logged (and registered) MLflow model, and the comparison as a run of its own with a champion."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

from pipelines.cli import main
from tests.conftest import TINY

SETS = [a for item in TINY for a in ("--set", item)]


@pytest.fixture
def store(tmp_path, monkeypatch) -> MlflowClient:
    monkeypatch.chdir(tmp_path)  # sqlite stores keep their artifacts in ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert main(["prepare", *SETS, "--out", "split"]) == 0
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def train(out: str, *extra: str) -> None:
    assert main(["train", *SETS, "--split", "split", "--out", out, "--track", "--experiment", "views",
                 "--no-progress", *extra]) == 0


def parent(client: MlflowClient, out: str):
    experiment = client.get_experiment_by_name("views").experiment_id
    (run,) = client.search_runs([experiment], f"tags.`colam.role` = 'parent' and tags.`colam.out_dir` = '{out}'")
    return run


def test_a_tracked_run_is_a_training_run_with_its_split_as_a_dataset(store, tmp_path):
    train("colam")
    train("hl", "--set", "method.name=hl")
    experiment = store.get_experiment_by_name("views")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    colam, hl = parent(store, "colam"), parent(store, "hl")
    assert {"method", "T", "m", "t", "peers", "model", "dataset", "seed"} <= colam.data.params.keys()
    assert colam.data.params["T"] == "2.0" and colam.data.params["dataset"] == "digits"
    (used,) = colam.inputs.dataset_inputs
    assert used.dataset.name == "digits" and json.loads(used.dataset.source) == {"uri": str(tmp_path / "split")}
    assert [tag.value for tag in used.tags if tag.key == "mlflow.data.context"] == ["train"]
    # the same split, the same digest; other data settings, another
    assert hl.inputs.dataset_inputs[0].dataset.digest == used.dataset.digest
    # no --split: drawn from data.* (data.root is its source); another split seed, another digest
    assert main(["train", *SETS, "--out", "other", "--track", "--experiment", "views", "--no-progress",
                 "--set", "data.split_seed=1", "--set", "method.name=hl", "--set", "data.root=digits-data"]) == 0
    other = parent(store, "other").inputs.dataset_inputs[0].dataset
    assert other.digest != used.dataset.digest and json.loads(other.source)["uri"] == str(tmp_path / "digits-data")


def test_an_experiment_made_before_is_said_to_be_one_of_training(store):
    store.create_experiment("views")
    train("hl", "--set", "method.name=hl")
    assert store.get_experiment_by_name("views").tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_final_network_is_a_registered_mlflow_model_that_loads_back_to_the_same_predictions(store, tmp_path):
    import mlflow.pytorch

    from colam.runs import final_network, open_run

    train("colam", "--register", "views-model")
    run_id = parent(store, "colam").info.run_id
    experiment = store.get_experiment_by_name("views").experiment_id
    (logged,) = store.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    (version,) = store.search_model_versions("name = 'views-model'")
    assert version.run_id == run_id and int(version.version) == 1
    loaded = mlflow.pytorch.load_model(f"models:/views-model/{version.version}")
    network = final_network(open_run(tmp_path / "colam", "--run"), 10, 1, "--run")
    images = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(images), network(images))
    model = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    assert list(model.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]
    assert list(model.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 10]
    # a sync later logs no second model and no second version
    assert main(["tracking", "sync", "colam", "--experiment", "views"]) == 0
    assert len(store.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")) == 1
    assert len(store.search_model_versions("name = 'views-model'")) == 1


def test_compare_logs_a_comparison_run_and_names_the_champion(store):
    for seed in (0, 1):
        train(f"hl-{seed}", "--set", "method.name=hl", "--set", f"seed={seed}")
        train(f"colam-{seed}", "--set", f"seed={seed}")
    assert main(["compare", "--experiment", "views", "--out", "summary", "--track", "--register", "champions"]) == 0
    experiment = store.get_experiment_by_name("views").experiment_id
    (comparison,) = store.search_runs([experiment], "tags.`colam.role` = 'comparison'")
    assert {a.path for a in store.list_artifacts(comparison.info.run_id)} == {
        "table.md", "summary.json", "metrics.json", "accuracy_vs_temperature.png"}
    parents = store.search_runs([experiment], "tags.`colam.role` = 'parent'")
    best = max(sorted(parents, key=lambda r: (r.info.start_time, r.info.run_id)),
               key=lambda r: r.data.metrics["val_acc"])
    champion = store.get_model_version_by_alias("champions", "champion")
    assert champion.run_id == best.info.run_id
    # run again: the same comparison run, its files replaced; no second version
    assert main(["compare", "--experiment", "views", "--out", "summary2", "--track", "--register", "champions"]) == 0
    assert len(store.search_runs([experiment], "tags.`colam.role` = 'comparison'")) == 1
    assert len(store.search_model_versions("name = 'champions'")) == 1
