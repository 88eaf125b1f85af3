"""One stage at a time (fit_stage), saved splits (save_split / build_data(cfg, split_dir)) and the
stage CLI: the pipeline's steps must give the numbers of one uninterrupted `fit`, and refuse what
would silently give other ones."""

import csv
import json
import shutil
import time

import numpy as np
import pytest
import torch

from pipelines.cli import main
from colam.config import load_config
from colam.data import Split, build_data, draw_split, save_split
from colam.datasets import build_raw_data
from colam.engine import fit, fit_stage
from colam.run_folder import load_stage_state, run_identity
from colam.errors import ColamError
from tests.conftest import TINY

STAGE_FILES = ["history.csv", "metrics.json", "model.pt", "soft_labels.json", "soft_labels.npy", "state.pt"]


def config(*overrides):
    return load_config(None, TINY + list(overrides))


def read_history(path):
    with open(path) as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def stage_metrics(stage_dir):
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k not in ("seconds", "estimation_seconds")}


def load_weights(path):
    return torch.load(path, weights_only=True)


def assert_same_weights(a, b):
    a, b = load_weights(a), load_weights(b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def snapshot(folder):
    """Every file under `folder` with its bytes: to show a refusal wrote nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Uninterrupted `fit` runs to compare the stage-by-stage runs with, keyed by their overrides."""
    root = tmp_path_factory.mktemp("whole")
    runs = {}

    def get(*overrides):
        if overrides not in runs:
            out = root / f"run{len(runs)}"
            fit(config(*overrides), out, progress=False)
            runs[overrides] = out
        return runs[overrides]

    return get


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    save_split(config().data, out)
    return out


def with_stage_1(whole, out):
    """`out` holding a copy of the reference run's stage_1 and nothing else."""
    shutil.copytree(whole() / "stage_1", out / "stage_1")
    return out


# ----------------------------------------------------------------------------- stage by stage == fit


@pytest.mark.parametrize("overrides, use_split", [
    ((), False),
    ((), True),
    (("method.colam.peers=3",), True),  # per-sample soft labels with random peer draws
])
def test_stage_by_stage_equals_the_whole_run(whole, split_dir, tmp_path, overrides, use_split):
    reference = whole(*overrides)
    cfg = config(*overrides)
    split = split_dir if use_split else None
    returned = [fit_stage(cfg, tmp_path, stage, progress=False, split_dir=split) for stage in (1, 2)]

    # a single stage writes its stage folder only (the pipeline's declared outputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage_1", "stage_2"]
    assert read_history(tmp_path / "stage_2" / "history.csv") == read_history(reference / "history.csv")
    for stage, metrics in zip((1, 2), returned):
        mine, theirs = tmp_path / f"stage_{stage}", reference / f"stage_{stage}"
        # the same artifacts; the stage's bookkeeping (.provenance.json, which DVC ignores) aside
        assert {p.name for p in mine.iterdir() if not p.name.startswith(".")} == {
            p.name for p in theirs.iterdir() if not p.name.startswith(".")}
        assert not (mine / ".partial.pt").exists()  # the mid-stage state is gone once the stage is complete
        assert read_history(mine / "history.csv") == read_history(theirs / "history.csv")
        assert_same_weights(mine / "model.pt", theirs / "model.pt")
        for name in ("soft_labels.npy", "sample_soft_labels.npy", "soft_labels.json"):
            if (theirs / name).exists():
                assert (mine / name).read_bytes() == (theirs / name).read_bytes(), name
        assert stage_metrics(mine) == stage_metrics(theirs)
        assert metrics == json.loads((mine / "metrics.json").read_text())
        # what the next stage starts from: the optimizer's momentum and the method's state
        a, b = load_stage_state(mine, cfg), load_stage_state(theirs, cfg)
        assert a["epoch"] == b["epoch"] == 2 * stage
        for (_, sa), (_, sb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
        for key, value in b["method"].items():
            assert (value is None and a["method"][key] is None) or torch.equal(a["method"][key], value), key
    assert returned[1]["test_acc"] == json.loads((reference / "metrics.json").read_text())["test_acc"]


@pytest.mark.parametrize("use_split", [False, True])
def test_baseline_has_one_stage_that_equals_the_whole_run(whole, split_dir, tmp_path, use_split):
    reference = whole("method.name=hl")
    cfg = config("method.name=hl")
    split = split_dir if use_split else None
    metrics = fit_stage(cfg, tmp_path / "run", 1, progress=False, split_dir=split)
    assert read_history(tmp_path / "run" / "stage_1" / "history.csv") == read_history(reference / "history.csv")
    assert_same_weights(tmp_path / "run" / "stage_1" / "model.pt", reference / "stage_1" / "model.pt")
    assert not (tmp_path / "run" / "stage_1" / "soft_labels.npy").exists()
    assert metrics["test_acc"] == json.loads((reference / "metrics.json").read_text())["test_acc"]

    with pytest.raises(ColamError, match=r"^--stage: 2 .*hl trains 1 stage") as excinfo:
        fit_stage(cfg, tmp_path / "other", 2, progress=False, split_dir=split)
    one_line_error(excinfo)
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("stage", [0, 3, -1])
def test_a_stage_the_run_does_not_have_is_refused(tmp_path, stage):
    with pytest.raises(ColamError, match=rf"^--stage: {stage} is not a stage of this run \(colam trains 2") as excinfo:
        fit_stage(config(), tmp_path / "run", stage, progress=False)
    one_line_error(excinfo)
    assert not (tmp_path / "run").exists()


def test_stage_2_without_stage_1_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ColamError, match=r"--stage: stage 2 starts from '.*stage_1', which holds no finished stage; train --stage 1 first") as excinfo:
        fit_stage(config(), tmp_path / "run", 2, progress=False)
    one_line_error(excinfo)
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated"])
def test_stage_2_after_an_unreadable_stage_1_is_refused(whole, tmp_path, content):
    out = with_stage_1(whole, tmp_path / "run")
    (out / "stage_1" / "state.pt").write_bytes(content)
    before = snapshot(out)
    with pytest.raises(ColamError, match=r"stage state: .*stage_1.state\.pt") as excinfo:
        fit_stage(config(), out, 2, progress=False)
    one_line_error(excinfo)
    assert snapshot(out) == before


def test_stage_2_after_a_state_of_another_kind_is_refused(whole, tmp_path):
    out = with_stage_1(whole, tmp_path / "run")
    torch.save({"epoch": 2}, out / "stage_1" / "state.pt")
    with pytest.raises(ColamError, match=r"is not a colam stage state") as excinfo:
        fit_stage(config(), out, 2, progress=False)
    one_line_error(excinfo)
    assert not (out / "stage_2").exists()


@pytest.mark.parametrize("override, difference", [
    ("train.lr=0.1", "train.lr: 0.05 there, 0.1 now"),
    ("method.colam.temperature=3", "method.colam.temperature: 2.0 there, 3.0 now"),
    ("seed=1", "seed: 0 there, 1 now"),
    ("data.label_noise=0.2", "data.label_noise: 0.0 there, 0.2 now"),
    ("model.options={width: 4}", "model.options.width: 8 there, 4 now"),
])
def test_stage_2_after_a_stage_1_of_another_config_is_refused(whole, tmp_path, override, difference):
    out = with_stage_1(whole, tmp_path / "run")
    before = snapshot(out)
    with pytest.raises(ColamError, match=r"^--out: .*stage_1' holds a stage with a different configuration") as excinfo:
        fit_stage(config(override), out, 2, progress=False)
    assert f"({difference})" in one_line_error(excinfo)
    assert snapshot(out) == before and not (out / "stage_2").exists()


def test_keys_that_do_not_change_the_numbers_are_the_same_run(whole, tmp_path):
    # data.root is unused by digits, train.device=cpu is what auto picks here, and the settings of
    # methods other than colam are never read: stage 2 must run and repeat the reference exactly.
    out = with_stage_1(whole, tmp_path / "run")
    fit_stage(config("data.root=/nonexistent/elsewhere", "train.device=cpu", "method.ls.eps=0.3",
                     "method.cp.beta=0.5", "method.disturblabel.alpha=0.2"), out, 2, progress=False)
    assert_same_weights(out / "stage_2" / "model.pt", whole() / "stage_2" / "model.pt")
    assert (out / "stage_2" / "soft_labels.npy").read_bytes() == (whole() / "stage_2" / "soft_labels.npy").read_bytes()


@pytest.mark.parametrize("override", ["train.eval_batch_size=7", "data.download=true",
                                      "train.device=cpu", "data.root=/elsewhere", "method.ls.eps=0.3"])
def test_execution_settings_are_not_another_run(whole, override):
    # the check fit_stage and evaluate_run make before anything is read or trained
    state = load_stage_state(whole() / "stage_1", config(override))
    assert state["epoch"] == 2 and "fc.weight" in state["model"]


def test_run_identity_ignores_execution_keys_and_other_methods():
    base = run_identity(config().to_dict())
    for override in ["train.device=cpu", "train.eval_batch_size=17", "data.root=/x",
                     "data.download=true", "method.ls.eps=0.3", "method.ls.convention=C-1", "method.cp.beta=0.2",
                     "method.disturblabel.alpha=0.5"]:
        assert run_identity(config(override).to_dict()) == base, override
    for override in ["seed=1", "train.lr=0.1", "train.batch_size=16", "train.momentum=0.5", "method.colam.temperature=3",
                     "method.colam.peers=3", "method.colam.aggregation=probs", "data.label_noise=0.1",
                     "data.split_seed=1", "data.train_subset=300", "data.val_fraction=0.1", "model.options={width: 4}",
                     "method.name=hl", "data.num_workers=2"]:  # each worker draws its own augmentation
        assert run_identity(config(override).to_dict()) != base, override
    # a baseline's identity holds its own section only
    hl = run_identity(config("method.name=hl").to_dict())
    assert hl["method"] == {"name": "hl", "hl": {}}
    assert run_identity(config("method.name=hl", "method.colam.temperature=5").to_dict()) == hl


# ----------------------------------------------------------------------------- splits


def test_save_split_twice_writes_the_same_bytes(tmp_path, monkeypatch):
    cfg = config("data.label_noise=0.2").data
    first = save_split(cfg, tmp_path / "a")
    # Another wall-clock time: a zip stamped with the current time (np.savez) would differ.
    monkeypatch.setattr(time, "time", lambda: 1_000_000_000.0)
    second = save_split(cfg, tmp_path / "b")
    for name in ("split.npz", "split.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    save_split(cfg, tmp_path / "b")  # again into the same folder
    for name in ("split.npz", "split.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first == second == json.loads((tmp_path / "a" / "split.json").read_text())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".colam-files", "split.json", "split.npz"]
    assert first["data"] == {"name": "digits", "train_subset": 200, "val_fraction": 0.2, "label_noise": 0.2,
                             "noise_type": "symmetric", "split_seed": 0}
    assert (first["train_samples"], first["val_samples"], first["test_samples"]) == (160, 40, 599)
    assert first["noisy_labels"] == 32 and sum(first["train_samples_per_class"]) == 160  # round(0.2 * 160)
    with np.load(tmp_path / "a" / "split.npz", allow_pickle=False) as arrays:
        drawn = draw_split(cfg, build_raw_data("digits", "data"))
        assert sorted(arrays.files) == sorted(f"{k}" for k in Split.__dataclass_fields__)
        for key in Split.__dataclass_fields__:
            assert arrays[key].dtype == np.int64 and np.array_equal(arrays[key], getattr(drawn, key)), key


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_a_saved_split_gives_the_data_of_the_config(tmp_path, noise):
    cfg = config(f"data.label_noise={noise}").data
    save_split(cfg, tmp_path)
    drawn, saved = build_data(cfg), build_data(cfg, tmp_path)
    for name in ("train", "train_eval", "val", "test"):
        a, b = getattr(drawn, name), getattr(saved, name)
        assert np.array_equal(a.indices, b.indices) and np.array_equal(a.targets, b.targets), name
    assert torch.equal(drawn.train_targets, saved.train_targets)
    assert torch.equal(drawn.clean_train_targets, saved.clean_train_targets)
    assert drawn.classes == saved.classes and len(saved.train) == 160 and len(saved.val) == 40
    raw = build_raw_data("digits", "data")
    assert np.array_equal(saved.clean_train_targets.numpy(), raw.train_targets[saved.train.indices])
    assert np.array_equal(saved.val.targets, raw.train_targets[saved.val.indices])  # validation is never noisy
    flipped = (saved.train_targets != saved.clean_train_targets).sum().item()
    assert flipped == round(noise * 160)
    assert np.array_equal(saved.train.targets, saved.train_targets.numpy())  # training sees the noisy labels


@pytest.mark.parametrize("override, key", [
    ("data.label_noise=0.1", "label_noise"),
    ("data.train_subset=300", "train_subset"),
    ("data.split_seed=1", "split_seed"),
    ("data.val_fraction=0.1", "val_fraction"),
])
def test_a_split_of_other_data_settings_is_refused(split_dir, tmp_path, override, key):
    with pytest.raises(ColamError, match=rf"^--split: .* was prepared with data\.{key}=") as excinfo:
        fit_stage(config(override), tmp_path / "run", 1, progress=False, split_dir=split_dir)
    one_line_error(excinfo)
    assert not (tmp_path / "run").exists()


def corrupt(folder, how):
    if how == "garbage npz":
        (folder / "split.npz").write_bytes(b"this is not a zip archive")
    elif how == "truncated npz":
        data = (folder / "split.npz").read_bytes()
        (folder / "split.npz").write_bytes(data[: len(data) // 2])
    elif how == "npz missing an array":
        with np.load(folder / "split.npz") as arrays:
            kept = {k: arrays[k] for k in arrays.files if k != "val_index"}
        np.savez(folder / "split.npz", **kept)
    elif how == "no npz":
        (folder / "split.npz").unlink()
    elif how == "no json":
        (folder / "split.json").unlink()
    elif how == "json not json":
        (folder / "split.json").write_text("{not json")


@pytest.mark.parametrize("how", ["garbage npz", "truncated npz", "npz missing an array", "no npz", "no json",
                                 "json not json", "missing folder", "empty folder"])
def test_an_unreadable_split_is_refused_in_one_line(split_dir, tmp_path, how):
    split = tmp_path / "split"
    if how == "empty folder":
        split.mkdir()
    elif how != "missing folder":
        shutil.copytree(split_dir, split)
        corrupt(split, how)
    with pytest.raises(ColamError, match=rf"^--split: '{split}' ") as excinfo:
        fit_stage(config(), tmp_path / "run", 1, progress=False, split_dir=split)
    one_line_error(excinfo)
    assert not (tmp_path / "run").exists()


def edit_split(source, target, **changes):
    """A copy of the split with its arrays changed and split.json's digest of them dropped (a split prepared
    before it was recorded): the content checks below the digest are what these tests are about."""
    shutil.copytree(source, target)
    summary = json.loads((target / "split.json").read_text())
    del summary["npz_sha256"]
    (target / "split.json").write_text(json.dumps(summary))
    with np.load(source / "split.npz") as arrays:
        values = {k: arrays[k] for k in arrays.files}
    for key, change in changes.items():
        values[key] = change(values[key])
    np.savez(target / "split.npz", **values)


def roll(a):
    return np.roll(a, 1)  # every sample's clean label now belongs to its neighbour


@pytest.mark.parametrize("changes", [
    {"train_index": lambda a: np.sort(np.setdiff1d(np.arange(1198), a))[: len(a)]},  # other samples
    {"train_index": roll},
    {"train_index": lambda a: np.where(np.arange(len(a)) == 0, 5000, a)},  # past the end of the raw data
    {"val_index": lambda a: np.where(np.arange(len(a)) == 0, -1, a)},
    {"clean_train_targets": roll},
    {"train_targets": lambda a: a[:-1]},
])
def test_a_split_that_does_not_match_the_raw_data_is_refused(split_dir, tmp_path, changes):
    edit_split(split_dir, tmp_path / "split", **changes)
    with pytest.raises(ColamError, match=r"^--split: .* does not match the data set 'digits'") as excinfo:
        build_data(config().data, tmp_path / "split")
    one_line_error(excinfo)


def test_a_split_of_a_raw_data_set_of_another_size_is_refused(split_dir, tmp_path):
    shutil.copytree(split_dir, tmp_path / "split")
    summary = json.loads((tmp_path / "split" / "split.json").read_text())
    summary["raw_train_samples"] += 1
    (tmp_path / "split" / "split.json").write_text(json.dumps(summary))
    with pytest.raises(ColamError, match=r"does not match the data set"):
        build_data(config().data, tmp_path / "split")


# Known gaps in load_split, reported rather than fixed here (see the report of this test file).
@pytest.mark.parametrize("content", ["[]", "null", '{"data": null}'])
def test_a_split_json_that_is_not_a_summary_is_refused(split_dir, tmp_path, content):
    shutil.copytree(split_dir, tmp_path / "split")
    (tmp_path / "split" / "split.json").write_text(content)
    with pytest.raises(ColamError, match=r"^--split: "):
        build_data(config().data, tmp_path / "split")


@pytest.mark.parametrize("label", [10, -1])
def test_a_split_with_labels_outside_the_classes_is_refused(split_dir, tmp_path, label):
    edit_split(split_dir, tmp_path / "split", train_targets=lambda a: np.where(np.arange(len(a)) == 0, label, a))
    with pytest.raises(ColamError, match=r"^--split: "):
        build_data(config().data, tmp_path / "split")


def test_a_split_whose_validation_overlaps_training_is_refused(split_dir, tmp_path):
    with np.load(split_dir / "split.npz") as arrays:
        train_index = arrays["train_index"]
    edit_split(split_dir, tmp_path / "split", val_index=lambda a: train_index[: len(a)])
    with pytest.raises(ColamError, match=r"^--split: "):
        build_data(config().data, tmp_path / "split")


# ----------------------------------------------------------------------------- the CLI


def sets(*overrides):
    return [a for item in TINY + list(overrides) for a in ("--set", item)]


def test_prepare_train_each_stage_then_evaluate(whole, tmp_path, capsys):
    split, run, evaluation = tmp_path / "split", tmp_path / "run", tmp_path / "eval"
    assert main(["prepare", *sets(), "--out", str(split)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["train_samples"] == 160 and printed["val_samples"] == 40 and printed["test_samples"] == 599
    assert sorted(p.name for p in split.iterdir()) == [".colam-files", "split.json", "split.npz"]
    for stage in (1, 2):
        assert main(["train", *sets(), "--split", str(split), "--out", str(run), "--stage", str(stage),
                     "--no-progress"]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed == json.loads((run / f"stage_{stage}" / "metrics.json").read_text())
        assert sorted(p.name for p in (run / f"stage_{stage}").iterdir() if p.name[0] != ".") == STAGE_FILES
    assert_same_weights(run / "stage_2" / "model.pt", whole() / "stage_2" / "model.pt")
    assert main(["evaluate", *sets(), "--split", str(split), "--stage-dir", str(run / "stage_2"),
                 "--out", str(evaluation)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(p.name for p in evaluation.iterdir()) == [".colam-files", "history.csv", "metrics.json",
                                                            "predictions.csv"]
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert printed["test_acc"] == metrics["test_acc"] == json.loads((whole() / "metrics.json").read_text())["test_acc"]
    assert read_history(evaluation / "history.csv") == read_history(whole() / "history.csv")
    assert "test_per_class_acc" not in printed and set(metrics["test_per_class_acc"]) == {str(d) for d in range(10)}


@pytest.mark.parametrize("args, key", [
    (["train", "--stage", "5"], "--stage: 5"),
    (["train", "--stage", "0"], "--stage: 0"),
    (["train", "--stage", "2", "--set", "method.name=hl"], "--stage: 2"),
    (["train", "--stage", "1", "--split", "{tmp}/missing"], "--split: '{tmp}/missing'"),
    (["train", "--split", "{tmp}/missing"], "--split: '{tmp}/missing'"),
    (["train", "--stage", "2"], "--stage: stage 2 starts from '{tmp}/run/stage_1', which holds no finished stage"),
    (["evaluate", "--stage-dir", "{tmp}/missing"], "stage state: '{tmp}/missing/state.pt' does not exist"),
    (["prepare", "--set", "data.val_fraction=1.5"], "data.val_fraction"),
    (["prepare", "--set", "data.name=nope"], "data.name"),
])
def test_bad_stage_input_exits_2_with_one_line(tmp_path, capsys, args, key):
    args = [a.format(tmp=tmp_path) for a in args]
    out = tmp_path / "run"
    command, rest = args[0], args[1:]
    assert main([command, *sets(), *rest, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"colam: error: {key.format(tmp=tmp_path)}"), err
    assert not out.exists()
