"""Data-parallel training under torchrun: 2 CPU processes with gloo, as on a GPU node with NCCL.

Every test starts a real torchrun job on 127.0.0.1 (gloo over the loopback interface) and waits
for it to end. The soft labels of a 2-process run must equal the single-process estimate from
the same model, and every rank must hold the identical matrix."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from colam.config import load_config
from colam.engine import prepare, stream_outputs
from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent
SETTINGS = TINY + ["train.epochs=6", "method.colam.epochs_per_stage=3", "data.train_subset=230"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MLFLOW_TRACKING_URI": "",
           **(env or {})}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)


def train(out: Path, *extra: str, module: str = "pipelines.cli", env: dict | None = None,
          cwd: Path = REPO) -> subprocess.CompletedProcess:
    settings = [item for s in SETTINGS + list(extra) for item in ("--set", s)]
    return torchrun("-m", module, "train", *settings, "--out", str(out), "--no-progress", env=env, cwd=cwd)


def single_process_labels(out: Path, stage: int, extra: list[str]) -> dict:
    """What one process estimates from the model the distributed run saved at the end of `stage`."""
    p = prepare(load_config(None, SETTINGS + extra))
    p.model.load_state_dict(torch.load(out / f"stage_{stage}" / "model.pt", weights_only=True))
    stream_outputs(p)
    return {name: tensor.numpy() for name, tensor in p.method.end_stage(stage).items()}


@pytest.mark.parametrize("case", ["sums", "differ", "model", "steps"])
def test_reductions_across_two_processes(tmp_path, case):
    result = torchrun(str(REPO / "tests" / "distributed_cases.py"), case, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank_{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world"] for r in ranks] == [(0, 2), (1, 2)]
    if case == "sums":
        g = torch.Generator().manual_seed(0)
        outputs, targets = torch.randn(57, 5, generator=g), torch.randint(0, 5, (57,), generator=g)
        from colam.soft_labels import class_soft_labels

        for r in ranks:  # every rank holds the whole, not its share
            assert torch.allclose(r["labels"], class_soft_labels(outputs, targets, 5, 2.0), atol=1e-7)
            assert torch.equal(r["outputs"], outputs)
            assert torch.equal(r["counts"], torch.bincount(targets, minlength=5).double())
        assert torch.equal(ranks[0]["labels"], ranks[1]["labels"])
    elif case == "steps":
        for r in ranks:  # 160 training samples: the saved sums are both ranks' shares, not rank 0's alone
            assert r["counts"] == r["seen"] == 160
            assert r["artifacts"] == ["sample_soft_labels", "soft_labels"]
        assert json.loads((tmp_path / "estimate_1" / "estimation.json").read_text())["artifacts"] == \
            ["sample_soft_labels", "soft_labels"]
    else:
        what = "soft_labels" if case == "differ" else "model"
        for r in ranks:  # every rank refuses, not only the one that differs
            assert r["error"] == f"distributed training: stage 1 {what} differ between ranks (1 of 2 differ from rank 0)"


@pytest.mark.parametrize("extra", [[], ["method.colam.peers=3"], ["train.data_on_device=true"]])
def test_two_process_soft_labels_equal_the_single_process_ones(tmp_path, extra):
    result = train(tmp_path, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # rank 0 alone reports
    metrics = json.loads(printed[0])
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["test_acc"] <= 1 and "val_acc" in metrics
    for stage in (1, 2):
        expected = single_process_labels(tmp_path, stage, extra)
        assert sorted(expected) == sorted(f.stem for f in (tmp_path / f"stage_{stage}").glob("*.npy"))
        for name, labels in expected.items():
            np.testing.assert_allclose(np.load(tmp_path / f"stage_{stage}" / f"{name}.npy"), labels, atol=1e-6,
                                       err_msg=f"stage {stage} {name}")
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 6 and "test_acc" in history[0]  # one row per epoch, written once


def test_a_two_process_run_trained_stage_by_stage_gives_the_whole_runs_numbers(tmp_path):
    """Each rank reads the stage folder rank 0 wrote (a PyTorchJob per stage), online estimation."""
    extra = ["method.colam.estimation=online"]
    whole = train(tmp_path / "whole", *extra)
    assert whole.returncode == 0, whole.stderr[-3000:]
    for stage in ("1", "2"):
        result = torchrun("-m", "pipelines.cli", "train", *[i for s in SETTINGS + extra for i in ("--set", s)],
                          "--out", str(tmp_path / "staged"), "--stage", stage, "--no-progress")
        assert result.returncode == 0, result.stderr[-3000:]
    a = json.loads((tmp_path / "whole" / "stage_2" / "metrics.json").read_text())
    b = json.loads((tmp_path / "staged" / "stage_2" / "metrics.json").read_text())
    assert (a["test_acc"], a["train_loss"]) == (b["test_acc"], b["train_loss"])
    assert np.array_equal(np.load(tmp_path / "whole" / "stage_2" / "soft_labels.npy"),
                          np.load(tmp_path / "staged" / "stage_2" / "soft_labels.npy"))
    # it learns: stage 1's cross-entropy (the mean over both ranks' samples) falls from epoch 1 to 3
    history = [line.split(",") for line in (tmp_path / "whole" / "history.csv").read_text().splitlines()]
    column = history[0].index("train_loss")
    assert float(history[3][column]) < float(history[1][column]) - 0.05


def test_tracking_under_torchrun_logs_one_run_from_rank_0(tmp_path):
    from pipelines.tracking import connect

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # run in tmp_path: the experiment it creates keeps its artifacts in ./mlruns
    result = train(tmp_path / "run", module="pipelines.cli", env={"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = connect(uri)
    experiment = client.get_experiment_by_name("colam")
    parents = client.search_runs([experiment.experiment_id], "tags.`colam.role` = 'parent'")
    assert len(parents) == 1
    assert parents[0].data.params["world_size"] == "2" and parents[0].info.status == "FINISHED"
    assert len(client.get_metric_history(parents[0].info.run_id, "test_acc")) == 6  # each epoch once


@pytest.mark.parametrize("extra, message", [
    ("method.name=cskd", "method.name: cskd cannot train under torchrun (WORLD_SIZE=2); run it as one process"),
    ("train.batch_size=33", "train.batch_size: the global batch of 33 does not split evenly over 2 processes; "
                            "use a multiple of 2"),
])
def test_what_cannot_run_data_parallel_is_refused_in_one_line(tmp_path, extra, message):
    result = train(tmp_path, extra)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("colam: error:")]
    assert errors and set(errors) == {f"colam: error: {message}"}
    # no frame of ours: the only traceback is torchrun's report that a child exited with status 2
    assert not [line for line in result.stderr.splitlines() if line.strip().startswith("File") and
                ("/colam/" in line or "/pipelines/" in line)]
    assert "exitcode  : 2" in result.stderr
    assert not (tmp_path / "config.yaml").exists()
