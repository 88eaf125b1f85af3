"""The Kubeflow pipeline without a cluster: a local run with kfp's SubprocessRunner, and the package.

The local run is the issue's acceptance test: m = 2 on the bundled default, each stage consuming the
previous stage's checkpoint and soft labels, with the numbers of one `colam train` process.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from colam.engine import fit
from colam.errors import ColamError
from colam.steps import step_config
from pipelines import kubeflow
from pipelines.cli import main
from pipelines.params import load_params

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """`colam kfp local` for m = 2 on the bundled default (params.yaml: digits, t = 30), tracked in MLflow."""
    tmp = tmp_path_factory.mktemp("kfp")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)  # the step subprocesses inherit it
        patch.chdir(tmp)
        import io
        from contextlib import redirect_stdout

        captured = io.StringIO()
        with redirect_stdout(captured):
            code = main(["kfp", "local", "--params", str(PARAMS), "--stages", "2", "--root", str(tmp / "root")])
    assert code == 0
    summary = json.loads(captured.getvalue().strip().splitlines()[-1])
    run_dir = Path(summary["outputs"]["model"]).parents[1]
    return summary, run_dir, store, tmp


@pytest.fixture(scope="module")
def colam_train(tmp_path_factory):
    """One `colam train` process of the config the pipeline resolves (the same fit() the CLI calls)."""
    params = load_params(PARAMS)
    config = step_config(params.config.to_dict(), steps=2)
    out = tmp_path_factory.mktemp("whole") / "run"
    return fit(config, out, progress=False), out


def test_local_pipeline_gives_the_numbers_of_colam_train(local_run, colam_train):
    summary, run_dir, _, _ = local_run
    whole_metrics, whole = colam_train
    final = json.loads((run_dir / "train-stage-2" / "checkpoint" / "metrics.json").read_text())
    for key in ("test_acc", "val_acc", "train_acc", "train_loss"):
        assert final[key] == whole_metrics[key], key
    assert final["epoch"] == whole_metrics["epochs"] == 60
    for stage, task in ((1, "estimate-soft-labels"), (2, "estimate-soft-labels-2")):
        pipeline_labels = np.load(run_dir / task / "soft_labels" / "soft_labels.npy")
        assert np.array_equal(pipeline_labels, np.load(whole / f"stage_{stage}" / "soft_labels.npy")), stage
    # The evaluation scores the final model: the accuracy training measured on the test set.
    assert summary["metrics"]["test_acc"] == whole_metrics["test_acc"]
    assert summary["metrics"]["val_acc"] == whole_metrics["val_acc"]


def test_stage_2_trains_on_the_soft_labels_stage_1_estimated(local_run):
    _, run_dir, _, _ = local_run
    stage_1_labels = run_dir / "estimate-soft-labels" / "soft_labels" / "soft_labels.npy"
    stage_2 = json.loads((run_dir / "train-stage-2" / "checkpoint" / "metrics.json").read_text())
    assert stage_2["soft_labels_sha256"] == sha256(stage_1_labels)
    stage_1 = json.loads((run_dir / "train-stage" / "checkpoint" / "metrics.json").read_text())
    assert stage_1["soft_labels_sha256"] is None and stage_1["epoch"] == 30
    import torch

    state = torch.load(run_dir / "train-stage-2" / "checkpoint" / "state.pt", weights_only=True)
    assert torch.equal(state["method"]["soft_labels"], torch.from_numpy(np.load(stage_1_labels)))
    # Stage 2's labels are re-estimated from stage 2's model, not passed through.
    stage_2_labels = np.load(run_dir / "estimate-soft-labels-2" / "soft_labels" / "soft_labels.npy")
    assert not np.array_equal(stage_2_labels, np.load(stage_1_labels))


def test_local_pipeline_tracks_every_step_in_one_mlflow_run(local_run):
    from mlflow import MlflowClient

    _, run_dir, store, _ = local_run
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(load_params(PARAMS).tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("colam.role") == "parent"]
    stages = {r.data.tags["colam.stage"]: r for r in runs if r.data.tags.get("colam.role") == "stage"}
    assert len(parents) == 1 and sorted(stages) == ["1", "2"]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    evaluation = json.loads((run_dir / "evaluate" / "report" / "metrics.json").read_text())
    assert parent.data.metrics["eval_test_acc"] == evaluation["test_acc"]
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert parent_files == {"evaluation/metrics.json", "evaluation/predictions.csv"}
    for stage, run in stages.items():
        files = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"model.pt", "metrics.json", "soft_labels.npy", "soft_labels.json"} <= files, stage
        assert "estimation_seconds" in run.data.metrics
        assert run.info.status == "FINISHED"


# ---------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("package") / "colam-pipeline.yaml"
    assert main(["kfp", "compile", "--params", str(PARAMS), "--stages", "3", "--out", str(out),
                 "--image", "registry.example/colam:1.2"]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    return out, spec, platform


def test_package_chains_m_train_tasks_in_sequence(package):
    _, spec, _ = package
    tasks = spec["root"]["dag"]["tasks"]
    trains = ["train-stage", "train-stage-2", "train-stage-3"]
    estimates = ["estimate-soft-labels", "estimate-soft-labels-2", "estimate-soft-labels-3"]
    assert sorted(name for name in tasks if name.startswith("train-stage")) == trains
    for k in range(1, 3):
        artifacts = tasks[trains[k]]["inputs"]["artifacts"]
        assert artifacts["previous_checkpoint"]["taskOutputArtifact"]["producerTask"] == trains[k - 1]
        assert artifacts["soft_labels"]["taskOutputArtifact"]["producerTask"] == estimates[k - 1]
        assert tasks[trains[k]]["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"] == k + 1
        estimate_input = tasks[estimates[k]]["inputs"]["artifacts"]["checkpoint"]["taskOutputArtifact"]
        assert estimate_input["producerTask"] == trains[k]
    assert "previous_checkpoint" not in tasks[trains[0]]["inputs"].get("artifacts", {})
    evaluation = tasks["evaluate"]["inputs"]["artifacts"]["checkpoint"]["taskOutputArtifact"]
    assert evaluation["producerTask"] == trains[-1]
    for name in trains:
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2
    assert spec["pipelineInfo"]["name"] == "colam-3-stages"
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "method", "model", "dataset", "epochs_per_stage", "temperature", "seed", "config", "mlflow_experiment"}


def test_temperature_parameter_reaches_every_method_that_has_one(package, tmp_path):
    """The `temperature` parameter feeds prepare, whose step config gives it to the method trained when
    that method has a T (issue 17: it reached COLAM alone; a cskd run kept its own T silently)."""
    _, spec, _ = package
    prepare = spec["root"]["dag"]["tasks"]["prepare"]["inputs"]["parameters"]
    assert prepare["temperature"]["componentInputParameter"] == "temperature"
    default = spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    colam_t = load_params(PARAMS).config.method.colam.temperature
    assert spec["root"]["inputDefinitions"]["parameters"]["temperature"]["defaultValue"] == colam_t
    for method in ("cskd", "colam"):
        assert getattr(step_config(default, steps=3, method=method, temperature=8.0).method, method).temperature == 8.0
    assert step_config(default, steps=3, method="cskd", temperature=8.0).method.colam.temperature == colam_t
    assert step_config(default, steps=3, method="hl", temperature=8.0).to_dict() == \
        step_config(default, steps=3, method="hl").to_dict()  # hl has no T: nothing changes
    with pytest.raises(ColamError, match=r"^method\.cskd\.temperature: must be > 0"):
        kubeflow.package_arguments(spec, ["method=cskd", "temperature=0"])
    params = yaml.safe_load(PARAMS.read_text())
    params["method"].update(name="cskd", cskd={"temperature": 3.0})
    (tmp_path / "cskd.yaml").write_text(yaml.safe_dump(params))
    assert kubeflow.package_arguments(spec, [], str(tmp_path / "cskd.yaml"))["temperature"] == 3.0
    assert kubeflow.headline(load_params(tmp_path / "cskd.yaml").config)["temperature"] == 3.0
    params["method"]["name"] = "hl"  # no T of its own: the parameter's default is COLAM's
    (tmp_path / "hl.yaml").write_text(yaml.safe_dump(params))
    assert kubeflow.package_arguments(spec, [], str(tmp_path / "hl.yaml"))["temperature"] == colam_t
    assert kubeflow.headline(load_params(tmp_path / "hl.yaml").config)["temperature"] == colam_t


def test_package_asks_for_gpus_only_for_training_and_estimation(package):
    _, spec, _ = package
    executors = spec["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        container = executor["container"]
        gpu_step = name.startswith(("exec-train-stage", "exec-estimate-soft-labels"))
        assert container["image"] == ("registry.example/colam:1.2-cuda" if gpu_step else "registry.example/colam:1.2-cpu")
        accelerator = container.get("resources", {}).get("accelerator")
        if gpu_step:
            assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "1"), name
            assert container["resources"]["cpuRequest"] == 4 and container["resources"]["memoryRequest"] == 16
        else:
            assert accelerator is None, name
        # The image holds kfp and the project: nothing is pip-installed when a step starts.
        assert "pip install" not in " ".join(container["command"]), name


def test_package_takes_credentials_from_the_secret_and_gpu_nodes(package):
    _, spec, platform = package
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for name, settings in executors.items():
        (secret,) = settings["secretAsEnv"]
        assert secret["secretName"] == kubeflow.SECRET
        assert {k["secretKey"]: k["envVar"] for k in secret["keyToEnv"]} == {k: k for k in kubeflow.SECRET_KEYS}
        (endpoints,) = settings["configMapAsEnv"]
        assert endpoints["configMapName"] == kubeflow.ENDPOINTS
        assert {k["configMapKey"] for k in endpoints["keyToEnv"]} == set(kubeflow.ENDPOINT_KEYS)
        if name.startswith(("exec-train-stage", "exec-estimate-soft-labels")):
            assert settings["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert settings["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        else:
            assert "nodeSelector" not in settings and "tolerations" not in settings


def test_package_loads_back_into_kfp(package):
    """kfp reads its own package back: the structure a Kubeflow 2.x endpoint accepts."""
    from kfp import components

    out, _, _ = package
    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "colam-3-stages"


def test_cpu_only_package_has_no_gpu_settings(tmp_path):
    out = tmp_path / "cpu.yaml"
    assert main(["kfp", "compile", "--params", str(PARAMS), "--stages", "2", "--gpus", "0", "--out", str(out)]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    for executor in spec["deploymentSpec"]["executors"].values():
        assert "accelerator" not in executor["container"].get("resources", {})
    for settings in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        assert "nodeSelector" not in settings and "tolerations" not in settings


@pytest.mark.parametrize("argv, names", [
    (["--stages", "0"], "--stages"),
    (["--gpu-node-label", "nolabel"], "--gpu-node-label"),
    (["--gpus", "-1"], "--gpus"),
])
def test_compile_refuses_bad_options(tmp_path, capsys, argv, names):
    out = tmp_path / "p.yaml"
    assert main(["kfp", "compile", "--params", str(PARAMS), "--out", str(out), *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("colam: error: " + names) and len(error.splitlines()) == 1
    assert not out.exists()


def test_compile_refuses_params_that_make_no_valid_run(tmp_path, capsys):
    params = yaml.safe_load(PARAMS.read_text())
    params["method"]["colam"]["temperature"] = 0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    out = tmp_path / "p.yaml"
    assert main(["kfp", "compile", "--params", str(path), "--stages", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("colam: error: method.colam.temperature: must be > 0")
    assert not out.exists()


# ---------------------------------------------------------------------------- bad runner input


@pytest.mark.parametrize("argv, env, says", [
    (["--runner", "podman"], {}, "--runner: 'podman' is not a runner; one of subprocess, docker"),
    (["--runner", "docker"], {"DOCKER_HOST": "unix:///nonexistent/docker.sock", "MLFLOW_TRACKING_URI": ""},
     "--runner docker: no container engine answers at unix:///nonexistent/docker.sock"),
    (["--runner", "docker"], {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"},
     "MLFLOW_TRACKING_URI: 'sqlite:///mlflow.db' is a store on this machine that step containers do not see"),
    (["--runner", "docker"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"},
     "MLFLOW_TRACKING_URI: 127.0.0.1 is the step container itself"),
    (["--network", "bridge"], {}, "--network: only with --runner docker"),
], ids=["unknown-runner", "no-engine", "file-store", "loopback-server", "network-without-docker"])
def test_local_runner_bad_input_is_one_line_and_writes_nothing(argv, env, says, tmp_path, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(["kfp", "local", "--params", str(PARAMS), "--stages", "2", "--root", str(tmp_path / "root"), *argv])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"colam: error: {says}"), lines
    assert list(tmp_path.iterdir()) == []
