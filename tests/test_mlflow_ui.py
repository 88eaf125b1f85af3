"""The MLflow UI in a real browser (issue 20): a real `mlflow server` on loopback holding a short real
comparison (hl and COLAM at two temperatures, tracked by `colam sweep compare`, then `colam compare
--track --register`), opened by headless Chromium. The experiment must open on its runs (not MLflow 3's
GenAI overview) with the method, T and data set shown, and the registered model on the models page
with its champion. Screenshots are kept in test-artifacts/mlflow-ui/. Skipped where no Chromium is
installed (CI installs Debian's `chromium`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest
import yaml

from tests.servers import mlflow_server

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
SHOTS = ROOT / "test-artifacts" / "mlflow-ui"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
PARAMS = {
    "seed": 0, "data": {"name": "digits", "train_subset": 200, "val_fraction": 0.2},
    "model": {"name": "small_cnn", "options": {"width": 8}},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "threads": 1},
    "method": {"name": "colam", "colam": {"stages": 2, "epochs_per_stage": 1}},
    "compare": {"baselines": ["hl"], "temperatures": [1.0, 2.0], "seeds": [0]},
    "tracking": {"experiment": "colam-ui", "register": "colam-ui-model"},
}


def colam(cwd: Path, uri: str, *argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-ui")
    (tmp / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    with mlflow_server(tmp / "server", str(tmp / "artifacts"), {}) as running:
        running.said = colam(tmp, running.uri, "sweep", "compare", "--params", "params.yaml", "--out", "runs")
        colam(tmp, running.uri, "compare", "--params", "params.yaml", "--out", "summary", "--track")
        yield running


def browse(url: str, name: str) -> str:
    """The page's text once its scripts ran (headless Chromium), and its screenshot in SHOTS/NAME.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
             "--virtual-time-budget=20000", "--hide-scrollbars"]
    subprocess.run([*flags, f"--screenshot={SHOTS / f'{name}.png'}", url], capture_output=True, timeout=120)
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert (SHOTS / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)))


def test_the_experiment_opens_on_its_runs_with_method_t_and_data_set(server):
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("colam-ui").experiment_id
    # MLflow 3.17's UI opens on its GenAI pages unless the link says model training (the experiment's kind
    # tag alone does not choose); colam prints its run links so
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    text = browse(f"{server.uri}/#/experiments/{experiment}?workflowType=machine_learning", "experiment")
    assert "Training runs" not in text and "Token Usage" not in text  # not the GenAI overview
    for name in ("hl-seed0", "colam-T1.0-seed0", "colam-T2.0-seed0"):
        assert name in text, f"run {name} not in the runs view: {text[:2000]}"
    assert "Dataset" in text and "digits" in text and "Models" in text  # the split and the logged models
    assert "Show more columns" in text  # the parameters (method, T, m, t, peers, ...): a choice in the browser
    (run,) = client.search_runs([experiment], "tags.`colam.out_dir` = 'runs/colam-T2.0-seed0'")
    page = browse(f"{server.uri}/#/experiments/{experiment}/runs/{run.info.run_id}?workflowType=machine_learning",
                  "run")
    for shown in ("method", "colam", "T", "2.0", "digits", "test_acc"):
        assert shown in page, f"{shown!r} not on the run page: {page[:2000]}"
    # the link colam prints for the run is the page just checked
    link = f"{server.uri}/#/experiments/{experiment}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert f"[colam-T2.0-seed0] MLflow: run {run.info.run_id} in experiment 'colam-ui' at {link}" in server.said


def test_the_registered_model_and_its_champion_are_on_the_models_page(server):
    text = browse(f"{server.uri}/#/models/colam-ui-model", "model")
    assert "colam-ui-model" in text and "Version 1" in text and "champion" in text, text[:2000]
