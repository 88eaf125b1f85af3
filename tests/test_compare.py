import argparse
import json

import matplotlib.image
import mlflow
import numpy as np
import pytest

from colam.errors import ColamError
from pipelines import compare


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # One store for the module: creating a sqlite store runs the migrations (seconds).
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}")


@pytest.fixture
def exp(client, request):
    """A fresh experiment per test; returns (name, add) where add(...) logs one run."""
    name = request.node.name
    exp_id = client.create_experiment(name)
    clock = iter(range(1_000, 10**9, 1_000))

    def add(method, seed, acc, *, T=None, variant=None, val=None, protocol="aaaaaaaaaaaa",
            status="FINISHED", role="parent", start=None):
        tags = {"colam.role": role, "colam.method": method, "colam.variant": variant or method,
                "colam.seed": str(seed), "colam.protocol": protocol}
        if T is not None:
            tags["colam.temperature"] = str(float(T))
        run_id = client.create_run(exp_id, start_time=start or next(clock), tags=tags).info.run_id
        client.log_metric(run_id, "test_acc", acc)
        client.log_metric(run_id, "val_acc", acc - 0.01 if val is None else val)
        client.log_metric(run_id, "wall_time_s", 12.5)
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    return name, add


def _rows(comparison):
    return {(r.variant, r.temperature): r for r in comparison.rows}


def test_mean_and_std_are_numpy_sample_statistics(client, exp):
    name, add = exp
    hl = [0.8125, 0.8431, 0.7902]
    col = [0.851, 0.862]
    for seed, acc in enumerate(hl):
        add("hl", seed, acc)
    for seed, acc in enumerate(col):
        add("colam", seed, acc, T=2, variant="colam(m=4)")
    add("colam", 0, 0.84, T=0.5, variant="colam(m=4)")

    c = compare.collect(client, name)
    rows = _rows(c)
    assert rows["hl", None].test_acc.mean == np.mean(hl)
    assert rows["hl", None].test_acc.std == np.std(hl, ddof=1)
    assert (rows["hl", None].test_acc.min, rows["hl", None].test_acc.max) == (min(hl), max(hl))
    assert rows["hl", None].seeds == (0, 1, 2) and rows["hl", None].n == 3
    assert rows["colam(m=4)", 2.0].test_acc.std == np.std(col, ddof=1)
    single = rows["colam(m=4)", 0.5]
    assert (single.n, single.test_acc.std, single.val_acc.mean) == (1, 0.0, pytest.approx(0.83))
    assert c.runs_used == 6 and c.protocol == "aaaaaaaaaaaa"


def test_the_best_run_has_the_highest_validation_accuracy_the_earliest_of_a_tie_and_never_nan(client, exp):
    name, add = exp
    add("colam", 1, 0.90, T=1, val=float("nan"))  # logged by hand or by a foreign tool: no score, even looked at first
    add("hl", 0, 0.90, val=0.95)
    earliest_of_tie = add("ls", 0, 0.90, val=0.97)
    add("ls", 1, 0.90, val=0.97)
    replaced = add("colam", 0, 0.90, T=1, val=0.99)
    add("colam", 0, 0.90, T=1, val=0.50)  # the re-run of the same variant, T and seed replaces the run above
    best = compare.collect(client, name, protocol="aaaaaaaaaaaa").best_run
    assert best == earliest_of_tie and best != replaced


def test_rows_are_sorted_by_method_order_then_variant_then_temperature(client, exp):
    name, add = exp
    for method, variant, T in [("colam", "colam", 1), ("zeta", "zeta", None), ("ls", "ls(eps=0.2)", None),
                               ("colam", "colam", 0.5), ("cp", "cp", None), ("ls", "ls(eps=0.1)", None),
                               ("hl", "hl", None), ("disturblabel", "disturblabel", None), ("alpha", "alpha", 4)]:
        add(method, 0, 0.5, T=T, variant=variant)
    order = [(r.variant, r.temperature) for r in compare.collect(client, name).rows]
    assert order == [("hl", None), ("ls(eps=0.1)", None), ("ls(eps=0.2)", None), ("cp", None),
                     ("disturblabel", None), ("alpha", 4.0), ("zeta", None), ("colam", 0.5), ("colam", 1.0)]


def test_latest_run_replaces_an_older_one_of_the_same_variant_temperature_and_seed(client, exp):
    name, add = exp
    add("colam", 0, 0.70, T=2, start=5_000)
    newer = add("colam", 0, 0.90, T=2, start=9_000)
    add("colam", 0, 0.60, T=2, start=7_000)
    add("colam", 0, 0.50, T=4, start=1_000)  # another temperature: its own result

    c = compare.collect(client, name)
    row = _rows(c)["colam", 2.0]
    assert (row.n, row.test_acc.mean, row.run_ids) == (1, 0.90, (newer,))
    assert _rows(c)["colam", 4.0].test_acc.mean == 0.50
    assert (c.runs_used, c.replaced_runs) == (2, 2)


def test_running_failed_and_stage_runs_are_ignored(client, exp):
    name, add = exp
    add("hl", 0, 0.80)
    add("hl", 1, 0.10, status="RUNNING")
    add("hl", 2, 0.10, status="FAILED")
    add("hl", 3, 0.10, status="KILLED")
    add("hl", 4, 0.10, role="stage")

    row = _rows(compare.collect(client, name))["hl", None]
    assert (row.n, row.seeds, row.test_acc.mean) == (1, (0,), 0.80)


def test_other_protocols_are_left_out_by_default_and_can_be_chosen(client, exp):
    name, add = exp
    add("hl", 0, 0.50, protocol="old000000000")
    add("hl", 1, 0.52, protocol="old000000000")
    add("hl", 0, 0.80, protocol="new000000000")

    latest = compare.collect(client, name)
    assert (latest.protocol, latest.runs_used, latest.other_protocol_runs) == ("new000000000", 1, 2)
    assert _rows(latest)["hl", None].test_acc.mean == 0.80
    assert "2 runs of other protocols left out" in compare.format_table(latest)

    old = compare.collect(client, name, protocol="old000000000")
    assert (old.protocol, old.runs_used, old.other_protocol_runs) == ("old000000000", 2, 1)
    assert _rows(old)["hl", None].test_acc.mean == pytest.approx(0.51)


def test_filters_by_seed_method_and_temperature(client, exp):
    name, add = exp
    for seed in range(3):
        add("hl", seed, 0.80 + seed / 100)
        add("ls", seed, 0.81, variant="ls(eps=0.1)")
        for T in (1, 2, 4):
            add("colam", seed, 0.82, T=T)

    by_seed = compare.collect(client, name, seeds=[0, 2])
    assert {r.seeds for r in by_seed.rows} == {(0, 2)}
    assert _rows(by_seed)["hl", None].test_acc.mean == pytest.approx(0.81)

    by_method = compare.collect(client, name, methods=["colam", "ls"])
    assert {r.method for r in by_method.rows} == {"colam", "ls"}

    by_t = compare.collect(client, name, temperatures=[1, 4])
    assert set(_rows(by_t)) == {("hl", None), ("ls(eps=0.1)", None), ("colam", 1.0), ("colam", 4.0)}


def test_search_follows_page_tokens(client, exp, monkeypatch):
    name, add = exp
    for seed in range(5):
        add("hl", seed, 0.8)
    monkeypatch.setattr(compare, "_PAGE_SIZE", 2)
    assert compare.collect(client, name).rows[0].n == 5


def test_write_produces_a_png_a_markdown_table_and_a_json_summary(client, exp, tmp_path):
    name, add = exp
    for seed, acc in enumerate([0.8, 0.9]):
        add("hl", seed, acc, val=0.7)
        add("ls", seed, acc - 0.05, variant="ls(eps=0.1)")
        for T in (0.5, 1, 2, 4, 8):
            add("colam", seed, acc + T / 100, T=T, variant="colam(m=4, peers=all)")
    add("cp", 0, 0.845)

    c = compare.collect(client, name)
    paths = compare.write(c, tmp_path / "out")

    png = paths["plot"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert matplotlib.image.imread(paths["plot"]).ndim == 3

    table = paths["table"].read_text(encoding="utf-8")
    assert table == compare.format_table(c)
    assert "| hl | – | 85.00 ± 7.07 | 2 | 70.00 ± 0.00 |" in table
    assert "| colam(m=4, peers=all) | 0.5 | 85.50 ± 7.07 | 2 |" in table
    assert "| cp | – | 84.50 ± 0.00 | 1* | 83.50 ± 0.00 |" in table
    assert "- n = 1*: a single seed" in table

    summary = json.loads(paths["summary"].read_text())
    assert (summary["experiment"], summary["protocol"], summary["runs_used"]) == (name, c.protocol, 15)
    assert summary["runs_left_out"] == {"other_protocol": 0, "replaced": 0, "incomplete": 0}
    hl = next(r for r in summary["rows"] if r["variant"] == "hl")
    assert hl["temperature"] is None and hl["seeds"] == [0, 1] and hl["test_acc"]["mean"] == pytest.approx(0.85)
    assert not [p for p in paths["plot"].parent.iterdir() if p.name.endswith(".tmp")]  # no temporaries left


def test_missing_experiment_is_an_error_naming_experiment(client):
    with pytest.raises(ColamError, match=r"^--experiment: no experiment named 'nope' in the tracking store 'sqlite:"):
        compare.collect(client, "nope")


def test_no_matching_runs_is_an_error_naming_experiment_and_the_filters(client, exp):
    name, add = exp
    with pytest.raises(ColamError, match=r"^--experiment: no finished runs .* match \(no filters\)"):
        compare.collect(client, name)
    add("hl", 0, 0.8, protocol="abcabcabcabc")
    with pytest.raises(ColamError, match=r"^--experiment: .*--seeds 7, --methods ls"):
        compare.collect(client, name, seeds=[7], methods=["ls"])
    with pytest.raises(ColamError, match=r"--protocol 0123.*protocols present: abcabcabcabc"):
        compare.collect(client, name, protocol="0123")


def test_run_prints_the_table_and_writes_the_files(client, exp, tmp_path, capsys):
    name, add = exp
    add("hl", 0, 0.8)
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    args = parser.parse_args(["--experiment", name, "--seeds", "0", "--temperatures", "2", "--out", str(tmp_path)])
    assert compare.run(args, client) == 0
    out, err = capsys.readouterr()
    assert "| hl | – | 80.00 ± 0.00 | 1* |" in out
    assert str(tmp_path / "table.md") in err
    assert {p.name for p in tmp_path.iterdir()} == {".colam-files", "table.md", "summary.json", "metrics.json",
                                                    "accuracy_vs_temperature.png"}


def test_an_interrupted_write_keeps_the_previous_files_whole(client, exp, tmp_path, monkeypatch):
    name, add = exp
    add("hl", 0, 0.8)
    c = compare.collect(client, name)
    before = {p.name: p.read_bytes() for p in compare.write(c, tmp_path).values()}

    def crash(comparison):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "temperature_figure", crash)
    with pytest.raises(KeyboardInterrupt):
        compare.write(c, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".colam-files"} == before


def test_the_logged_temperature_of_the_runs_own_method_wins_over_the_tag(client, exp):
    name, add = exp
    client.log_param(add("kd", 0, 0.8, T=2, variant="kd(alpha=0.9)"), "method.kd.temperature", "8.0")
    assert [(row.variant, row.temperature) for row in compare.collect(client, name).rows] == [("kd(alpha=0.9)", 8.0)]
    client.log_param(add("kd", 1, 0.8, T=2), "method.kd.temperature", "hot")
    with pytest.raises(ColamError, match=r"^--experiment: a run has parameter method.kd.temperature='hot', expected a "
                                         r"number"):
        compare.collect(client, name)


def test_two_kd_runs_of_one_seed_at_two_temperatures_are_two_rows(client, tmp_path, monkeypatch):
    """Tracked by `colam train --track` as a user would: each run keyed by its own method's T (issue 17:
    they were both tagged with COLAM's T, so one silently replaced the other)."""
    import yaml

    from colam.config import load_config
    from pipelines import cli
    from tests.conftest import TINY

    teacher = tmp_path / "teacher.npy"
    np.save(teacher, np.full((10, 10), 0.1 / 9) + np.eye(10) * (0.9 - 0.1 / 9))  # the digits' 10 classes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    # made here, with its artifacts in tmp_path: the module's store would put them in ./mlruns of the checkout
    client.create_experiment("kd-temperatures", artifact_location=(tmp_path / "artifacts").as_uri())
    for t in (4, 8):
        config = load_config(None, TINY + ["train.epochs=1", "method.name=kd", f"method.kd.teacher={teacher}",
                                           f"method.kd.temperature={t}"])
        (tmp_path / "kd.yaml").write_text(yaml.safe_dump(config.to_dict()))
        assert cli.main(["train", "--config", str(tmp_path / "kd.yaml"), "--out", str(tmp_path / f"kd-T{t}"),
                         "--track", "--experiment", "kd-temperatures"]) == 0

    comparison = compare.collect(client, "kd-temperatures")
    assert [(row.method, row.temperature, row.n) for row in comparison.rows] == [("kd", 4.0, 1), ("kd", 8.0, 1)]
    assert (comparison.runs_used, comparison.replaced_runs) == (2, 0)
    table = compare.format_table(comparison)
    assert "| 4 |" in table and "| 8 |" in table and "replaced" not in table
