"""The staged trainer: artifacts per stage, repeatability, and resuming an interrupted run."""

import csv
import json

import numpy as np
import pytest
import torch

from colam.engine import RunLog, fit, learning_rate
from colam.errors import ColamError
from colam.methods import METHODS


class Interrupt(RunLog):
    """Stops the run, like a kill, right after epoch `after` was checkpointed."""

    def __init__(self, after):
        self.after = after

    def epoch_end(self, stage, row):
        if row["epoch"] == self.after:
            raise KeyboardInterrupt


def read_history(out):
    with open(out / "history.csv") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_colam_run_writes_every_stage_artifact(tiny_config, tmp_path):
    metrics = fit(tiny_config(), tmp_path)
    assert 0.0 <= metrics["test_acc"] <= 1.0 and "val_acc" in metrics
    assert json.loads((tmp_path / "metrics.json").read_text())["test_acc"] == metrics["test_acc"]
    for stage in (1, 2):
        stage_dir = tmp_path / f"stage_{stage}"
        labels = np.load(stage_dir / "soft_labels.npy")
        assert labels.dtype == np.float32 and labels.shape == (10, 10)
        assert np.allclose(labels.sum(1), 1.0, atol=1e-5)
        info = json.loads((stage_dir / "soft_labels.json").read_text())
        assert info["stage"] == stage and info["temperature"] == 2.0 and len(info["class_names"]) == 10
        state = torch.load(stage_dir / "model.pt", weights_only=True)
        assert "fc.weight" in state
        assert json.loads((stage_dir / "metrics.json").read_text())["epoch"] == 2 * stage
    history = read_history(tmp_path)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4]
    assert [int(r["stage"]) for r in history] == [1, 1, 2, 2]


def test_stage_two_trains_on_stage_one_soft_labels(tiny_config, tmp_path, monkeypatch):
    from colam.methods.colam import Colam

    used = {}
    original = Colam.loss

    def spy(self, logits, targets, indices, stage):
        used.setdefault(stage, None if self.soft_labels is None else self.soft_labels.clone())
        return original(self, logits, targets, indices, stage)

    monkeypatch.setattr(Colam, "loss", spy)
    fit(tiny_config(), tmp_path)
    assert used[1] is None  # stage 1: hard labels
    assert np.array_equal(used[2].numpy(), np.load(tmp_path / "stage_1" / "soft_labels.npy"))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    # the method's state after the run is the last stage's estimate, which is what was saved
    assert np.allclose(state["method"]["soft_labels"].numpy(), np.load(tmp_path / "stage_2" / "soft_labels.npy"))


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_config, tmp_path):
    a = fit(tiny_config(), tmp_path / "a")
    b = fit(tiny_config(), tmp_path / "b")
    fit(tiny_config("seed=1"), tmp_path / "c")
    assert read_history(tmp_path / "a") == read_history(tmp_path / "b")
    assert a["test_acc"] == b["test_acc"]
    assert read_history(tmp_path / "a") != read_history(tmp_path / "c")
    assert np.array_equal(np.load(tmp_path / "a/stage_2/soft_labels.npy"), np.load(tmp_path / "b/stage_2/soft_labels.npy"))


@pytest.mark.parametrize(
    "method, extra, interrupt_after",
    [
        ("colam", [], 1),  # inside stage 1
        ("colam", [], 2),  # right after the stage-1 soft labels were estimated and checkpointed
        ("colam", ["method.colam.peers=3"], 3),  # inside stage 2, with per-sample labels
        ("disturblabel", [], 2),  # random label draws must repeat too
    ],
)
def test_interrupted_run_resumes_to_the_same_result(tiny_config, tmp_path, method, extra, interrupt_after):
    config = tiny_config(f"method.name={method}", *extra)
    reference = fit(config, tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "resumed", run_log=Interrupt(interrupt_after))
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = fit(config, tmp_path / "resumed")
    assert read_history(tmp_path / "resumed") == read_history(tmp_path / "reference")
    assert resumed["test_acc"] == reference["test_acc"]
    last_stage = sorted(p.name for p in (tmp_path / "reference").glob("stage_*"))[-1]
    final = torch.load(tmp_path / "resumed" / last_stage / "model.pt", weights_only=True)
    expected = torch.load(tmp_path / "reference" / last_stage / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_completed_run_is_not_trained_again(tiny_config, tmp_path):
    first = fit(tiny_config(), tmp_path)
    stamp = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    assert fit(tiny_config(), tmp_path) == first
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == stamp


def test_resumed_run_reports_each_epoch_once(tiny_config, tmp_path):
    class Record(RunLog):
        def __init__(self):
            self.epochs, self.stages = [], []

        def stage_start(self, stage):
            self.stages.append(stage)

        def epoch_end(self, stage, row):
            self.epochs.append(row["epoch"])

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(), tmp_path, run_log=Interrupt(3))
    record = Record()
    fit(tiny_config(), tmp_path, run_log=record)
    assert record.epochs == [4] and record.stages == [2]


def test_out_dir_without_checkpoint_but_other_config_is_refused(tiny_config, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(), tmp_path, run_log=Interrupt(1))
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(ColamError, match="different configuration"):
        fit(tiny_config("seed=5"), tmp_path)


def test_out_dir_with_another_run_is_refused(tiny_config, tmp_path):
    fit(tiny_config(), tmp_path)
    before = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(ColamError, match=r"--out: .* different configuration \(method.colam.temperature: 2.0 there, 3.0 now\)"):
        fit(tiny_config("method.colam.temperature=3"), tmp_path)
    assert (tmp_path / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_end_to_end(tiny_config, tmp_path, name):
    from tests.test_methods import method_extras

    out = tmp_path / "run"
    metrics = fit(tiny_config(f"method.name={name}", *method_extras(name, tmp_path)), out)
    assert metrics["method"] == name and 0.0 <= metrics["test_acc"] <= 1.0
    assert (out / "stage_1" / "model.pt").exists()
    assert (out / "stage_1" / "soft_labels.npy").exists() == METHODS[name].uses_soft_labels


def test_too_many_peers_for_the_smallest_class_is_refused(tiny_config, tmp_path):
    with pytest.raises(ColamError, match="method.colam.peers: exceeds the smallest class.s 15 training samples, got 500"):
        fit(tiny_config("method.colam.peers=500"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_learning_rate_schedules(tiny_config):
    config = tiny_config("train.epochs=8", "method.colam.epochs_per_stage=4", "train.lr=0.1")
    assert [round(learning_rate(config, e), 6) for e in range(8)] == [0.1] * 4 + [0.01] * 2 + [0.001] * 2
    cosine = tiny_config("train.lr_schedule=cosine", "train.lr=0.1")
    assert learning_rate(cosine, 0) == pytest.approx(0.1) and learning_rate(cosine, 2) == pytest.approx(0.05)


def test_eval_every_scores_every_kth_epoch_every_stage_end_and_the_last(tiny_config, tmp_path):
    """train.eval_every: 3 on 4 epochs in 2 stages of 2 scores epoch 3, the stage ends 2 and 4 (the
    last); epoch 1 leaves val_acc and test_acc empty. Training itself is unchanged."""
    every = fit(tiny_config("train.eval_every=3"), tmp_path / "every3")
    history = read_history(tmp_path / "every3")
    assert [(r["val_acc"] != "", r["test_acc"] != "") for r in history] == [(False, False)] + [(True, True)] * 3
    each = fit(tiny_config(), tmp_path / "each")
    assert (every["test_acc"], every["val_acc"], every["train_loss"]) == (each["test_acc"], each["val_acc"],
                                                                          each["train_loss"])
    assert json.loads((tmp_path / "every3" / "stage_1" / "metrics.json").read_text())["test_acc"] == json.loads(
        (tmp_path / "each" / "stage_1" / "metrics.json").read_text())["test_acc"]


def test_keys_added_later_keep_an_earlier_runs_identity(tiny_config):
    """A run saved before train.eval_every and COLAM's recipe keys existed is the same run at their
    earlier values (what it did), and another run at any other value."""
    from colam.run_folder import run_identity

    config = tiny_config("method.colam.guard=none").to_dict()  # what every run did before the guard existed
    earlier = json.loads(json.dumps(config))
    del earlier["train"]["eval_every"]
    for key in ("stage1_loss", "peer_labels", "guard", "estimation"):
        del earlier["method"]["colam"][key]
    assert run_identity(config) == run_identity(earlier)
    for section, key, value in (("train", "eval_every", 2), ("colam", "stage1_loss", "tempered"),
                                ("colam", "peer_labels", "class"), ("colam", "guard", "anchor"),
                                ("colam", "guard", "keep")):
        other = json.loads(json.dumps(config))
        (other["train"] if section == "train" else other["method"]["colam"])[key] = value
        assert run_identity(other) != run_identity(config)


def test_colam_names_only_the_recipe_keys_that_differ_from_what_earlier_runs_did(tiny_config):
    colam = METHODS["colam"]
    assert set(colam.hyperparameters(tiny_config("method.colam.guard=none"))) == {
        "stages", "epochs_per_stage", "temperature", "peers", "aggregation"}
    assert colam.hyperparameters(tiny_config())["guard"] == "anchor"  # the default since the guard exists
    changed = colam.hyperparameters(tiny_config("method.colam.guard=keep", "method.colam.stage1_loss=tempered"))
    assert changed["guard"] == "keep" and changed["stage1_loss"] == "tempered"


def test_a_collapsed_row_is_counted_in_the_stage_metrics_and_soft_labels_json(tiny_config, tmp_path):
    """Two epochs per stage of a tiny model at a high lr: a stage end the guard must repair."""
    config = tiny_config("train.lr=0.5", "method.colam.guard=anchor", "method.colam.temperature=1.0")
    fit(config, tmp_path)
    for stage in (1, 2):
        metrics = json.loads((tmp_path / f"stage_{stage}" / "metrics.json").read_text())
        info = json.loads((tmp_path / f"stage_{stage}" / "soft_labels.json").read_text())
        labels = np.load(tmp_path / f"stage_{stage}" / "soft_labels.npy")
        assert metrics["collapsed_rows"] == len(info["collapsed_classes"]) and info["guard"] == "anchor"
        assert (labels.argmax(1) == np.arange(10)).all()  # repaired: every row favours its class
    assert sum(json.loads((tmp_path / f"stage_{k}" / "metrics.json").read_text())["collapsed_rows"]
               for k in (1, 2)) > 0
