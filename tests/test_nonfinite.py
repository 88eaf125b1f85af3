"""Numerical faults (issue 8): a non-finite loss stops training with one line naming the stage,
epoch and step, and the last good state stays on disk, whole, for the run to continue from."""

from __future__ import annotations

import json

import pytest
import torch

from colam.methods import METHODS
from pipelines.cli import main
from tests.conftest import TINY


def sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at(epoch, step): COLAM's loss becomes NaN at that step (both 1-based) of that epoch."""
    colam = METHODS["colam"]

    def arm(epoch: int, step: int):
        seen = {"epoch": 1, "step": 0}
        forward_loss, epoch_end = colam.forward_loss, colam.epoch_end

        def poisoned(self, *args, **kwargs):
            seen["step"] += 1
            loss, logits = forward_loss(self, *args, **kwargs)
            if (seen["epoch"], seen["step"]) == (epoch, step):
                loss = loss * float("nan")
            return loss, logits

        def counted(self, done, stage):
            seen["epoch"], seen["step"] = done + 1, 0
            return epoch_end(self, done, stage)

        monkeypatch.setattr(colam, "forward_loss", poisoned)
        monkeypatch.setattr(colam, "epoch_end", counted)

    return arm


def finite(path) -> bool:
    state = torch.load(path, weights_only=True)
    weights = state["model"] if "model" in state else state
    return all(torch.isfinite(v.float()).all() for v in weights.values())


def test_a_nan_loss_stops_the_run_naming_stage_epoch_step_and_keeps_the_last_checkpoint(nan_at, tmp_path, capsys):
    out = tmp_path / "run"
    nan_at(epoch=3, step=2)
    capsys.readouterr()

    assert main(["train", "--out", str(out), *sets(TINY)]) == 2

    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"colam: error: training diverged: non-finite loss (nan) in stage 2, epoch 3, step 2; "
                     f"the last good state is {out / 'checkpoint.pt'}"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2 and finite(out / "checkpoint.pt")
    assert not (out / "stage_2").exists() and not (out / "metrics.json").exists()


def test_the_run_continues_from_the_last_good_checkpoint_once_the_fault_is_gone(nan_at, monkeypatch, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(["train", "--out", str(reference), *sets(TINY)]) == 0
    nan_at(epoch=4, step=1)
    assert main(["train", "--out", str(out), *sets(TINY)]) == 2
    monkeypatch.undo()  # the fault is gone
    assert main(["train", "--out", str(out), *sets(TINY)]) == 0
    drop = lambda m: {k: v for k, v in m.items() if k != "wall_time_s"}  # noqa: E731
    assert drop(json.loads((out / "metrics.json").read_text())) == drop(json.loads(
        (reference / "metrics.json").read_text()))


def test_a_stage_that_diverges_names_its_partial_state(nan_at, tmp_path, capsys):
    """`train --stage 2` (the DVC chain): the last good state is the stage's .partial.pt."""
    out = tmp_path / "chain"
    assert main(["train", "--stage", "1", "--out", str(out), *sets(TINY)]) == 0
    nan_at(epoch=4, step=3)  # the stage's 2nd epoch, epoch 4 of the run
    capsys.readouterr()

    assert main(["train", "--stage", "2", "--out", str(out), *sets(TINY)]) == 2

    partial = out / "stage_2" / ".partial.pt"
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"colam: error: training diverged: non-finite loss (nan) in stage 2, epoch 4, step 3; "
                     f"the last good state is {partial}"]
    assert torch.load(partial, weights_only=True)["epoch"] == 3 and finite(partial)
    assert finite(out / "stage_1" / "model.pt") and not (out / "stage_2" / "metrics.json").exists()
