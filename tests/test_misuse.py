"""Misuse that needs real processes or a real file system (issue 18): two writers on one --out, and a
disk that fills up during training. The one-process cases are the table of tests/test_bad_input.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
# long enough (about 0.1 s an epoch) for a second process to meet the first one still training
LONG = ["data.name=digits", "data.train_subset=200", "model.name=small_cnn", "model.options={width: 8}",
        "train.epochs=300", "train.batch_size=32", "method.name=hl", "seed=5"]


def colam(*argv: str, settings: list[str], wait: bool = True):
    command = [sys.executable, "-m", "pipelines.cli", *argv, "--no-progress",
               *(a for item in settings for a in ("--set", item))]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def started(out: Path, process: subprocess.Popen) -> None:
    """Wait until `process` has written its first checkpoint into `out`."""
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the first process wrote no checkpoint in 120 s"
        time.sleep(0.2)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("colam: error: "), (
        result.returncode, result.stderr[-2000:])
    return lines[0]


@pytest.mark.parametrize("extra", [[], ["--restart-if-changed"]], ids=["same-run", "restart-if-changed"])
def test_a_second_writer_is_refused_with_the_holders_pid_and_the_first_run_is_kept(tmp_path, extra):
    out = tmp_path / "run"
    first = colam("train", "--out", str(out), settings=LONG, wait=False)
    try:
        started(out, first)
        # the same run, or (restart-if-changed) another seed that would delete the folder
        second = colam("train", "--out", str(out), *extra, settings=LONG + (["seed=6"] if extra else []))
        line = one_error_line(second)
        assert f"(pid {first.pid})" in line and "being written by another colam process" in line, line
        assert first.poll() is None, "the first process stopped"
        assert "seed: 5" in (out / "config.yaml").read_text()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the kernel dropped the lock with the killed holder: the run goes on where it stopped
    resumed = colam("train", "--out", str(out), settings=LONG)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing" in resumed.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only); skipped with one line where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode().strip()[:120]}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_one_line_naming_the_file_and_the_run_resumes_exactly_once_there_is_room(small_disk,
                                                                                              tmp_path):
    reference = colam("train", "--out", str(tmp_path / "reference"), settings=TINY)
    assert reference.returncode == 0, reference.stderr[-2000:]
    filler = small_disk / "filler"
    out = small_disk / "run"
    # leave room for the config and a checkpoint or two, not for the whole run
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 60_000))

    full = colam("train", "--out", str(out), settings=TINY)

    line = one_error_line(full)
    assert "No space left on device" in line and str(out) in line, line
    filler.unlink()
    again = colam("train", "--out", str(out), settings=TINY)
    assert again.returncode == 0, again.stderr[-2000:]
    numbers = ("train_loss", "train_acc", "test_acc")
    got, expected = (json.loads((folder / "metrics.json").read_text()) for folder in (out, tmp_path / "reference"))
    assert {k: got[k] for k in numbers} == {k: expected[k] for k in numbers}


@pytest.fixture
def read_only_store(tmp_path):
    """A sqlite MLflow store with one tracked run, then made read-only by a read-only bind mount of its folder
    (root only: chmod does not stop root); skipped with one line where it cannot be mounted."""
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    made = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--out", str(tmp_path / "tracked"),
                           "--track", "--no-progress", *(a for item in TINY for a in ("--set", item))],
                          cwd=tmp_path, env={**ENV, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                          timeout=600)  # in tmp_path: the experiment it creates keeps its artifacts in ./mlruns
    assert made.returncode == 0, made.stderr[-2000:]
    bound = subprocess.run(["mount", "--bind", str(store), str(store)], capture_output=True)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root): {bound.stderr.decode().strip()[:120]}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(store)], check=True, capture_output=True)
        yield uri
    finally:
        subprocess.run(["umount", "-l", str(store)], check=True)


def test_a_read_only_store_is_one_line_before_training_and_still_serves_readers(read_only_store, tmp_path):
    before = (tmp_path / "store" / "mlflow.db").read_bytes()
    env = {**ENV, "MLFLOW_TRACKING_URI": read_only_store}
    settings = [a for item in TINY for a in ("--set", item)]
    for argv in (["train", "--out", str(tmp_path / "out"), "--track", *settings],
                 ["tracking", "sync", str(tmp_path / "tracked")]):
        result = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert "cannot be written (a read-only file, folder or file system)" in one_error_line(result)
    assert not (tmp_path / "out").exists() and (tmp_path / "store" / "mlflow.db").read_bytes() == before
    read = subprocess.run([sys.executable, "-m", "pipelines.cli", "compare", "--experiment", "colam", "--out",
                           str(tmp_path / "comparison")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-2000:]


def test_a_chain_of_stages_keeps_the_users_files_beside_its_stage_folders(tmp_path):
    """The root of `train --stage K` holds stage folders, each an output of its own (DVC's): files beside
    them are left as they were, and a stage trained again empties only what colam wrote in its folder."""
    out = tmp_path / "chain"
    (out / "notes").mkdir(parents=True)
    (out / "README.md").write_text("mine")
    (out / "notes" / "a.txt").write_text("mine too")
    for stage in (1, 2):
        assert colam("train", "--out", str(out), "--stage", str(stage), settings=TINY).returncode == 0
    assert (out / "README.md").read_text() == "mine" and (out / "notes" / "a.txt").read_text() == "mine too"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "notes", "stage_1", "stage_2"]
