"""The DVC pipeline end to end, on a copy of the repository's dvc.yaml with a few-second params.yaml.

One `dvc repro` per module (about a minute on 2 cores); the tests then check the outputs, the
no-op re-run, that each stage re-runs only for its own params, the gate on invalid params, the
offline plots, and the S3 round trip against a real S3 server on loopback.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The bundled default shrunk to seconds: 4 COLAM stages of 1 epoch, 4 comparison runs, a 2 x 2 grid.
TINY_PARAMS = {
    "data": {"train_subset": 200},
    "model": {"name": "small_cnn", "options": {"width": 8}},
    "train": {"epochs": 4, "batch_size": 32, "lr": 0.05},
    "method": {"colam": {"stages": 4, "epochs_per_stage": 1, "temperature": 1.0}},
    "compare": {"baselines": ["hl", "ls"], "temperatures": [1.0, 2.0], "seeds": [0]},
    "analysis": {"samples_per_class": 20, "grid": {"epochs_per_stage": [1, 2], "peers": [1, "all"]}},
    "tracking": {"experiment": "pipeline-test"},
}
ANALYSES = ("curves", "expected_accuracy", "geometry", "soft_labels", "grid")
COMPARE_RUNS = {"hl-seed0", "ls-seed0", "colam-T1.0-seed0", "colam-T2.0-seed0"}


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "options":
            _merge(base[key], value)
        else:
            base[key] = value
    return base


class Repo:
    def __init__(self, path: Path, env: dict):
        self.path, self.env = path, env

    def run(self, *args: str, env: dict | None = None, check: bool = True, timeout: int = 600):
        result = subprocess.run(args, cwd=self.path, env={**self.env, **(env or {})}, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def dvc(self, *args: str, **kwargs):
        return self.run(str(BIN / "dvc"), *args, **kwargs)

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def write_params(self, params: dict) -> None:
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def hashes(self, *folders: str, outputs_only: bool = False) -> dict[str, str]:
        """sha256 of every file under `folders`; `outputs_only` leaves out colam's bookkeeping that
        .dvcignore keeps out of DVC's outputs (.partial.pt, temporaries)."""
        found = {}
        for folder in folders:
            for path in sorted((self.path / folder).rglob("*")):
                if path.is_file() and not (outputs_only and _bookkeeping(path)):
                    found[str(path.relative_to(self.path))] = hashlib.sha256(path.read_bytes()).hexdigest()
        return found


def _bookkeeping(path: Path) -> bool:
    return path.name == ".partial.pt" or fnmatch.fnmatch(path.name, ".*.tmp")


def _ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def scratch_repo(path: Path, params: dict) -> Repo:
    """A git repository at `path` holding this project's dvc.yaml and code, with params.yaml's values
    replaced by `params` where it names them; nothing is run yet."""
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    (path / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(ROOT / ".dvc" / name, path / ".dvc" / name)
    for package in ("colam", "pipelines"):  # the stages' code dependencies
        shutil.copytree(ROOT / package, path / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", MLFLOW_TRACKING_URI=f"sqlite:///{path}/mlflow.db",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@localhost", GIT_COMMITTER_NAME="test",
               GIT_COMMITTER_EMAIL="test@localhost")
    repo = Repo(path, env)
    repo.write_params(_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), params))
    repo.run(sys.executable, "-m", "pipelines.plots", ".dvc/plots/offline.html")
    repo.run("git", "init", "-q")
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "pipeline under test")
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    repo = scratch_repo(tmp_path_factory.mktemp("pipeline"), TINY_PARAMS)
    repo.first = repo.dvc("repro")
    return repo


def test_repro_writes_every_stage_and_the_comparison(repo):
    ran = _ran(repo.first.stdout)
    assert ran[:3] == ["check", "data", "prepare"]
    assert [s for s in ran if s.startswith("train@")] == [f"train@stage_{k}" for k in range(1, 5)]
    assert set(ran) >= {"evaluate", "compare_runs", "compare", "grid_cells", "expected_runs"} | {
        f"analyze_{name}" for name in ANALYSES}
    assert ran.index("analyze_grid") > max(ran.index("grid_cells"), ran.index("compare_runs"))
    assert ran.index("analyze_expected_accuracy") > ran.index("expected_runs") > ran.index("train@stage_4")
    # colam sweep trained every run of each plan, each into its own folder
    assert {p.name for p in (repo.path / "runs/compare").iterdir()} == COMPARE_RUNS
    assert {p.name for p in (repo.path / "runs/grid").iterdir()} == {f"t{t}-peers{p}" for t in (1, 2) for p in (1, "all")}
    assert {p.name for p in (repo.path / "runs/expected").iterdir()} == {f"stage_{k}" for k in range(1, 5)}
    for k in range(1, 5):
        stage = repo.path / "runs/main" / f"stage_{k}"
        assert {"model.pt", "state.pt", "soft_labels.npy", "metrics.json", "history.csv"} <= {
            p.name for p in stage.iterdir()}
    table = (repo.path / "runs/summary/table.md").read_text()
    assert "| hl |" in table and "| ls(" in table and table.count("| colam(") == 2
    assert (repo.path / "runs/summary/accuracy_vs_temperature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repro_writes_every_analysis_and_logs_it_to_the_main_run(repo):
    from mlflow import MlflowClient

    for name in ANALYSES:
        folder = repo.path / "runs/analysis" / name
        assert (folder / "table.md").read_text().startswith(("Accuracy", "Expected", "Classes", "Each", "COLAM"))
        figures = sorted(folder.glob("*.png"))
        assert figures and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figures)
    expected = json.loads((repo.path / "runs/analysis/expected_accuracy/results.json").read_text())
    assert [row["stage"] for row in expected["stages"]] == [1, 2, 3, 4]
    for row in expected["stages"]:  # each figure's number is the test accuracy of a fixed-label run
        run = json.loads((repo.path / "runs/expected" / f"stage_{row['stage']}" / "metrics.json").read_text())
        assert run["method"] == "fixed" and run["test_acc"] == row["expected_test_acc"]
    grid = json.loads((repo.path / "runs/analysis/grid/results.json").read_text())
    assert grid["epochs_per_stage"] == [1, 2] and grid["peers"] == [1, "all"]
    assert all(value is not None for row in grid["test_acc"] for value in row)
    client = MlflowClient(f"sqlite:///{repo.path}/mlflow.db")
    experiment = client.get_experiment_by_name("pipeline-test").experiment_id
    # every cell was trained by the grid_cells stage's sweep and tracked; the (t = 1, all peers) cell is
    # the main run's own setting and gives its numbers
    for i, t in enumerate([1, 2]):
        for j, peers in enumerate([1, "all"]):
            (cell,) = client.search_runs([experiment], f"tags.`colam.out_dir` = 'runs/grid/t{t}-peers{peers}'")
            assert cell.data.metrics["test_acc"] == grid["test_acc"][i][j]
    main = json.loads((repo.path / "runs/main/eval/metrics.json").read_text())
    assert grid["test_acc"][0][1] == main["test_acc"]

    (parent,) = client.search_runs([experiment], "tags.`colam.out_dir` = 'runs/main' and tags.`colam.role` = 'parent'")
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "analysis")}
    assert logged == set(ANALYSES)
    for name in ANALYSES:
        files = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, f"analysis/{name}")}
        assert files == {p.name for p in (repo.path / "runs/analysis" / name).iterdir() if p.name != ".colam-files"}
    # the compare stage logged its files to a comparison run and made the best run's model the champion
    (comparison,) = client.search_runs([experiment], "tags.`colam.role` = 'comparison'")
    assert "table.md" in {a.path for a in client.list_artifacts(comparison.info.run_id)}
    champion = client.get_model_version_by_alias(repo.params()["tracking"]["register"], "champion")
    assert client.get_run(champion.run_id).data.tags["colam.out_dir"].startswith(("runs/compare/", "runs/main"))
    history = client.get_metric_history(parent.info.run_id, "expected_test_acc")
    assert sorted((m.step, m.value) for m in history) == [(r["stage"], r["expected_test_acc"]) for r in expected["stages"]]


def test_the_stage_chain_gives_the_numbers_of_one_colam_train_run(repo):
    # runs/main trains stage by stage in 4 processes; the comparison's T=1, seed 0 run is one
    # `colam train` process with the same config and seed.
    chained = json.loads((repo.path / "runs/main/eval/metrics.json").read_text())
    whole = json.loads((repo.path / "runs/compare/colam-T1.0-seed0/metrics.json").read_text())
    assert chained["test_acc"] == whole["test_acc"] and chained["val_acc"] == whole["val_acc"]
    assert (repo.path / "runs/main/stage_4/soft_labels.npy").read_bytes() == (
        repo.path / "runs/compare/colam-T1.0-seed0/stage_4/soft_labels.npy").read_bytes()


def test_a_second_repro_runs_nothing(repo):
    again = repo.dvc("repro")
    assert _ran(again.stdout) == []
    assert "Data and pipelines are up to date." in again.stdout
    assert repo.dvc("status").stdout.strip() == "Data and pipelines are up to date."


def test_a_param_re_runs_only_the_stages_that_read_it(repo):
    original = repo.params()
    try:
        changed = _merge(yaml.safe_load(yaml.safe_dump(original)), {"method": {"colam": {"temperature": 2.0}}})
        repo.write_params(changed)
        stale = set(json.loads(repo.dvc("status", "--json").stdout))
        # the gate reads every key; the grid cells train at the run's T; the analyses re-run once runs/main has
        # changed; the comparison's sweep reads the whole method section (its runs set T themselves: below)
        assert stale == {"check", "grid_cells", "compare_runs"} | {f"train@stage_{k}" for k in range(1, 5)}

        changed = _merge(yaml.safe_load(yaml.safe_dump(original)), {"method": {"cp": {"beta": 0.3}}})
        repo.write_params(changed)  # no run trains cp here: the comparison's sweep finds every run done
        compared = repo.hashes("runs/compare")
        again = repo.dvc("repro")
        assert _ran(again.stdout) == ["check", "compare_runs"]
        assert again.stderr.count("already holds a completed run; nothing to do") == len(COMPARE_RUNS)
        assert repo.hashes("runs/compare") == compared
    finally:
        repo.write_params(original)
        repo.dvc("repro")
    assert _ran(repo.dvc("repro").stdout) == []


def test_an_invalid_param_stops_repro_before_any_stage_that_writes(repo):
    original = repo.params()
    before = repo.hashes("runs/main", "data/prepared")
    try:
        repo.write_params(_merge(yaml.safe_load(yaml.safe_dump(original)), {"method": {"colam": {"temperature": -1}}}))
        result = repo.dvc("repro", check=False)
        assert result.returncode != 0
        assert "colam: error: method.colam.temperature: must be > 0, got -1.0" in result.stdout + result.stderr
        assert _ran(result.stdout) == ["check"]
        assert repo.hashes("runs/main", "data/prepared") == before
    finally:
        repo.write_params(original)
        repo.dvc("repro")


def test_metrics_and_offline_plots(repo, tmp_path):
    metrics = json.loads(repo.dvc("metrics", "show", "--json").stdout)
    files = next(iter(metrics.values()))["data"]
    evaluated = files["runs/main/eval/metrics.json"]["data"]
    assert 0 <= evaluated["test_acc"] <= 1 and "test_ece" in evaluated and "test_nll" in evaluated
    assert set(files["runs/summary/metrics.json"]["data"]) == {"hl", "ls", "colam T=1", "colam T=2"}
    repo.dvc("plots", "show", "--out", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "window.vegaEmbed=" in page  # the libraries are inlined...
    assert "<script src=" not in page and "cdn.jsdelivr" not in page  # ...and nothing is fetched
    assert page.count("vegaEmbed('#") >= 3  # accuracy, loss and confusion plots
    assert any(p.suffix == ".png" for p in (tmp_path / "plots" / "static").iterdir())


def test_dvc_push_then_pull_into_an_empty_cache_restores_identical_files(repo, s3_server):
    repo.dvc("remote", "modify", "--local", "storage", "url", f"s3://{s3_server.bucket}/dvc-{uuid.uuid4().hex[:8]}")
    tracked = ("data/prepared", "runs/main", "runs/compare")
    before = repo.hashes(*tracked, outputs_only=True)  # what DVC versions: .dvcignore'd bookkeeping is not pushed
    pushed = repo.dvc("push", env=s3_server.env())
    assert "pushed" in pushed.stdout
    shutil.rmtree(repo.path / ".dvc" / "cache")
    for folder in tracked:
        shutil.rmtree(repo.path / folder)
    # runs/main/eval is not cached (metrics and plots live in git): recreate it by evaluating again
    repo.dvc("pull", env=s3_server.env())
    assert {k: v for k, v in repo.hashes(*tracked, outputs_only=True).items() if "/eval/" not in k} == {
        k: v for k, v in before.items() if "/eval/" not in k}
    assert _ran(repo.dvc("repro").stdout) == ["evaluate"]


def test_dvc_push_with_wrong_keys_fails_with_dvcs_error_and_keeps_every_file(repo, s3_server):
    repo.dvc("remote", "modify", "--local", "storage", "url", f"s3://{s3_server.bucket}/dvc-{uuid.uuid4().hex[:8]}")
    before = repo.hashes("data/prepared", "runs/main", "runs/compare", ".dvc/cache")
    wrong = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    result = repo.dvc("push", env=wrong, check=False)
    assert result.returncode != 0
    assert "ERROR" in result.stderr + result.stdout
    assert "SignatureDoesNotMatch" in result.stderr + result.stdout or "Forbidden" in result.stderr + result.stdout
    assert repo.hashes("data/prepared", "runs/main", "runs/compare", ".dvc/cache") == before


def test_params_yaml_runs_the_bundled_default_config():
    from colam.config import load_config
    from colam.run_folder import run_identity
    from pipelines.params import load_params

    params = load_params(ROOT / "params.yaml").config
    assert params.data.root == "data/raw/digits"  # the data stage's copy of scikit-learn's arrays
    assert run_identity(params.to_dict()) == run_identity(load_config(ROOT / "configs/digits.yaml").to_dict())
