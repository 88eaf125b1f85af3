"""Scoring a trained stage: the calibration error by hand, and `evaluate_run` against the run itself."""

import csv
import json
import math
import shutil

import pytest
import torch

from colam.config import load_config
from colam.data import save_split
from colam.engine import fit
from colam.errors import ColamError
from colam.evaluation import evaluate_run, expected_calibration_error
from tests.conftest import TINY


def config(*overrides):
    return load_config(None, TINY + list(overrides))


def probabilities(confidences, num_classes=4):
    """Rows whose largest entry, at column 0, is the given confidence; the rest is spread evenly."""
    rows = [[c] + [(1 - c) / (num_classes - 1)] * (num_classes - 1) for c in confidences]
    return torch.tensor(rows, dtype=torch.float64).float()


# ----------------------------------------------------------------------------- ECE


def test_ece_by_hand_in_two_bins():
    # Bin [0, 0.5): confidences 0.4 (right) and 0.3 (wrong): |1 - 0.7| = 0.3
    # Bin [0.5, 1]: confidences 0.9 (right) and 0.6 (wrong): |1 - 1.5| = 0.5      ECE = (0.3 + 0.5) / 4
    probs = probabilities([0.4, 0.3, 0.9, 0.6])
    targets = torch.tensor([0, 1, 0, 2])  # the prediction is always class 0
    assert expected_calibration_error(probs, targets, bins=2) == pytest.approx(0.2, abs=1e-6)


def test_ece_with_one_sample_per_bin_is_the_mean_gap():
    confidences = [0.15, 0.35, 0.55, 0.75, 0.95]
    correct = [1, 0, 1, 0, 1]
    targets = torch.tensor([0 if ok else 3 for ok in correct])
    probs = probabilities(confidences, num_classes=10)  # 0.15 is still the largest of 10
    expected = sum(abs(ok - c) for ok, c in zip(correct, confidences)) / 5
    assert expected_calibration_error(probs, targets, bins=10) == pytest.approx(expected, abs=1e-6)
    # the default 15 bins give the same here: every confidence still sits alone in its bin
    assert expected_calibration_error(probs, targets) == pytest.approx(expected, abs=1e-6)


def test_ece_is_zero_when_calibrated():
    # 0.75 confidence, 3 of 4 right; and one-hot predictions that are all right
    probs = probabilities([0.75] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == 0.0
    assert expected_calibration_error(torch.eye(5), torch.arange(5)) == 0.0
    # and it is 1 when every prediction is confidently wrong
    assert expected_calibration_error(torch.eye(5), (torch.arange(5) + 1) % 5) == pytest.approx(1.0)


def test_ece_bins_are_closed_on_the_right():
    # confidence 0.5 (right, a 2-way tie picks class 0) belongs to (0, 0.5]; 0.9 (wrong) to (0.5, 1]
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    targets = torch.tensor([0, 1])
    assert expected_calibration_error(probs, targets, bins=2) == pytest.approx((0.5 + 0.9) / 2)


# ----------------------------------------------------------------------------- evaluate_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    fit(config(), out, progress=False)
    return out


def read_rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("stage", [1, 2])
def test_evaluate_run_agrees_with_the_run(run, tmp_path, stage):
    stage_dir = run / f"stage_{stage}"
    metrics = evaluate_run(config(), stage_dir, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    trained = json.loads((stage_dir / "metrics.json").read_text())  # the stage's last epoch, unrounded
    assert metrics["evaluated_epoch"] == trained["epoch"] == 2 * stage
    # the same model on the same samples: the same accuracy, to the last digit
    assert metrics["test_acc"] == trained["test_acc"] and metrics["val_acc"] == trained["val_acc"]
    assert metrics["train_acc"] == trained["train_acc"]  # from the run's history, not re-scored
    assert float(read_rows(stage_dir / "history.csv")[-1]["test_acc"]) == pytest.approx(metrics["test_acc"], abs=1e-6)
    if stage == 2:
        assert metrics["test_acc"] == json.loads((run / "metrics.json").read_text())["test_acc"]
    assert metrics["method"] == "colam" and metrics["seed"] == 0
    for split in ("test", "val"):
        assert math.isfinite(metrics[f"{split}_nll"]) and metrics[f"{split}_nll"] > 0
        assert 0.0 <= metrics[f"{split}_ece"] <= 1.0

    assert read_rows(tmp_path / "history.csv") == read_rows(stage_dir / "history.csv")  # seconds included
    rows = read_rows(tmp_path / "predictions.csv")
    assert list(rows[0]) == ["sample", "actual", "predicted"]
    assert [int(r["sample"]) for r in rows] == list(range(599))  # one row per test sample, in order
    classes = [str(d) for d in range(10)]
    assert {r["actual"] for r in rows} == set(classes) and {r["predicted"] for r in rows} <= set(classes)
    from colam.datasets import build_raw_data

    assert [r["actual"] for r in rows] == [classes[t] for t in build_raw_data("digits", "data").test_targets]
    # exactly the samples the run counted as right during training
    assert sum(r["actual"] == r["predicted"] for r in rows) == round(trained["test_acc"] * 599)
    assert sum(r["actual"] == r["predicted"] for r in rows) / len(rows) == metrics["test_acc"]
    per_class = metrics["test_per_class_acc"]
    assert list(per_class) == classes
    for name in classes:
        mine = [r for r in rows if r["actual"] == name]
        assert per_class[name] == pytest.approx(sum(r["predicted"] == name for r in mine) / len(mine), abs=1e-6)


def test_evaluate_run_with_the_saved_split_gives_the_same_numbers(run, tmp_path):
    save_split(config().data, tmp_path / "split")
    drawn = evaluate_run(config(), run / "stage_2", tmp_path / "a")
    saved = evaluate_run(config(), run / "stage_2", tmp_path / "b", split_dir=tmp_path / "split")
    assert drawn == saved
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (tmp_path / "b" / "predictions.csv").read_bytes()


def test_evaluate_run_of_another_config_is_refused(run, tmp_path):
    with pytest.raises(ColamError, match=r"different configuration \(method.colam.temperature: 2.0 there, 3.0 now\)"):
        evaluate_run(config("method.colam.temperature=3"), run / "stage_2", tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_evaluate_run_of_a_folder_that_is_not_a_stage_is_refused(run, tmp_path):
    with pytest.raises(ColamError, match=r"^stage state: .* does not exist"):
        evaluate_run(config(), tmp_path / "nothing", tmp_path / "eval")
    shutil.copytree(run / "stage_2", tmp_path / "stage")
    (tmp_path / "stage" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ColamError, match=r"^stage model: .*model\.pt' is not a readable checkpoint"):
        evaluate_run(config(), tmp_path / "stage", tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
