"""What a run folder was trained from (.provenance.json), and `--restart-if-changed`: the DVC
stages keep their outputs (`persist: true`) so that a killed `dvc repro` resumes, and a folder
trained from another config, code or input is then trained afresh, never taken for the new run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from colam import io as cio
from colam import run_folder
from colam.engine import fit, fit_stage
from colam.run_folder import PROVENANCE
from colam.errors import ColamError
from tests.conftest import TINY


def record(folder):
    return json.loads((folder / PROVENANCE).read_text())


def test_a_finished_run_records_what_it_was_trained_from(tiny_config, tmp_path):
    fit(tiny_config(), tmp_path / "run")
    found = record(tmp_path / "run")
    assert found == {**run_folder.provenance(tiny_config(), None), "complete": True}
    assert found["code"] == run_folder.code_digest() and len(found["run"]) == 64
    assert found["run"] == run_folder.run_digest(tiny_config()) == run_folder.run_digest(tiny_config().to_dict())


def test_the_same_run_is_left_alone_and_another_config_trained_afresh(tiny_config, tmp_path, caplog):
    out = tmp_path / "run"
    first = fit(tiny_config(), out, restart_if_changed=True)
    weights = (out / "stage_2" / "model.pt").read_bytes()
    caplog.set_level("INFO", logger="colam")
    assert fit(tiny_config(), out, restart_if_changed=True) == first
    assert "already holds a completed run" in caplog.text and (out / "stage_2" / "model.pt").read_bytes() == weights

    caplog.clear()
    other = fit(tiny_config("seed=1"), out, restart_if_changed=True)
    assert "trained from something else (run changed); training afresh" in caplog.text
    assert other["seed"] == 1 and record(out)["run"] == run_folder.provenance(tiny_config("seed=1"), None)["run"]
    # without the flag a folder of another run is refused, as before
    with pytest.raises(ColamError, match="different configuration"):
        fit(tiny_config(), out)


def test_a_run_of_other_code_or_without_a_record_is_trained_afresh(tiny_config, tmp_path, caplog):
    out = tmp_path / "run"
    fit(tiny_config(), out)
    caplog.set_level("INFO", logger="colam")
    (out / PROVENANCE).write_text(json.dumps({**record(out), "code": "0" * 64}))
    fit(tiny_config(), out, restart_if_changed=True)
    assert "(code changed)" in caplog.text and record(out)["code"] == run_folder.code_digest()

    caplog.clear()
    (out / PROVENANCE).unlink()  # a folder from before provenance was recorded
    fit(tiny_config(), out, restart_if_changed=True)
    assert "no record of what it was trained from" in caplog.text and record(out)["complete"]


def test_a_changed_input_file_is_part_of_what_a_run_was_trained_from(tiny_config, tmp_path, caplog):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.full((10, 10), 0.1, dtype=np.float32))
    config = tiny_config("method.name=fixed", f"method.fixed.labels={labels}")
    out = tmp_path / "run"
    fit(config, out, restart_if_changed=True, inputs={"soft_labels": labels})
    caplog.set_level("INFO", logger="colam")
    np.save(labels, np.eye(10, dtype=np.float32))  # same path, same config, other labels
    fit(config, out, restart_if_changed=True, inputs={"soft_labels": labels})
    assert "(inputs changed); training afresh" in caplog.text


def test_files_colam_did_not_write_are_never_deleted(tiny_config, tmp_path):
    out = tmp_path / "run"
    fit(tiny_config(), out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ColamError, match=r"did not write \(notes.txt\); nothing there is touched"):
        fit(tiny_config("seed=1"), out, restart_if_changed=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint.pt").exists()

    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"x")
    with pytest.raises(ColamError, match=r"did not write \(a.jpg\); nothing there is touched"):
        fit(tiny_config(), other, restart_if_changed=True)
    assert (other / "a.jpg").exists()


def test_a_stage_folder_of_another_run_is_trained_afresh_and_the_same_stage_left_alone(tiny_config, tmp_path,
                                                                                      caplog):
    out = tmp_path / "chain"
    fit_stage(tiny_config(), out, 1)
    cio.atomic_write_bytes(out / "stage_1" / "stale.npy", b"an earlier attempt's file")  # colam's: in its manifest
    fit_stage(tiny_config("seed=1"), out, 1)  # another run: the folder is emptied first
    assert not (out / "stage_1" / "stale.npy").exists()
    assert record(out / "stage_1") == {**run_folder.provenance(tiny_config("seed=1"), None), "complete": True}
    caplog.set_level("INFO", logger="colam")
    mtime = (out / "stage_1" / "model.pt").stat().st_mtime_ns
    fit_stage(tiny_config("seed=1"), out, 1)
    assert "already holds stage 1 of this run; nothing to do" in caplog.text
    assert (out / "stage_1" / "model.pt").stat().st_mtime_ns == mtime
    # stage 2 records the stage it starts from: retraining stage 1 differently changes stage 2's inputs
    fit_stage(tiny_config("seed=1"), out, 2)
    assert set(record(out / "stage_2")["inputs"]["previous_stage"]) == {"model.pt", "state.pt"}


def test_train_stage_into_a_whole_run_folder_is_refused_and_deletes_nothing(tiny_config, tmp_path):
    out = tmp_path / "run"
    fit(tiny_config(), out)
    before = sorted(p.name for p in (out / "stage_2").iterdir())
    with pytest.raises(ColamError, match=r"\(training run, not folder of stages\)"):
        fit_stage(tiny_config(), out, 2)
    assert sorted(p.name for p in (out / "stage_2").iterdir()) == before


def test_the_flag_reaches_fit_from_the_command_line(tmp_path, capsys):
    from pipelines.cli import main

    sets = [a for item in TINY for a in ("--set", item)]
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *sets]) == 0
    assert main(["train", "--out", str(out), *sets, "--set", "seed=1"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert main(["train", "--out", str(out), *sets, "--set", "seed=1", "--restart-if-changed"]) == 0
    assert record(out)["complete"] and json.loads((out / "metrics.json").read_text())["seed"] == 1


def test_bad_input_under_the_flag_is_refused_before_the_earlier_run_is_deleted(tiny_config, tmp_path):
    out = tmp_path / "run"
    fit(tiny_config(), out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ColamError, match="data.train_subset"):  # 5 samples cannot cover the 10 classes
        fit(tiny_config("data.train_subset=5"), out, restart_if_changed=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_folder_left_by_a_kill_in_the_first_write_or_in_a_deletion_is_trained(tiny_config, tmp_path):
    out = tmp_path / "run"
    # killed writing the run's first file: its name was recorded before its temporary was made
    cio.take_folder(out, "training run")
    cio.expect(out, ["config.yaml"])
    (out / ".config.yaml.colam-k1ll3d00.tmp").write_text("half a config")
    assert fit(tiny_config(), out, restart_if_changed=True)["seed"] == 0
    assert not list(out.glob(".*.tmp"))

    # a deletion of the folder is a rename aside first: a kill leaves the renamed folder, no half run
    aside = tmp_path / ".run.deleting.tmp"
    cio.take_folder(aside, "training run")
    cio.atomic_write_bytes(aside / "stage_1" / "model.pt", b"half deleted")
    assert fit(tiny_config("seed=1"), out, restart_if_changed=True)["seed"] == 1
    assert not aside.exists() and record(out)["complete"]
    aside.mkdir()  # a folder of that name without colam's manifest is someone else's: left alone
    (aside / "mine.txt").write_text("mine")
    with pytest.raises(ColamError, match=r"deleting.tmp', where it is moved to be deleted, holds what colam did not"):
        fit(tiny_config("seed=2"), out, restart_if_changed=True)
    assert (aside / "mine.txt").read_text() == "mine" and record(out)["complete"]


def test_an_out_that_links_to_the_run_is_trained_afresh_and_keeps_its_link(tiny_config, tmp_path):
    target, link = tmp_path / "real" / "run", tmp_path / "link"
    fit(tiny_config(), target)
    link.symlink_to(target)
    assert fit(tiny_config("seed=1"), link, restart_if_changed=True)["seed"] == 1
    assert link.is_symlink() and record(target)["complete"] and record(target)["run"] == record(link)["run"]


def test_a_stage_folder_holding_a_file_colam_did_not_write_is_refused_and_kept(tiny_config, tmp_path):
    out = tmp_path / "chain"
    fit_stage(tiny_config(), out, 1)
    (out / "stage_1" / "notes.txt").write_text("mine")
    with pytest.raises(ColamError, match=r"stage_1' holds what colam did not write \(notes.txt\); nothing there "
                                         r"is touched"):
        fit_stage(tiny_config("seed=1"), out, 1)
    assert (out / "stage_1" / "notes.txt").read_text() == "mine" and (out / "stage_1" / "model.pt").exists()
    # the same for a whole run's stage folders under --restart-if-changed
    run = tmp_path / "run"
    fit(tiny_config(), run)
    (run / "stage_2" / "plot.png").write_bytes(b"mine")
    with pytest.raises(ColamError, match=r"did not write \(stage_2/plot.png\)"):
        fit(tiny_config("seed=1"), run, restart_if_changed=True)
    assert (run / "stage_2" / "plot.png").exists() and (run / "checkpoint.pt").exists()
