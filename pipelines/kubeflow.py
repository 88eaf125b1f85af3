"""The Kubeflow pipeline, prepare -> (train stage -> estimate soft labels) x m -> evaluate, and `colam kfp
compile|submit|local` (docs/kubeflow.md). m is fixed when compiling (Kubeflow unrolls nothing at run time); the
method, model, data set, t, T, seed and run config are run parameters."""

# No `from __future__ import annotations` here: kfp reads the pipeline function's annotations as types.
import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

from colam.errors import ColamError, first_line

SECRET = "colam-credentials"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
ENDPOINTS = "colam-endpoints"
ENDPOINT_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")
DEFAULT_PACKAGE = "colam-pipeline.yaml"
RUNNERS = ("subprocess", "docker")
MAX_STAGES = 200  # three tasks a stage: past it the package would take minutes to build and no cluster would run it
HEADLINE = ("method", "model", "dataset", "epochs_per_stage", "temperature", "seed", "config")
# What a step container gets from this environment: the cluster's Secret and ConfigMap keys, and
# the settings that change a step's numbers or its talk with MLflow.
CONTAINER_ENV = (*SECRET_KEYS, *ENDPOINT_KEYS, "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "AWS_MAX_ATTEMPTS", "COLAM_TRACKING_RETRY_SECONDS", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class Cluster:
    """Where the GPU steps run and what they ask for; `gpus=0` compiles a CPU-only pipeline."""

    accelerator: str = "nvidia.com/gpu"
    gpus: int = 1
    gpu_node_label: "tuple[str, str] | None" = ("nvidia.com/gpu.present", "true")
    retries: int = 2  # a preempted or failed training step restarts its stage from the previous checkpoint


def _task(task, name: str, gpu_cluster: Cluster | None = None):
    """Every task: its display name, the S3 keys from the Secret and the MLflow/S3 endpoints from the ConfigMap
    (k8s/); training and estimation also ask `gpu_cluster` for their resources."""
    from kfp import kubernetes

    task.set_display_name(name)
    kubernetes.use_secret_as_env(task, secret_name=SECRET, secret_key_to_env={key: key for key in SECRET_KEYS})
    kubernetes.use_config_map_as_env(task, config_map_name=ENDPOINTS,
                                     config_map_key_to_env={key: key for key in ENDPOINT_KEYS})
    if gpu_cluster is None:
        return task
    task.set_cpu_request("4").set_memory_request("16G")
    if gpu_cluster.gpus > 0:
        task.set_accelerator_type(gpu_cluster.accelerator).set_accelerator_limit(gpu_cluster.gpus)
        if gpu_cluster.gpu_node_label:
            kubernetes.add_node_selector(task, *gpu_cluster.gpu_node_label)
        # Tolerate the usual taint of GPU node pools.
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    return task


def build_pipeline(stages: int, defaults: dict, experiment: str, image: str | None = None,
                   cluster: Cluster = Cluster()):
    """The pipeline function for `stages` stages; `defaults` (a run config) gives the parameters' defaults."""
    from kfp import dsl
    from kfp.dsl import Dataset, Metrics, Model

    import components
    from colam.steps import step_config

    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= MAX_STAGES:
        raise ColamError(f"--stages: must be an integer >= 1 and <= {MAX_STAGES}, got {stages!r}")
    default = headline(step_config(defaults, steps=stages))  # the defaults must make a valid run of this many stages
    parts = components.build(image)
    Outputs = NamedTuple("Outputs", [("model", Model), ("soft_labels", Dataset), ("metrics", Metrics)])

    @dsl.pipeline(name=f"colam-{stages}-stages",
                  description=f"COLAM (and baselines) in {stages} stages: prepare, then train and estimate soft "
                              f"labels {stages} times, then evaluate; every step tracked in MLflow")
    def colam_pipeline(method: str = default["method"], model: str = default["model"],
                       dataset: str = default["dataset"], epochs_per_stage: int = default["epochs_per_stage"],
                       temperature: float = default["temperature"], seed: int = default["seed"],
                       config: str = default["config"], mlflow_experiment: str = experiment) -> Outputs:
        prepared = _task(parts.prepare(config=config, stages=stages, method=method, model=model, dataset=dataset,
                                       epochs_per_stage=epochs_per_stage, temperature=temperature, seed=seed),
                         "prepare data")
        step = {"config": prepared.outputs["Output"], "split": prepared.outputs["split"],
                "experiment": mlflow_experiment, "run_key": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        previous: dict = {}
        for stage in range(1, stages + 1):
            train = _task(parts.train_stage(stage=stage, stages=stages, run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                                            **step, **previous), f"train stage {stage}", cluster)
            train.set_retry(num_retries=cluster.retries, backoff_duration="60s", backoff_factor=2.0)
            checkpoint = train.outputs["checkpoint"]
            estimate = _task(parts.estimate_soft_labels(stage=stage, stages=stages, checkpoint=checkpoint, **step),
                             f"estimate soft labels {stage}", cluster)
            previous = {"previous_checkpoint": checkpoint, "soft_labels": estimate.outputs["soft_labels"]}
        evaluation = _task(parts.evaluate(checkpoint=previous["previous_checkpoint"], **step), "evaluate")
        return Outputs(model=previous["previous_checkpoint"], soft_labels=previous["soft_labels"],
                       metrics=evaluation.outputs["metrics"])
    return colam_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="kfp_command", required=True)
    compile_ = commands.add_parser("compile", help="compile the pipeline for M stages to a YAML package")
    _pipeline_arguments(compile_)
    compile_.add_argument("--gpus", type=int, default=1, help="GPUs per training/estimation step; 0 compiles for CPU")
    compile_.add_argument("--accelerator", default=Cluster.accelerator, help="the GPU resource name")
    compile_.add_argument("--gpu-node-label", default="=".join(Cluster.gpu_node_label), metavar="KEY=VALUE",
                          help="node selector of the GPU steps ('none' for no selector)")
    compile_.add_argument("--retries", type=int, default=Cluster.retries, help="retries of a failed training step")
    compile_.add_argument("--out", default=DEFAULT_PACKAGE, help="the package to write")
    compile_.set_defaults(func=_compile)

    submit = commands.add_parser("submit", help="start a run of a compiled package on a Kubeflow Pipelines endpoint")
    submit.add_argument("--host", required=True, help="the Kubeflow Pipelines API, e.g. http://localhost:8080 "
                                                      "(a bearer token may come from $KFP_TOKEN)")
    submit.add_argument("--experiment", required=True, help="the Kubeflow experiment to file the run under")
    submit.add_argument("--package", default=DEFAULT_PACKAGE, help="a package written by `colam kfp compile`")
    submit.add_argument("--param", dest="params", action="append", default=[], metavar="NAME=VALUE",
                        help="a pipeline parameter, e.g. --param temperature=2 (repeatable)")
    submit.add_argument("--config", help="a params.yaml/config: its run sections become the `config` parameter and "
                                         "its method, model, data set, t, T and seed the headline parameters")
    submit.add_argument("--run-name", help="the run's name (default: package name and time)")
    submit.add_argument("--namespace", help="the Kubeflow profile namespace (multi-user deployments)")
    submit.add_argument("--service-account",
                        help="the service account the run's pods use (k8s/: colam-pipeline-runner)")
    submit.add_argument("--no-cache", action="store_true", help="run every step even if Kubeflow cached it")
    submit.set_defaults(func=_submit)

    local_ = commands.add_parser("local", help="run the pipeline here, without a cluster (kfp.local)")
    _pipeline_arguments(local_)
    local_.add_argument("--param", dest="pipeline_params", action="append", default=[], metavar="NAME=VALUE",
                        help="a pipeline parameter, e.g. --param epochs_per_stage=5 (repeatable)")
    local_.add_argument("--root", default="runs/kfp", help="pipeline root: every step's outputs go below it")
    local_.add_argument("--runner", default="subprocess", metavar="|".join(RUNNERS),
                        help="subprocess: every step a process of this environment (default); docker: a "
                             "container of the step's image on the local engine ($DOCKER_HOST)")
    local_.add_argument("--network", help="with --runner docker: the engine's network the steps join (e.g. one "
                                          "where the MLflow server answers; default: the engine's bridge)")
    local_.set_defaults(func=_local)


def _pipeline_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--params", default="params.yaml", help="params.yaml: the parameters' defaults and the "
                                                                 "MLflow experiment (tracking.experiment)")
    command.add_argument("--stages", type=int, help="m, fixed in the package (default: method.colam.stages)")
    command.add_argument("--image", help="the step images without their -cuda/-cpu suffix; `local` runs them with "
                                         "--runner docker (default: $COLAM_IMAGE or ghcr.io/colam-project/colam:0.1.0)")


def _pipeline_from(args, cluster: Cluster = Cluster()):
    from pipelines.params import load_params

    params = load_params(args.params)
    stages = args.stages if args.stages is not None else params.config.method.colam.stages
    return build_pipeline(stages, params.config.to_dict(), params.tracking.experiment, args.image, cluster), stages


def _compile(args) -> int:
    from kfp import compiler

    import components

    label = None if args.gpu_node_label.lower() == "none" else tuple(args.gpu_node_label.split("=", 1))
    if label is not None and len(label) != 2:
        raise ColamError(f"--gpu-node-label: expected KEY=VALUE or none, got {args.gpu_node_label!r}")
    if args.gpus < 0 or args.retries < 0:
        raise ColamError(f"--{'gpus' if args.gpus < 0 else 'retries'}: must be >= 0")
    cluster = Cluster(accelerator=args.accelerator, gpus=args.gpus, gpu_node_label=label, retries=args.retries)
    pipeline, stages = _pipeline_from(args, cluster)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, args.out)
    print(f"{args.out}: {stages} stages, images {components.image('cuda', args.image)} (GPU steps) and "
          f"{components.image('cpu', args.image)}")
    return 0


def read_package(path: str | Path) -> dict:
    """The pipeline spec of a compiled package (its first YAML document), checked to be one."""
    try:
        documents = list(yaml.safe_load_all(Path(path).read_text()))
    except FileNotFoundError:
        raise ColamError(f"--package: '{path}' does not exist; write it with `colam kfp compile`") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ColamError(f"--package: '{path}' is not a readable YAML file ({first_line(exc)[:300]})") from None
    spec = documents[0] if documents else None
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise ColamError(f"--package: '{path}' is not a compiled Kubeflow pipeline")
    return spec


def package_arguments(spec: dict, pairs: list[str], config_file: str | None = None) -> dict:
    """The run arguments `pairs` (NAME=VALUE) checked against the package, and the run config they make validated
    here, so a bad value fails now with one line instead of in a pod."""
    from colam.steps import step_config
    from pipelines.params import load_params

    try:
        declared = spec["root"]["inputDefinitions"]["parameters"]
        stages = spec["root"]["dag"]["tasks"]["prepare"]["inputs"]["parameters"]["stages"]["runtimeValue"]["constant"]
    except (KeyError, TypeError):
        raise ColamError("--package: not a pipeline written by `colam kfp compile` (no prepare task with its "
                         "stages)") from None
    missing = sorted(set(HEADLINE) - set(declared))
    if missing:
        raise ColamError(f"--package: not a pipeline written by `colam kfp compile` (no parameter {missing[0]})")
    arguments = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in declared:
            raise ColamError(f"--param: {pair!r} is not NAME=VALUE with NAME one of {', '.join(sorted(declared))}")
        arguments[name] = text if declared[name]["parameterType"] == "STRING" else yaml.safe_load(text)
    if config_file is not None:  # the headline parameters override `config`: both come from the file
        arguments = {**headline(load_params(config_file).config), **arguments}
    values = {name: arguments.get(name, declared[name].get("defaultValue")) for name in declared}
    if not str(values.get("mlflow_experiment", "x")).strip():
        raise ColamError("--param: mlflow_experiment must name an MLflow experiment, got ''")
    for name, value in values.items():  # the package's defaults store integers as floats
        if declared[name]["parameterType"] == "NUMBER_INTEGER" and isinstance(value, float) and value.is_integer():
            values[name] = int(value)
    step_config(values["config"], steps=int(stages), method=values["method"], model=values["model"],
                dataset=values["dataset"], epochs_per_step=values["epochs_per_stage"],
                temperature=values["temperature"], seed=values["seed"])
    return arguments


def headline(config) -> dict:
    """The pipeline parameters a run config gives: the config and its headline values; T is its method's, else the first
    registered method's with one (COLAM's): step_config gives it to whichever method a run trains, if that has a T."""
    from colam.methods import METHODS

    with_t = next(m for m in (METHODS[config.method.name], *METHODS.values()) if "temperature" in m.headline)
    return {"config": json.dumps(config.to_dict()), "method": config.method.name, "model": config.model.name,
            "dataset": config.data.name, "epochs_per_stage": config.method.colam.epochs_per_stage,
            "temperature": with_t.headline_values(config)["temperature"], "seed": config.seed}


def _submit(args) -> int:
    import logging
    import warnings

    import kfp

    spec = read_package(args.package)
    arguments = package_arguments(spec, args.params, args.config)
    token = os.environ.get("KFP_TOKEN")
    if not args.namespace:  # as kfp: a multi-user endpoint may refuse the health check, not the run
        _check_endpoint(args.host, token)
    # kfp prints links on stdout and warns about API versions: keep stdout for our JSON line.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        logging.getLogger("urllib3").setLevel(logging.ERROR)
        try:
            # Without --namespace, leave kfp the namespace of the user's kfp context (its default: kubeflow).
            client = kfp.Client(host=args.host, existing_token=token,
                                **({"namespace": args.namespace} if args.namespace else {}))
            result = client.create_run_from_pipeline_package(
                args.package, arguments=arguments, run_name=args.run_name, experiment_name=args.experiment,
                namespace=args.namespace, service_account=args.service_account, enable_caching=not args.no_cache)
        except Exception as exc:  # auth, an API error: one line naming the endpoint
            raise ColamError(f"--host: Kubeflow Pipelines at '{args.host}' did not accept the run "
                             f"({first_line(exc)[:300]})") from None
    print(json.dumps({"run_id": result.run_id, "run": f"{args.host.rstrip('/')}/#/runs/details/{result.run_id}",
                      "experiment": args.experiment, "arguments": arguments}))
    return 0


def _check_endpoint(host: str, token: str | None) -> None:
    """One quick health check: kfp.Client would retry a wrong host for 25 s, printing tracebacks."""
    import requests

    try:
        answer = requests.get(f"{host.rstrip('/')}/apis/v2beta1/healthz", timeout=10, allow_redirects=False,
                              headers={"Authorization": f"Bearer {token}"} if token else {})
    except requests.RequestException as exc:
        reason = type(exc).__name__ if isinstance(exc, requests.ConnectionError) else first_line(exc)[:300]
        raise ColamError(f"--host: cannot reach Kubeflow Pipelines at '{host}' ({reason})") from None
    if answer.is_redirect:
        raise ColamError(f"--host: '{host}' redirects the Kubeflow Pipelines health check to "
                         f"'{answer.headers.get('Location')}', a login page: set KFP_TOKEN, or port-forward the "
                         f"pipelines API")
    if answer.status_code != 200:
        raise ColamError(f"--host: '{host}' answered HTTP {answer.status_code} to the Kubeflow Pipelines health "
                         f"check (/apis/v2beta1/healthz); is it the pipelines API (and is KFP_TOKEN valid)?")


def _local(args) -> int:
    from google.protobuf import json_format
    from kfp import local

    if args.runner not in RUNNERS:
        raise ColamError(f"--runner: {args.runner!r} is not a runner; one of {', '.join(RUNNERS)}")
    if args.network is not None and args.runner != "docker":
        raise ColamError("--network: only with --runner docker (steps that are processes use this machine's network)")
    pipeline, stages = _pipeline_from(args)
    spec = json_format.MessageToDict(pipeline.pipeline_spec)  # what kfp would write to a package
    arguments = package_arguments(spec, args.pipeline_params)
    root = Path(args.root).resolve()
    with _docker_runner(spec, args, root) if args.runner == "docker" else contextlib.nullcontext() as docker:
        root.mkdir(parents=True, exist_ok=True)
        local.init(runner=docker or local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                   raise_on_error=False)
        began = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # kfp's log and the containers' output; stdout is our line
            task = pipeline(**arguments)
    seconds = time.perf_counter() - began
    print(json.dumps({"stages": stages, "runner": args.runner, "seconds": round(seconds, 1),
                      **_local_results(task, seconds)}))
    return 0


def _local_results(task, seconds: float) -> dict:
    """The run's output paths and evaluation metrics, once every output is really there: kfp's DockerRunner takes a
    container that is gone before it is waited for as a success."""
    if task is None or not getattr(task, "outputs", None):
        raise ColamError(f"kfp local: the pipeline run failed after {seconds:.1f}s; the failing step's log is above")
    missing = sorted(name for name, artifact in task.outputs.items()  # a Metrics output lives in its metadata
                     if artifact.schema_title != "system.Metrics" and not Path(artifact.path).exists())
    metrics = task.outputs["metrics"].metadata
    if missing or not metrics:
        raise ColamError(f"kfp local: the pipeline ended without its output {(missing or ['metrics'])[0]!r}; the "
                         f"step's log is above")
    return {"outputs": {name: artifact.path for name, artifact in task.outputs.items()}, "metrics": metrics}


@contextlib.contextmanager
def _docker_runner(spec: dict, args, root: Path):
    """kfp's DockerRunner once the engine holds every image the package names and `root` is the images' user's; steps
    get CONTAINER_ENV, and their containers still there after the run are removed."""
    import uuid

    import docker
    from kfp import local

    _check_reachable_endpoints(args.network)
    try:  # an engine at $DOCKER_HOST (or the default socket) that answers a ping
        client = docker.from_env(timeout=10)
        client.ping()
    except docker.errors.DockerException as exc:
        raise ColamError(f"--runner docker: no container engine answers at "
                         f"{os.environ.get('DOCKER_HOST') or 'unix:///var/run/docker.sock'} ({first_line(exc)[:200]}); "
                         f"start one, e.g. `bash .ci/container-engine.sh`") from None
    images = sorted({executor["container"]["image"] for executor in spec["deploymentSpec"]["executors"].values()})
    users = {_local_image(client, name, args.image).attrs["Config"].get("User") or "0" for name in images}
    if args.network is not None:
        try:
            client.networks.get(args.network)
        except docker.errors.NotFound:
            raise ColamError(f"--network: {args.network!r} is not a network of the local container engine") from None
    if len(users) != 1:
        raise ColamError(f"--image: the images run as different users ({', '.join(sorted(users))}); the steps share "
                         f"the pipeline root")
    root.mkdir(parents=True, exist_ok=True)
    _let_image_user_write(root, users.pop())
    environment = {key: os.environ[key] for key in CONTAINER_ENV if key in os.environ}
    label = uuid.uuid4().hex  # on every step container of this run
    try:
        yield local.DockerRunner(environment=environment, labels={"colam.kfp-local": label},
                                 **({"network": args.network} if args.network else {}))
    finally:
        # sparse: listed, not inspected, so a container kfp removes meanwhile is no error
        for container in client.containers.list(all=True, sparse=True, filters={"label": f"colam.kfp-local={label}"}):
            with contextlib.suppress(Exception):
                container.remove(force=True)


def _check_reachable_endpoints(network: str | None) -> None:
    """A file store or this machine's loopback is not what a step container sees (but on --network host)."""
    from urllib.parse import urlsplit

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri and not uri.startswith(("http://", "https://")):
        raise ColamError(f"MLFLOW_TRACKING_URI: {uri!r} is a store on this machine that step containers do not "
                         f"see; give an MLflow server (http://...) or unset it")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        host = urlsplit(os.environ.get(key, "")).hostname or ""
        if network != "host" and (host in ("localhost", "::1") or host.startswith("127.")):
            raise ColamError(f"{key}: {host} is the step container itself; give an address the containers reach "
                             f"(a name on --network) or use --network host")


def _local_image(client, name: str, base: str | None):
    """The image `name` as the engine holds it under that very tag (kfp's test before a pull); never pulled: a step
    must run what was built."""
    import docker

    reference = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
    with contextlib.suppress(docker.errors.ImageNotFound):
        image = client.images.get(reference)
        if reference in image.tags + image.attrs.get("RepoDigests", []):
            return image
    source = "--image" if base else ("COLAM_IMAGE" if os.environ.get("COLAM_IMAGE") else "--image (default)")
    raise ColamError(f"{source}: {name!r} is not an image of the local container engine; build it: docker build "
                     f"-f docker/{name.rsplit('-', 1)[-1]}.Dockerfile -t {name} .")


def _let_image_user_write(root: Path, user: str) -> None:
    """The steps write below the pipeline root as the images' user (uid 1000), as a pod does into a volume of its
    fsGroup: hand the root to that user, or, where this process may not, open it."""
    uid, _, gid = user.partition(":")
    if not uid.isdigit():
        raise ColamError(f"--image: the images run as user {user!r}, not a numeric uid; the pipeline root cannot be "
                         f"given to it")
    if int(uid) in (0, os.getuid()):
        return
    try:
        if os.getuid() == 0:
            os.chown(root, int(uid), int(gid) if gid.isdigit() else int(uid))
        else:
            root.chmod(0o1777)
    except OSError as exc:
        raise ColamError(f"--root: cannot let the images' user {uid} write {str(root)!r} ({exc.strerror})") from None
