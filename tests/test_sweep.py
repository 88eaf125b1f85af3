"""`colam sweep` (issue 19): the pipeline's short runs side by side in worker processes, each run the
very run its own `colam` command trains alone, and `train.threads`, the run's thread count, which
makes that so on CPU: torch's sums are split by thread, so the count changes the numbers."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from colam.config import load_config
from colam.errors import ColamError
from colam.run_folder import run_identity
from pipelines.params import load_params
from pipelines.sweep import jobs_flag, plan_runs, workers

ROOT = Path(__file__).resolve().parents[1]
# Two seeds of hl and of COLAM at T = 2, 2 epochs each; one thread a run
PARAMS = {
    "seed": 0, "data": {"name": "digits", "train_subset": 200, "val_fraction": 0.2},
    "model": {"name": "small_cnn", "options": {"width": 8}},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "threads": 1},
    "method": {"name": "colam", "colam": {"stages": 2, "epochs_per_stage": 1}},
    "compare": {"baselines": ["hl"], "temperatures": [2.0], "seeds": [0, 1]},
    "analysis": {"grid": {"epochs_per_stage": [1, 2], "peers": [1, "all"]}},
    "tracking": {"experiment": "sweep-test"},
}
RUNS = ["hl-seed0", "hl-seed1", "colam-T2.0-seed0", "colam-T2.0-seed1"]


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    return path


def colam(tmp_path: Path, *argv: str, threads: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_plans_are_the_runs_the_pipeline_compares(params_file, tmp_path):
    args = argparse.Namespace(plan="compare", params=str(params_file), split="data/prepared", out=tmp_path / "c",
                              run=None)
    planned = dict(plan_runs(args, load_params(params_file)))
    assert list(planned) == RUNS
    assert planned["colam-T2.0-seed1"] == [
        "train", "--config", str(params_file), "--split", "data/prepared", "--no-progress", "--restart-if-changed",
        "--out", str(tmp_path / "c" / "colam-T2.0-seed1"), "--track", "--set", "method.name=colam",
        "--set", "method.colam.temperature=2.0", "--set", "seed=1"]
    args.plan, args.out = "grid", tmp_path / "g"
    cells = dict(plan_runs(args, load_params(params_file)))
    assert list(cells) == ["t1-peers1", "t1-peersall", "t2-peers1", "t2-peersall"]
    assert cells["t2-peersall"][:2] == ["analyze", "grid-cell"]
    assert cells["t2-peersall"][-7:] == ["--epochs-per-stage", "2", "--peers", "all", "--out",
                                         str(tmp_path / "g" / "t2-peersall"), "--track"]


def test_jobs_share_the_cores_at_the_runs_thread_count():
    cores = len(os.sched_getaffinity(0))
    assert workers(None, 1, 100) == cores and workers(None, 1, 1) == 1
    assert workers(None, cores, 100) == 1 and workers(None, "auto", 100) == 1  # auto threads: every core a run
    assert workers(jobs_flag("3"), 1, 100) == 3 and workers(jobs_flag("3"), 1, 2) == 2
    assert jobs_flag("auto") is None
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ColamError, match="--jobs: must be auto or a whole number >= 1"):
            jobs_flag(bad)


def test_the_thread_count_is_part_of_the_run_and_auto_keeps_earlier_runs():
    auto, one = load_config(None, ["train.threads=auto"]), load_config(None, ["train.threads=1"])
    assert run_identity(auto.to_dict()) == run_identity(load_config(None).to_dict())
    assert "threads" not in run_identity(auto.to_dict())["train"]  # runs from before the key are the same runs
    assert run_identity(one.to_dict()) != run_identity(auto.to_dict())


def test_a_pinned_thread_count_gives_the_same_weights_whatever_the_environment_says(params_file, tmp_path):
    # OMP_NUM_THREADS=1 and =2 gave other weights before train.threads (issue 19); pinned, they agree
    for threads in (1, 2):
        result = colam(tmp_path, "train", "--config", str(params_file), "--out", f"omp{threads}", "--no-track",
                       "--no-progress", "--set", "method.name=hl", threads=threads)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "omp1/stage_1/model.pt").read_bytes() == (tmp_path / "omp2/stage_1/model.pt").read_bytes()


def test_runs_trained_side_by_side_are_the_runs_trained_alone(params_file, tmp_path):
    result = colam(tmp_path, "sweep", "compare", "--params", str(params_file), "--out", "runs", "--jobs", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(RUNS)
    assert "sweep compare: 4 run(s) into runs, 2 at a time" in result.stderr
    for name in RUNS:  # every log line of a run says which run it is
        assert f"[{name}] MLflow: run " in result.stderr
    alone = colam(tmp_path, "train", "--config", str(params_file), "--out", "alone", "--no-track", "--no-progress",
                  "--set", "method.name=colam", "--set", "method.colam.temperature=2.0", "--set", "seed=1", threads=2)
    assert alone.returncode == 0, alone.stderr
    for name in ("stage_1/model.pt", "stage_2/model.pt", "stage_2/soft_labels.npy"):
        assert (tmp_path / "alone" / name).read_bytes() == (tmp_path / "runs/colam-T2.0-seed1" / name).read_bytes()

    again = colam(tmp_path, "sweep", "compare", "--params", str(params_file), "--out", "runs", "--jobs", "2")
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already holds a completed run; nothing to do") == len(RUNS)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_run_that_fails_stops_the_sweep_with_its_own_error(params_file, tmp_path, jobs):
    mine = tmp_path / "runs" / "hl-seed1" / "notes.txt"  # the user's file where a run would go
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    result = colam(tmp_path, "sweep", "compare", "--params", str(params_file), "--out", "runs", "--jobs", jobs)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("colam: error: --out: ") and "hl-seed1" in errors[0], errors
    assert mine.read_text() == "mine" and sorted(p.name for p in mine.parent.iterdir()) == ["notes.txt"]
    # no run after the failed one has started: with two workers, the one beside it finished (hl-seed0 trains for
    # seconds, hl-seed1 is refused at once), and the next in line was not handed out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["hl-seed0", "hl-seed1"]
    assert (tmp_path / "runs/hl-seed0/metrics.json").is_file()


def test_the_expected_plan_trains_each_stages_soft_labels(params_file, tmp_path):
    main = colam(tmp_path, "train", "--config", str(params_file), "--out", "main", "--no-track", "--no-progress")
    assert main.returncode == 0, main.stderr
    result = colam(tmp_path, "sweep", "expected", "--params", str(params_file), "--run", "main", "--out", "expected")
    assert result.returncode == 0, result.stderr
    for stage in (1, 2):
        config = yaml.safe_load((tmp_path / "expected" / f"stage_{stage}" / "config.yaml").read_text())
        assert config["method"]["name"] == "fixed" and config["method"]["fixed"]["labels"].endswith(
            f"stage_{stage}/soft_labels.npy")
