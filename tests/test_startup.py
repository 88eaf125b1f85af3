"""A command imports only what it uses (issue 19): MLflow only when it tracks, kfp only to compile or submit,
torchvision only for its data sets and models, scikit-learn only where the digits' arrays were not saved.
Each case runs in a fresh process; what it imported is read from sys.modules after the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torchvision", "sklearn", "mlflow", "kfp", "matplotlib")
PROBE = ("import json, sys\n"
         "from pipelines.cli import main\n"
         "status = main(sys.argv[1:])\n"
         "print(json.dumps([status, sorted({m.split('.')[0] for m in sys.modules} & set(%r))]))" % (HEAVY,))


def imported(*argv: str, uri: str = "", cwd: Path = ROOT) -> tuple[int, set[str]]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=cwd, capture_output=True, text=True,
                            timeout=300, env=env)
    status, modules = json.loads(result.stdout.strip().splitlines()[-1])
    return status, set(modules)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("startup") / "digits"
    assert imported("data", "get", "--from", "bundled", "--out", str(root))[0] == 0
    return root


def settings(root: Path) -> list[str]:
    return [a for item in [*TINY, f"data.root={root}"] for a in ("--set", item)]


def test_an_untracked_training_run_imports_neither_mlflow_nor_torchvision_nor_scikit_learn(digits_root, tmp_path):
    assert imported("train", "--out", str(tmp_path / "run"), "--no-track", *settings(digits_root)) == (0, set())


def test_the_checks_and_the_listings_import_no_library_they_do_not_use():
    assert imported("check", "--config", str(ROOT / "params.yaml")) == (0, set())
    assert imported("methods") == (0, set())


def test_a_tracked_run_imports_mlflow_and_a_compile_kfp(digits_root, tmp_path):
    """The probe sees what a command imports: the libraries that are used do show up."""
    status, modules = imported("train", "--out", str(tmp_path / "run"), "--track", *settings(digits_root),
                               uri=f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)  # its ./mlruns there
    assert status == 0 and "mlflow" in modules and "torchvision" not in modules
    status, modules = imported("kfp", "compile", "--params", str(ROOT / "params.yaml"), "--stages", "2",
                               "--out", str(tmp_path / "pipeline.yaml"))
    assert status == 0 and "kfp" in modules
