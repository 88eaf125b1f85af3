"""The numbers behind the analyses' figures, against hand computations on tiny inputs, and the
`colam analyze` commands on a tiny finished run (the DVC test runs them end to end)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from colam.analysis import geometry as geo
from colam.analysis.expected import expected_accuracy, labelled_stages
from colam.analysis.structure import default_classes, nearest_classes, resolve_classes, similarity
from colam.config import load_config
from colam.data import build_data, loader
from colam.engine import fit, fit_stage
from colam.errors import ColamError
from colam.methods import METHODS
from colam.models import build_model
from colam.runs import final_network, history, open_run
from tests.conftest import TINY

SQRT2 = math.sqrt(2)


# ----------------------------------------------------------------------------- geometry by hand


def test_template_distances_are_between_the_normalised_templates():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-5.0, 0.0]])  # unit: (0.6, 0.8), (0, 1), (-1, 0)
    d = geo.template_distances(w)
    expected = torch.tensor([[0.0, math.sqrt(0.4), math.sqrt(3.2)],
                             [math.sqrt(0.4), 0.0, SQRT2],
                             [math.sqrt(3.2), SQRT2, 0.0]], dtype=torch.float64)
    assert torch.allclose(d, expected, atol=1e-6)


def feats(values, labels):
    return geo.Features(torch.tensor(values, dtype=torch.float64), torch.tensor(labels))


def test_average_distance_from_templates_to_each_class_uses_normalised_vectors():
    # class 0 samples point along x (lengths 2 and 5), class 1 along y; templates along x and y (any length)
    f = feats([[2.0, 0.0], [5.0, 0.0], [0.0, 3.0]], [0, 0, 1])
    w = torch.tensor([[7.0, 0.0], [0.0, 0.5]])
    adt = geo.average_distances(w, f, [0, 1])
    # row i = template i, column j = samples of class j: 0 to its own, sqrt(2) across
    assert torch.allclose(adt, torch.tensor([[0.0, SQRT2], [SQRT2, 0.0]], dtype=torch.float64))


def test_centroid_is_the_normalised_mean_of_normalised_samples_and_adc_averages_over_samples():
    f = feats([[1.0, 0.0], [0.0, 4.0], [-2.0, 0.0]], [0, 0, 1])
    c = geo.centroids(f, [0, 1])
    # class 0: mean of (1, 0) and (0, 1) is (0.5, 0.5), normalised (1/sqrt2, 1/sqrt2); class 1: (-1, 0)
    assert torch.allclose(c, torch.tensor([[1 / SQRT2, 1 / SQRT2], [-1.0, 0.0]], dtype=torch.float64))
    adc = geo.average_distances(c, f, [0, 1])
    own = math.dist((1 / SQRT2, 1 / SQRT2), (1, 0))  # the same to (1, 0) and to (0, 1)
    to_other = math.dist((1 / SQRT2, 1 / SQRT2), (-1, 0))
    from_1 = (math.dist((-1, 0), (1, 0)) + math.dist((-1, 0), (0, 1))) / 2
    assert torch.allclose(adc, torch.tensor([[own, to_other], [from_1, 0.0]], dtype=torch.float64))


def test_projection_basis_is_gram_schmidt_on_the_template_differences():
    w = torch.eye(3, dtype=torch.float64)  # three unit templates in 3-D
    plane = geo.template_plane(w)
    assert torch.allclose(plane.origin, torch.full((3,), 1 / 3, dtype=torch.float64))
    e1 = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64) / SQRT2
    e2 = torch.tensor([-0.5, -0.5, 1.0], dtype=torch.float64) / math.sqrt(1.5)
    assert torch.allclose(plane.basis, torch.stack([e1, e2], dim=1))
    assert torch.allclose(plane.basis.T @ plane.basis, torch.eye(2, dtype=torch.float64))
    projected = plane.project(w)
    # the templates lie in the plane: their pairwise distances survive the projection
    assert torch.allclose(torch.cdist(projected, projected), torch.cdist(w, w))
    assert torch.allclose(projected.mean(dim=0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    # the plane's normal (1, 1, 1) is dropped: a point off the plane lands on the origin's coordinates
    assert torch.allclose(plane.project(plane.origin + 3 * torch.ones(1, 3, dtype=torch.float64)),
                          torch.zeros(1, 2, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("w, message", [
    ([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "identical"),
    ([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], "on one line"),
])
def test_templates_that_span_no_plane_are_refused(w, message):
    with pytest.raises(ColamError, match=message):
        geo.template_plane(torch.tensor(w))


def test_features_times_the_templates_plus_bias_are_the_logits():
    model = build_model("small_cnn", 10, in_channels=1, width=8)
    images = torch.randn(6, 1, 8, 8)
    f = geo.features(model, [(images, torch.arange(6), torch.arange(6))])
    logits = f.values @ geo.templates(model).T + model.fc.bias.double()
    assert torch.allclose(logits, model.eval()(images).double(), atol=1e-5)
    assert f.labels.tolist() == list(range(6))


# ----------------------------------------------------------------------------- soft-label structure


S = np.array([[0.70, 0.05, 0.20, 0.05],
              [0.10, 0.80, 0.05, 0.05],
              [0.25, 0.05, 0.65, 0.05],
              [0.10, 0.10, 0.10, 0.70]])


def test_nearest_classes_rank_the_off_diagonal_mass_with_ties_to_the_lower_index():
    near = nearest_classes(S, 2)
    assert near[0] == [(2, 0.20), (1, 0.05)]  # 1 and 3 tie at 0.05: the lower index first
    assert near[2] == [(0, 0.25), (1, 0.05)]
    assert near[3] == [(0, 0.10), (1, 0.10)]
    assert len(nearest_classes(S, 10)[1]) == 3  # at most C - 1


def test_default_classes_are_the_most_similar_pair_and_the_least_similar_to_both():
    sym = similarity(S)
    assert sym[0, 2] == pytest.approx(0.225) and np.all(np.diag(sym) == 0)
    # (0, 2) is the closest pair; to both: class 1 has 0.075 + 0.05, class 3 has 0.075 + 0.075
    assert default_classes(S) == [0, 2, 1]


def test_classes_are_resolved_by_name_or_index():
    names = ["man", "palm_tree", "pine_tree", "rose"]
    assert resolve_classes(["man", "palm_tree", "pine_tree"], names) == [0, 1, 2]
    assert resolve_classes([3, "man", 2], names) == [3, 0, 2]
    for chosen, message in ((["man", "palm_tree"], "exactly 3"), (["man", "man", "rose"], "twice"),
                            (["man", "oak", "rose"], "no class named 'oak'"), ([0, 1, 9], "out of range")):
        with pytest.raises(ColamError, match=f"^analysis.classes: .*{message}"):
            resolve_classes(chosen, names)


# ----------------------------------------------------------------------------- expected accuracy


def test_fixed_labels_loss_is_colams_eq4_and_hard_cross_entropy_for_the_identity(tmp_path):
    np.save(tmp_path / "eye.npy", np.eye(10, dtype=np.float32))
    config = load_config(None, TINY + ["method.name=fixed", f"method.fixed.labels={tmp_path / 'eye.npy'}"])
    data = build_data(config.data)
    method = METHODS["fixed"](config, 10, data.train_targets)
    method.attach_data(data)
    logits, targets = torch.randn(5, 10), torch.tensor([0, 3, 3, 9, 1])
    assert torch.allclose(method.loss(logits, targets, None, 1), F.cross_entropy(logits, targets))
    soft = torch.softmax(torch.randn(10, 10), dim=1)
    np.save(tmp_path / "soft.npy", soft.numpy())
    config = load_config(None, TINY + ["method.name=fixed", f"method.fixed.labels={tmp_path / 'soft.npy'}",
                                       "method.fixed.temperature=2"])
    method = METHODS["fixed"](config, 10, data.train_targets)
    method.attach_data(data)
    eq4 = -(soft[targets] * F.log_softmax(logits / 2, dim=1)).sum(dim=1).mean()
    assert torch.allclose(method.loss(logits, targets, None, 1), eq4, atol=1e-6)


@pytest.fixture(scope="module")
def colam_run(tmp_path_factory):
    """A tiny COLAM run of 2 stages, trained stage by stage (no config.yaml: the DVC chain's layout)."""
    root = tmp_path_factory.mktemp("analysis")
    config = load_config(None, TINY + ["train.epochs=4", "method.colam.stages=2", "method.colam.epochs_per_stage=2"])
    for stage in (1, 2):
        fit_stage(config, root / "colam", stage, progress=False)
    fit(load_config(None, TINY + ["train.epochs=4", "method.name=hl"]), root / "hl", progress=False)
    fit(load_config(None, TINY + ["train.epochs=4", "method.name=ls"]), root / "ls", progress=False)
    return root


def test_a_stage_by_stage_run_opens_with_the_config_of_its_last_stage(colam_run):
    run = open_run(colam_run / "colam", "--run")
    assert run.config.method.name == "colam" and run.config.method.colam.stages == 2
    assert [d.name for d in run.stage_dirs] == ["stage_1", "stage_2"]
    assert [r["epoch"] for r in history(run)] == [1, 2, 3, 4]
    assert [k for k, _ in labelled_stages(run)] == [1, 2]
    with pytest.raises(ColamError, match="^--run: .* saved no soft labels"):
        labelled_stages(open_run(colam_run / "hl", "--run"))


def test_expected_accuracy_trains_a_fresh_model_on_each_stages_labels(colam_run, tmp_path):
    run = open_run(colam_run / "colam", "--run")
    rows = expected_accuracy(run, tmp_path / "expected", progress=False)
    assert [r["stage"] for r in rows] == [1, 2]
    for row in rows:
        labels = colam_run / "colam" / f"stage_{row['stage']}" / "soft_labels.npy"
        # the same as training that fixed matrix directly, with the run's own settings and T
        direct = fit(load_config(None, TINY + ["train.epochs=4", "method.name=fixed", f"method.fixed.labels={labels}",
                                               "method.fixed.temperature=2.0"]),
                     tmp_path / f"direct_{row['stage']}", progress=False)
        assert row["expected_test_acc"] == direct["test_acc"]
        assert row["run_test_acc_at_stage_end"] == json.loads(
            (colam_run / "colam" / f"stage_{row['stage']}" / "metrics.json").read_text())["test_acc"]


def test_expected_accuracy_refuses_a_finished_result_of_other_labels(colam_run, tmp_path):
    copy = tmp_path / "colam"
    shutil.copytree(colam_run / "colam", copy)
    expected_accuracy(open_run(copy, "--run"), tmp_path / "expected", progress=False)
    labels = copy / "stage_1" / "soft_labels.npy"
    np.save(labels, np.roll(np.load(labels), 1, axis=1))  # the run was trained again
    with pytest.raises(ColamError, match="^--out: .*stage_1' holds a run trained on other soft labels"):
        expected_accuracy(open_run(copy, "--run"), tmp_path / "expected", progress=False)


def test_final_network_of_a_run_gives_its_test_accuracy(colam_run):
    run = open_run(colam_run / "hl", "--run")
    data = build_data(run.config.data)
    model = final_network(run, data.num_classes, data.in_channels, "--run")
    logits = torch.cat([model(x) for x, *_ in loader(data.test, 256, shuffle=False, num_workers=0)])
    accuracy = (logits.argmax(1) == torch.as_tensor(data.test.targets)).double().mean().item()
    assert accuracy == pytest.approx(history(run)[-1]["test_acc"], abs=1e-6)  # history.csv keeps 6 decimals


# ----------------------------------------------------------------------------- the commands


def colam(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})


def test_geometry_command_writes_the_hand_checkable_numbers(colam_run, tmp_path):
    out = tmp_path / "geometry"
    result = colam("analyze", "geometry", "--run", str(colam_run / "colam"), "--baselines", f"hl={colam_run / 'hl'}",
                   f"ls={colam_run / 'ls'}", "--set", "analysis.samples_per_class=5", "--out", str(out), "--no-track",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["runs"]) == ["hl", "ls", "COLAM (T=2)"]
    assert results["samples"] == {"train": 15, "test": 15}
    run = open_run(colam_run / "colam", "--run")
    soft = np.load(colam_run / "colam" / "stage_2" / "soft_labels.npy")
    assert results["class_indices"] == default_classes(soft)
    data = build_data(run.config.data)
    model = final_network(run, 10, 1, "--run")
    w = geo.templates(model)[results["class_indices"]]
    entry = results["runs"]["COLAM (T=2)"]
    unit = (w / w.norm(dim=1, keepdim=True)).numpy()
    assert entry["template_distance_average"] == pytest.approx(
        np.mean([np.linalg.norm(unit[i] - unit[j]) for i, j in ((0, 1), (0, 2), (1, 2))]))
    basis = np.array(entry["projection"]["basis"])
    assert np.allclose(basis @ basis.T, np.eye(2))
    # the first basis vector is along w_b - w_a
    along = (w[1] - w[0]).numpy() / np.linalg.norm((w[1] - w[0]).numpy())
    assert np.allclose(basis[0], along)
    assert data.classes[results["class_indices"][0]] == results["classes"][0]
    for name in ("projection.png", "distances_train.png", "distances_test.png", "table.md"):
        assert (out / name).stat().st_size > 0
    assert "Table 5" in (out / "table.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--baselines", "hl"], "--baselines: 'hl' is not of the form NAME=DIR"),
    (["--baselines", "hl=/nowhere"], "--baselines hl: '/nowhere' does not exist"),
    (["--set", "analysis.classes=[0, 1]"], "analysis.classes: .*must list exactly 3 classes"),
    (["--set", "analysis.classes=[0, 1, zebra]"], "analysis.classes: no class named 'zebra'"),
])
def test_bad_analysis_input_exits_2_with_one_line(colam_run, tmp_path, args, message):
    out = tmp_path / "out"
    result = colam("analyze", "geometry", "--run", str(colam_run / "colam"), "--out", str(out), "--no-track", *args,
                   cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert __import__("re").search(message, result.stderr), result.stderr
    assert not out.exists()


def test_soft_labels_and_curves_commands(colam_run, tmp_path):
    result = colam("analyze", "soft-labels", "--run", str(colam_run / "colam"), "--set", "analysis.nearest=2",
                   "--out", str(tmp_path / "soft"), "--no-track", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "soft" / "results.json").read_text())
    final = np.load(colam_run / "colam" / "stage_2" / "soft_labels.npy")
    near = nearest_classes(final, 2)
    assert results["stages"]["2"]["nearest"]["3"] == [{"class": str(j), "mass": pytest.approx(m)} for j, m in near[3]]
    assert results["stages"]["2"]["own_mass_mean"] == pytest.approx(float(np.diag(final).mean()))

    result = colam("analyze", "curves", "--run", str(colam_run / "colam"), "--baselines", f"hl={colam_run / 'hl'}",
                   "--out", str(tmp_path / "curves"), "--no-track", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    curves = json.loads((tmp_path / "curves" / "results.json").read_text())
    assert curves["stage_ends"] == [2, 4]
    assert curves["runs"]["hl"]["test_acc"] == [r["test_acc"] for r in history(open_run(colam_run / "hl", "--run"))]


# ----------------------------------------------------------------------------- the figures are readable


def test_every_figure_has_a_title_labelled_axes_and_legends():
    from pipelines import figures

    rows = [{"epoch": e, "train_acc": 0.5, "test_acc": 0.4} for e in (1, 2, 3, 4)]
    expected = [{"stage": k, "expected_test_acc": 0.5, "run_test_acc_at_stage_end": 0.4} for k in (1, 2)]
    panel = {"points": [[0, 0], [1, 1], [2, 0]], "labels": [0, 1, 2], "templates": [[0, 1], [1, 0], [2, 2]]}
    table = [[0.1, 0.2, 0.3]] * 3
    built = [
        figures.learning_curves({"a": rows, "b": rows}, [2, 4], "curves"),
        figures.expected_accuracy(expected, {"hl": 0.3}, "expected"),
        figures.projections({"hl": {"train": panel}, "ls": {"train": panel}}, ["x", "y", "z"], "projection"),
        figures.average_distances({"hl": {"template": table, "centroid": table}}, ["x", "y", "z"], "distances"),
        figures.soft_labels_by_stage({1: S, 2: S}, ["a", "b", "c", "d"], 1.0),
        figures.grid_heatmap(np.array([[0.5, np.nan]]), np.array([[1, 0]]), [5], [1, "all"], "grid"),
    ]
    for figure in built:
        plots = [a for a in figure.axes if a.get_label() != "<colorbar>"]
        assert plots
        for axes in plots:
            assert axes.get_xlabel() and axes.get_ylabel() and axes.get_title()
    for figure in built[:4]:  # several series: a legend says which is which
        assert any(a.get_legend() is not None for a in figure.axes)


# ----------------------------------------------------------------------------- the grid, read back from MLflow


def test_a_grid_cell_sets_the_interval_the_stage_count_and_the_peers():
    from pipelines.grid import cell_config, parse_peers

    config = load_config(None, TINY + ["train.epochs=12", "method.colam.stages=4", "method.colam.epochs_per_stage=3"])
    cell = cell_config(config, 6, parse_peers("2", "--peers"))
    assert (cell.method.colam.stages, cell.method.colam.epochs_per_stage, cell.method.colam.peers) == (2, 6, 2)
    assert cell.train == config.train and cell.method.colam.temperature == config.method.colam.temperature
    assert parse_peers("all", "--peers") == "all"
    with pytest.raises(ColamError, match="^--epochs-per-stage: must divide train.epochs \\(12\\)"):
        cell_config(config, 5, "all")
    for text in ("0", "some"):
        with pytest.raises(ColamError, match="^--peers: must be 'all' or an integer >= 1"):
            parse_peers(text, "--peers")


def test_collect_grid_fills_each_cell_from_its_runs_and_marks_the_missing_ones(tmp_path):
    from mlflow import MlflowClient

    from pipelines.grid import cell_config, collect_grid
    from pipelines.params import load_params
    from pipelines.tracking import protocol_digest, variant

    (tmp_path / "params.yaml").write_text(
        "data: {name: digits, train_subset: 200}\ntrain: {epochs: 12}\nmodel: {name: small_cnn}\n"
        "method: {name: colam, colam: {stages: 4, epochs_per_stage: 3, temperature: 1.0}}\n"
        "compare: {baselines: [hl, ls], temperatures: [1.0], seeds: [0]}\n"
        "analysis: {grid: {epochs_per_stage: [3, 6], peers: [1, all]}}\ntracking: {experiment: grid}\n")
    params = load_params(tmp_path / "params.yaml")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("grid")

    def finished(config, test_acc, temperature="1.0", seed="0"):
        tags = {"colam.role": "parent", "colam.method": config.method.name, "colam.variant": variant(config),
                "colam.seed": seed, "colam.protocol": protocol_digest(config)}
        if config.method.name == "colam":
            tags["colam.temperature"] = temperature
        run = client.create_run(experiment, tags=tags)
        client.log_metric(run.info.run_id, "test_acc", test_acc)
        client.set_terminated(run.info.run_id)

    with pytest.raises(ColamError, match="no finished runs"):
        collect_grid(client, "grid", params)
    finished(cell_config(params.config, 3, 1), 0.50)
    finished(cell_config(params.config, 6, "all"), 0.70)
    finished(cell_config(params.config, 6, "all"), 0.90, temperature="2.0")  # another T: not this grid
    finished(cell_config(params.config, 6, "all"), 0.10, seed="1")  # another seed: not this grid
    hl = load_config(None, ["data.name=digits", "data.train_subset=200", "train.epochs=12", "model.name=small_cnn",
                            "method.name=hl"])
    finished(hl, 0.60)
    found = collect_grid(client, "grid", params)
    assert found.values[0, 0] == 0.50 and found.values[1, 1] == 0.70
    assert np.isnan(found.values[0, 1]) and np.isnan(found.values[1, 0])
    assert found.counts.tolist() == [[1, 0], [0, 1]]
    # the temperature curve: the baselines and COLAM at the run's own interval and peers (none here)
    assert [row.method for row in found.temperature.rows] == ["hl"]


def test_expected_accuracy_command_one_stage_then_the_figure(colam_run, tmp_path):
    runs = tmp_path / "expected"
    result = colam("analyze", "expected-accuracy", "--run", str(colam_run / "colam"), "--runs-out", str(runs),
                   "--stage", "2", "--no-track", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["stage"] == 2
    assert not (runs / "stage_1").exists() and (runs / "stage_2" / "metrics.json").exists()
    result = colam("analyze", "expected-accuracy", "--run", str(colam_run / "colam"), "--runs-out", str(runs),
                   "--baselines", f"hl={colam_run / 'hl'}", "--out", str(tmp_path / "out"), "--no-track",
                   "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["stages"]
    assert [r["stage"] for r in rows] == [1, 2]
    assert rows[1]["expected_test_acc"] == json.loads((runs / "stage_2" / "metrics.json").read_text())["test_acc"]


def test_tracking_without_the_runs_mlflow_run_fails_before_any_work(colam_run, tmp_path):
    result = colam("analyze", "expected-accuracy", "--run", str(colam_run / "colam"), "--runs-out",
                   str(tmp_path / "expected"), "--out", str(tmp_path / "out"), "--track", "--experiment", "none",
                   cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("colam: error: --run: no MLflow run of")
    assert not (tmp_path / "expected").exists() and not (tmp_path / "out").exists()
