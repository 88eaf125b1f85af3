"""Training killed with SIGKILL and started again with the same command (issue: reliability).

Each kill is a real process killed at a moment drawn at random (the seed is in the test's id and
output), or inside a file write. After every kill two properties are checked:

1. no artifact is corrupt: every file the run folder holds loads (checkpoints with
   weights_only=True, JSON, NumPy, CSV, YAML); a write the kill cut off leaves only its temporary
   file, which the next start removes;
2. the next start resumes from the last complete epoch: it continues after the epoch its
   checkpoint holds, and that is at least the last epoch the killed process reported.

The run that finally completes must end with the numbers and weights of an uninterrupted run
(CPU, same seed, same thread count).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from colam import io as cio

from tests.test_dvc_pipeline import TINY_PARAMS, scratch_repo

ROOT = Path(__file__).resolve().parents[1]

# 12 epochs of the digits in 3 COLAM stages: about 0.2 s an epoch, so random kills land in
# training, at stage ends and in writes, not only in the start-up.
SETTINGS = ["data.name=digits", "data.val_fraction=0.2", "model.name=small_cnn", "model.options={width: 8}",
            "train.epochs=12", "train.batch_size=32", "train.lr=0.05", "method.name=colam",
            "method.colam.stages=3", "method.colam.epochs_per_stage=4", "seed=3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
EPOCH_LINE = re.compile(r"epoch (\d+)/\d+  loss")
CONTINUING = re.compile(r"continuing .* after epoch (\d+) of")


class Attempt:
    """One `colam train` process, its stderr collected as it comes."""

    def __init__(self, out: Path, *extra: str, wrapper: list[str] | None = None):
        sets = [a for item in SETTINGS for a in ("--set", item)]
        command = [sys.executable, *(wrapper or ["-m", "pipelines.cli"]), "train", *sets, "--out", str(out),
                   "--no-progress", *extra]
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True)
        self.reader.start()

    def kill_at(self, seconds: float) -> bool:
        """SIGKILL the process `seconds` after it started; False when it had ended by then."""
        try:
            self.process.wait(timeout=max(0.0, seconds - (time.monotonic() - self.started)))
            return False
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.wait()
            return True

    def wait(self) -> int:
        code = self.process.wait(timeout=300)
        self.reader.join(timeout=30)
        return code

    def last_reported_epoch(self) -> int:
        return max([int(m.group(1)) for line in self.lines if (m := EPOCH_LINE.search(line))], default=0)

    def continued_after(self) -> int | None:
        found = [int(m.group(1)) for line in self.lines if (m := CONTINUING.search(line))]
        return found[0] if found else None


def assert_no_corrupt_artifact(folder: Path) -> list[str]:
    """Every file in `folder` loads; returns the names of cut-off writes' temporary files."""
    temporaries = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            temporaries.append(path.name)
        elif path.name == cio.MANIFEST:  # whole, and naming every file colam left in its folder
            named = cio.written_here(path.parent)
            assert all(p.name in named or p.name == cio.MANIFEST or p.name.endswith(".tmp")
                       for p in path.parent.iterdir()), path
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npy":
            np.load(path, allow_pickle=False)
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict), path
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
        elif path.suffix == ".csv":
            rows = list(csv.DictReader(path.open()))
            assert rows and [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1)), path
        else:
            raise AssertionError(f"unexpected file {path}")
    return temporaries


def checkpoint_epoch(path: Path) -> int:
    return torch.load(path, weights_only=True)["epoch"] if path.exists() else 0


def history_without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(path.open())]


def assert_same_run(folder: Path, reference: Path, stage_folders_only: bool = False) -> None:
    """The numbers, curves, weights and soft labels of an uninterrupted run, bit for bit."""
    stages = sorted(int(p.name.split("_")[1]) for p in reference.glob("stage_*"))
    assert stages and sorted(int(p.name.split("_")[1]) for p in folder.glob("stage_*")) == stages
    for stage in stages:
        mine, theirs = folder / f"stage_{stage}", reference / f"stage_{stage}"
        a, b = torch.load(mine / "model.pt", weights_only=True), torch.load(theirs / "model.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"stage {stage} weights differ"
        assert (mine / "soft_labels.npy").read_bytes() == (theirs / "soft_labels.npy").read_bytes()
        assert history_without_time(mine / "history.csv") == history_without_time(theirs / "history.csv")
    if not stage_folders_only:
        metrics = {k: v for k, v in json.loads((folder / "metrics.json").read_text()).items() if k != "wall_time_s"}
        expected = {k: v for k, v in json.loads((reference / "metrics.json").read_text()).items()
                    if k != "wall_time_s"}
        assert metrics == expected
        assert history_without_time(folder / "history.csv") == history_without_time(reference / "history.csv")
    assert not list(folder.rglob(".*.tmp")) and not list(folder.rglob(".partial.pt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, float]:
    """An uninterrupted run, and how long its process took."""
    out = tmp_path_factory.mktemp("reference") / "run"
    attempt = Attempt(out)
    assert attempt.wait() == 0, "".join(attempt.lines)
    return out, time.monotonic() - attempt.started


KILL_SEED = 20261202
KILLS = 6


def test_a_run_killed_at_random_moments_resumes_each_time_and_ends_as_if_never_killed(reference, tmp_path):
    """`colam train` killed at random moments, over and over; each start resumes after the epoch the
    last one saved. Once KILLS kills have landed the last start runs to the end. A kill drawn after
    the run's end starts the next run folder."""
    reference_out, duration = reference
    rng = random.Random(KILL_SEED)
    kills, runs, report = 0, 0, []
    while kills < KILLS:
        runs += 1
        out, saved = tmp_path / f"run_{runs}", 0
        while True:
            attempt, at = Attempt(out), rng.uniform(0.3, duration)
            if kills >= KILLS or not attempt.kill_at(at):
                assert attempt.wait() == 0, "".join(attempt.lines)
                done = any("already holds a completed run; nothing to do" in line for line in attempt.lines)
                assert done or attempt.continued_after() == (saved or None), "".join(attempt.lines)  # killed at its exit
                break
            kills += 1
            assert attempt.continued_after() in (None, saved or None), "".join(attempt.lines)
            temporaries = assert_no_corrupt_artifact(out) if out.exists() else []
            saved = checkpoint_epoch(out / "checkpoint.pt")
            reported = attempt.last_reported_epoch()
            assert saved >= reported, f"killed at {at:.2f} s: epoch {reported} reported, the checkpoint holds {saved}"
            report.append(f"run {runs}: killed at {at:.2f} s, epoch {reported} reported, {saved} saved, "
                          f"cut-off writes {temporaries}")
        assert_same_run(out, reference_out)
    print(f"seed {KILL_SEED}: {kills} kills in {runs} run(s), each ended as the uninterrupted run\n" + "\n".join(report))


@pytest.mark.parametrize("name, nth", [
    ("checkpoint.pt", 3),  # the state after epoch 3 is on disk, not yet renamed over epoch 2's
    ("model.pt", 2),  # stage 2's weights
    ("soft_labels.npy", 1),  # stage 1's soft labels
    ("metrics.json", 4),  # the run's last file: stage 3's metrics.json is the 3rd, the run's the 4th
])
def test_a_kill_inside_a_write_leaves_the_previous_file_whole(reference, tmp_path, name, nth):
    reference_out, _ = reference
    out = tmp_path / "run"
    attempt = Attempt(out, wrapper=[str(ROOT / "tests" / "kill_in_write.py"), name, str(nth)])
    assert attempt.wait() == -signal.SIGKILL
    temporaries = assert_no_corrupt_artifact(out)
    assert len(temporaries) == 1 and temporaries[0].startswith(f".{name}."), temporaries
    saved = checkpoint_epoch(out / "checkpoint.pt")
    assert saved >= attempt.last_reported_epoch()
    resumed = Attempt(out)
    assert resumed.wait() == 0, "".join(resumed.lines)
    assert resumed.continued_after() == (saved or None)
    assert_same_run(out, reference_out)


def test_a_stage_killed_mid_stage_resumes_from_its_last_epoch(reference, tmp_path):
    """`colam train --stage K`, the DVC chain's command: a killed stage keeps a .partial.pt after
    each epoch and continues after it; a stage already complete is left alone."""
    reference_out, duration = reference
    out = tmp_path / "staged"
    rng = random.Random(KILL_SEED + 1)
    kills, saved = 0, 0
    for stage in (1, 2, 3):
        for tries in itertools.count():
            attempt = Attempt(out, "--stage", str(stage))
            # a stage is a third of the run's epochs and all of its start-up: two kills, then it ends
            killed = tries < 2 and attempt.kill_at(rng.uniform(0.3, duration * 2 / 3))
            if not killed:
                assert attempt.wait() == 0, "".join(attempt.lines)
            continued = attempt.continued_after()
            assert continued is None or continued == saved, "".join(attempt.lines)
            if not killed:
                assert continued == (saved or None) or "nothing to do" in "".join(attempt.lines)
                saved = 4 * stage
                break
            kills += 1
            assert_no_corrupt_artifact(out)
            saved = stage_epochs_saved(out)
            assert saved >= attempt.last_reported_epoch(), "".join(attempt.lines)
    assert kills >= 1
    assert_same_run(out, reference_out, stage_folders_only=True)
    print(f"seed {KILL_SEED + 1}: colam train --stage killed {kills} times, then ended as the uninterrupted run")
    again = Attempt(out, "--stage", "3")
    assert again.wait() == 0
    assert any("already holds stage 3 of this run; nothing to do" in line for line in again.lines)


def test_a_stage_killed_as_it_is_marked_complete_trains_nothing_again(reference, tmp_path):
    """Killed after a stage's files and its last state were written, as its .provenance.json is
    marked complete: the next start trains no epoch again (a run log catches up from the folder)."""
    reference_out, _ = reference
    out = tmp_path / "staged"
    wrapper = [str(ROOT / "tests" / "kill_in_write.py"), ".provenance.json", "2"]  # the 1st write marks it begun
    assert Attempt(out, "--stage", "1", wrapper=wrapper).wait() == -signal.SIGKILL
    assert checkpoint_epoch(out / "stage_1" / ".partial.pt") == 4 == checkpoint_epoch(out / "stage_1" / "state.pt")
    resumed = Attempt(out, "--stage", "1")
    assert resumed.wait() == 0, "".join(resumed.lines)
    said = "".join(resumed.lines)
    assert resumed.continued_after() == 4 and not EPOCH_LINE.search(said), said
    assert "stage 1 was trained to its end; nothing to train again" in said  # the run log catches up by itself
    for stage in (2, 3):
        assert Attempt(out, "--stage", str(stage)).wait() == 0
    assert_same_run(out, reference_out, stage_folders_only=True)


# ----------------------------------------------------------------------------- dvc repro


def stage_epochs_saved(run: Path) -> int:
    """The epoch a stage-by-stage run in `run` continues after: a complete stage's state.pt (its
    .provenance.json says complete), else a stage's .partial.pt, the state after its last epoch."""
    found = [0]
    for folder in run.glob("stage_*"):
        record = json.loads((folder / ".provenance.json").read_text()) if (folder / ".provenance.json").exists() else {}
        if record.get("complete"):
            found.append(checkpoint_epoch(folder / "state.pt"))
        elif (folder / ".partial.pt").exists():
            found.append(checkpoint_epoch(folder / ".partial.pt"))
    return max(found)


def test_dvc_repro_killed_at_random_moments_continues_and_ends_as_if_never_killed(tmp_path):
    """`dvc repro` of the COLAM chain (prepare, then train@stage_1..4, a process per stage) killed
    with its whole process group at random moments, then run again: each run continues after the
    last saved epoch, no file is corrupt, DVC's locks do not stand in the way, and the chain ends
    with the numbers of one uninterrupted `colam train` run."""
    params = {**TINY_PARAMS, "data": {"train_subset": None},
              "train": {**TINY_PARAMS["train"], "epochs": 12},
              "method": {"colam": {"stages": 4, "epochs_per_stage": 3, "temperature": 1.0}}}
    (tmp_path / "repo").mkdir()
    repo = scratch_repo(tmp_path / "repo", params)
    env = {**repo.env, "OMP_NUM_THREADS": "1"}
    target = "train@stage_4"
    rng = random.Random(KILL_SEED + 2)
    kills, saved, report = 0, 0, []
    while True:
        began = time.monotonic()
        process = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro", target], cwd=repo.path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
        reader.start()
        # every other kill at a random moment, the others just after a stage reported its n-th epoch
        # (most of a start is imports and set-up: random moments alone rarely land mid-stage)
        at, nth, delay = rng.uniform(1.0, 30.0), rng.randint(1, 2), rng.uniform(0.0, 0.3)
        by_epoch, seen_at, code = kills % 2 == 1, None, None
        while (code := process.poll()) is None and kills < KILLS:
            now = time.monotonic() - began
            if by_epoch and seen_at is None and sum(bool(EPOCH_LINE.search(line)) for line in list(lines)) >= nth:
                seen_at = now
            if (now >= at) if not by_epoch else (seen_at is not None and now >= seen_at + delay):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(0.01)
        if code is None and kills >= KILLS:
            code = process.wait(timeout=600)
        at = time.monotonic() - began
        reader.join(timeout=30)
        output = "".join(lines)
        # continues after what the last one saved: the first epoch trained is the next one, and the "continuing"
        # lines before it name the saved epoch (none when nothing was saved; a later stage's start says one too,
        # and so does a stage killed after its last epoch but before DVC recorded it, which DVC runs again)
        epochs = [int(m.group(1)) for line in lines if (m := EPOCH_LINE.search(line))]
        first = next((i for i, line in enumerate(lines) if EPOCH_LINE.search(line)), len(lines))
        continued = [int(m.group(1)) for line in lines[:first] if (m := CONTINUING.search(line))]
        assert not epochs or epochs[0] == saved + 1, output
        assert (set(continued) == {saved} if saved else not continued) or (saved and not epochs and not continued), \
            output
        if code is not None:
            assert code == 0, output
            break
        kills += 1
        for folder in (repo.path / "runs" / "main").glob("stage_*"):
            assert_no_corrupt_artifact(folder)
        yaml.safe_load((repo.path / "dvc.lock").read_text()) if (repo.path / "dvc.lock").exists() else None
        reported = max([int(m.group(1)) for line in lines if (m := EPOCH_LINE.search(line))], default=0)
        saved = stage_epochs_saved(repo.path / "runs" / "main")
        assert saved >= reported, f"killed at {at:.1f} s: epoch {reported} reported, {saved} saved\n{output}"
        report.append(f"killed after {at:.1f} s{f' ({nth} epoch(s) into a stage)' if by_epoch else ''}: "
                      f"epoch {reported} reported, {saved} saved")
    assert repo.dvc("status", target).stdout.strip() == "Data and pipelines are up to date."
    reference = repo.path / "reference"
    repo.run(str(Path(sys.executable).parent / "colam"), "train", "--config", "params.yaml", "--split",
             "data/prepared", "--out", str(reference), "--no-track", "--no-progress", env={"OMP_NUM_THREADS": "1"})
    assert_same_run(repo.path / "runs" / "main", reference, stage_folders_only=True)
    print(f"seed {KILL_SEED + 2}: dvc repro killed {kills} times, then ended as the uninterrupted run\n"
          + "\n".join(report))
