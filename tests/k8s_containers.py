"""The containers of the k8s/ manifests, read as they are (tests/test_containers.py runs them)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RELEASE = "ghcr.io/colam-project/colam:0.1.0"
# The containers of the project's image that tests/test_containers.py executes in the built image.
EXECUTED = {("k8s/base/mlflow.yaml", "mlflow"), ("k8s/training/pytorchjob-stage.yaml", "prepare-split"),
            ("k8s/training/pytorchjob-stage.yaml", "pytorch")}


def manifest_containers(manifest: str):
    """(pod spec, container) of every container and init container in a k8s/ manifest."""
    def pods(node):
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                yield node
            for value in node.values():
                yield from pods(value)
        elif isinstance(node, list):
            for value in node:
                yield from pods(value)

    for document in yaml.safe_load_all((ROOT / manifest).read_text()):
        for pod in pods(document):
            for container in pod["containers"] + pod.get("initContainers", []):
                yield pod, container
