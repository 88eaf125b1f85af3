"""`colam analyze`: the COLAM paper's analyses (Sec. 5) of finished runs: curves, expected-accuracy, geometry,
soft-labels, grid-cell (trains one cell of the grid) and grid (reads it back from MLflow).

Each writes its PNG figures, `table.md` and `results.json` into --out and, with --track (default: when
MLFLOW_TRACKING_URI is set), logs them to the MLflow parent run of --run under `analysis/NAME`, with its headline
numbers as metrics. `dvc repro` runs them all (the analyze_* stages of dvc.yaml).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from colam import io as cio
from colam.errors import ColamError
from pipelines.arguments import config_options, params, run_log, tracking, tracking_options, training_options
from pipelines import figures
from pipelines.compare import format_table, markdown_table, temperature_figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="analysis", required=True)

    def command(name: str, help_text: str, func, baselines: str = "", split: bool = False, run: bool = True,
                out_help: str = "folder for figures, table.md, results.json", out_required: bool = True):
        sub = commands.add_parser(name, help=help_text)
        config_options(sub, help="params.yaml: its analysis and tracking sections (default: the defaults)")
        if run:
            sub.add_argument("--run", required=True, help="the COLAM run folder analysed (and logged to)")
        sub.add_argument("--out", required=out_required, type=Path, help=out_help)
        tracking_options(sub, "MLflow experiment (default: tracking.experiment of --config)")
        if baselines:
            sub.add_argument("--baselines", nargs="+", default=[], metavar="NAME=DIR",
                             help=f"finished runs to compare with, e.g. {baselines}")
        if split:
            sub.add_argument("--split", help="the split the runs were trained on (default: draw it from data.*)")
        sub.set_defaults(func=func)
        return sub

    command("curves", "train/test accuracy per epoch against baselines, stage ends marked (Fig. 1a)", curves,
            baselines="hl=runs/compare/hl-seed0")
    sub = command("expected-accuracy", "train a fresh model on each stage's soft labels; its test accuracy (Fig. 1b)",
                  expected_accuracy, baselines="hl=runs/compare/hl-seed0 (drawn as reference lines)", split=True,
                  out_help="folder for figures, table.md, results.json (required without --stage)", out_required=False)
    sub.add_argument("--runs-out", required=True, type=Path,
                     help="folder for the fixed-label training runs (resumable)")
    sub.add_argument("--stage", type=int, help="only train the run of this stage's soft labels (a DVC stage per K); "
                                               "no figures")
    training_options(sub)
    command("geometry", "penultimate features and templates of three classes (Fig. 2, Table 5, Fig. 3)", geometry,
            baselines="hl=runs/compare/hl-seed0 ls=runs/compare/ls-seed0", split=True)
    command("soft-labels", "heatmap of each stage's soft labels and each class's nearest classes", soft_labels)
    sub = command("grid-cell", "train COLAM at one (epochs per stage, peers) cell of the grid (tracked)", grid_cell,
                  split=True, run=False, out_help="output folder of the run")
    sub.add_argument("--epochs-per-stage", type=int, required=True, help="the update interval t; stages = epochs / t")
    sub.add_argument("--peers", required=True, help="random peer samples per soft label, or all")
    training_options(sub)
    command("grid", "test accuracy over the (epochs per stage x peers) grid and over T, from MLflow (Fig. 4)", grid)


def curves(args) -> int:
    from colam.methods import METHODS
    from colam.runs import history, open_run

    run = open_run(args.run, "--run")
    main, accs = _label(run.config), ("train_acc", "test_acc")
    runs = {**_baselines(args), main: run}
    start(args, run)
    rows = {name: history(r, "--run" if r is run else f"--baselines {name}") for name, r in runs.items()}
    stage_ends = np.cumsum(METHODS[run.config.method.name].stage_epochs(run.config)).tolist()
    by_epoch = {name: {r["epoch"]: r for r in reversed(history_rows)} for name, history_rows in rows.items()}
    at_ends = [{"stage": stage, "epoch": end, **{
        name: {"train_acc": found[end]["train_acc"], "test_acc": found[end].get("test_acc")} if end in found else None
        for name, found in by_epoch.items()}} for stage, end in enumerate(stage_ends, start=1)]
    figure = figures.learning_curves(rows, stage_ends, f"Learning curves: {' vs '.join(rows)} "
                                                      f"({run.config.model.name} on {run.config.data.name})")
    cells = [[e["stage"], e["epoch"], *(_percent((e[n] or {}).get(k)) for n in rows for k in accs)] for e in at_ends]
    table = markdown_table(["stage", "epoch", *(f"{n} {s}" for n in rows for s in ("train", "test"))], cells,
                           "r" * (2 + 2 * len(rows)))
    results = {"runs": {name: {"path": str(r.path), **{k: [x.get(k) for x in rows[name]] for k in ("epoch", *accs)}}
                        for name, r in runs.items()}, "stage_ends": stage_ends, "at_stage_ends": at_ends}
    return _finish(args, run, "curves", {"learning_curves": figure},
                   [f"Accuracy at {main}'s stage ends (%)", "", *table], results, {})


def expected_accuracy(args) -> int:
    from colam.analysis.expected import expected_accuracy as measure
    from colam.runs import history, open_run

    one = args.stage is not None  # one fixed-label run, for a pipeline step of its own: no figures
    if not one and args.out is None:
        raise ColamError("--out: required (the folder for the figures and tables), unless --stage trains one run")
    run = open_run(args.run, "--run", finished=not one)
    if not one:
        baselines = _baselines(args)
        start(args, run)
    rows = measure(run, args.runs_out, split_dir=args.split, progress=args.progress,
                   stages=[args.stage] if one else None, restart_if_changed=args.restart_if_changed)
    if one:
        print(json.dumps(rows[0]))
        return 0
    references = {f"{_label(run.config)} final test accuracy": history(run)[-1]["test_acc"]}
    for name, baseline in baselines.items():
        references[f"{name} final test accuracy"] = history(baseline, f"--baselines {name}")[-1]["test_acc"]
    figure = figures.expected_accuracy(rows, references, f"Expected accuracy of the soft labels of each stage "
                                                        f"({run.config.model.name} on {run.config.data.name})")
    keys = ("expected_test_acc", "expected_val_acc", "run_test_acc_at_stage_end")
    table = markdown_table(["soft labels of stage", "expected test acc", "expected val acc", "run's test acc at that "
                            "stage end"], [[r["stage"], *(_percent(r[k]) for k in keys)] for r in rows], "rrrr")
    lines = ["Expected accuracy: a fresh model trained on each stage's soft labels, fixed (%)", "", *table, "",
             *(f"- {name}: {100 * value:.2f}" for name, value in references.items())]
    metrics = {"expected_test_acc": [(r["stage"], r["expected_test_acc"]) for r in rows]}
    return _finish(args, run, "expected_accuracy", {"expected_accuracy": figure}, lines,
                   {"stages": rows, "references": references}, metrics)


def geometry(args) -> int:
    from colam.data import build_data
    from colam.runs import final_network, open_run

    analysis = params(args).analysis
    run = open_run(args.run, "--run")
    runs = {**_baselines(args), _label(run.config): run}
    _same_data(runs, run)
    start(args, run)
    data = build_data(run.config.data, args.split)
    classes, chosen_by = _choose_classes(run, data.classes, analysis.classes)
    names = [data.classes[k] for k in classes]
    per_class = analysis.samples_per_class
    splits = {"train": _class_subset(data.train_eval, data.clean_train_targets, classes, per_class, "train"),
              "test": _class_subset(data.test, data.test.targets, classes, per_class, "test")}
    results = {"classes": names, "class_indices": classes, "chosen_by": chosen_by,
               "samples": {s: len(subset) for s, subset in splits.items()}, "runs": {}}
    panels = {}
    for name, r in runs.items():
        model = final_network(r, data.num_classes, data.in_channels, "--run" if r is run else "--baselines")
        results["runs"][name], panels[name] = _measure(model, r, classes, names, splits)
    title = f"{', '.join(names)}: penultimate features and class templates ({run.config.data.name})"
    figs = {"projection": figures.projections(panels, names, f"{title}, projected on the templates' plane")}
    for split in splits:
        bars = {n: {"template": e["splits"][split]["adt"], "centroid": e["splits"][split]["adc"]}
                for n, e in results["runs"].items()}
        figs[f"distances_{split}"] = figures.average_distances(
            bars, names, f"Average distance from each template / centroid to each class's {split} samples")
    metrics = {f"geometry_template_distance_avg_{_metric_name(n)}": [(0, e["template_distance_average"])]
               for n, e in results["runs"].items()}
    return _finish(args, run, "geometry", figs, _geometry_table(results, names), results, metrics)


def soft_labels(args) -> int:
    from colam.analysis.expected import class_names, labelled_stages, labels_temperature, read_soft_labels
    from colam.analysis.structure import most_similar_pair, nearest_classes
    from colam.runs import open_run

    count = params(args).analysis.nearest
    run = open_run(args.run, "--run")
    start(args, run)
    stages = labelled_stages(run)
    matrices = {k: read_soft_labels(f) for k, f in stages}
    last, last_file = stages[-1]
    names = class_names(last_file, len(matrices[last]))
    if len({m.shape for m in matrices.values()}) != 1:
        raise ColamError(f"--run: the stages of '{run.path}' saved soft labels of different shapes")
    temperature = labels_temperature(last_file)
    results = {"class_names": names, "temperature": temperature, "stages": {}}
    for k, matrix in matrices.items():
        a, b, mass = most_similar_pair(matrix)
        results["stages"][str(k)] = {
            "soft_labels": matrix.tolist(), "own_mass_mean": float(np.diag(matrix).mean()),
            "most_similar_pair": [names[a], names[b]], "most_similar_pair_mass": mass,
            "nearest": {names[c]: [{"class": names[j], "mass": m} for j, m in near]
                        for c, near in enumerate(nearest_classes(matrix, count))}}
    final, shown = results["stages"][str(last)], min(count, len(names) - 1)
    rows = [[name, f"{matrices[last][c, c]:.3f}", *(f"{n['class']} ({n['mass']:.3f})" for n in final["nearest"][name])]
            for c, name in enumerate(names)]
    table = markdown_table(["class", "own mass", *(f"nearest {i + 1}" for i in range(shown))], rows, "lr" + "l" * shown)
    lines = [f"Each class's nearest classes under the soft labels of stage {last} (T = {temperature:g}): "
             f"the mass its soft label puts on them", "", *table,
             "", "Most similar pair by stage (mean of the two off-diagonal masses):", ""]
    lines += [f"- stage {k}: {e['most_similar_pair'][0]} and {e['most_similar_pair'][1]} "
              f"({e['most_similar_pair_mass']:.3f}); mean own mass {e['own_mass_mean']:.3f}"
              for k, e in results["stages"].items()]
    figure = figures.soft_labels_by_stage(matrices, names, temperature)
    metrics = {"soft_labels_own_mass_mean": [(k, float(np.diag(m).mean())) for k, m in matrices.items()]}
    return _finish(args, run, "soft_labels", {"soft_labels_by_stage": figure}, lines, results, metrics)


def grid_cell(args) -> int:
    from colam.engine import fit
    from pipelines.grid import cell_config, parse_peers

    config = cell_config(params(args).config, args.epochs_per_stage, parse_peers(args.peers, "--peers"))
    with run_log(args, args.out.name) as log:
        metrics = fit(config, args.out, run_log=log, progress=args.progress, split_dir=args.split,
                      restart_if_changed=args.restart_if_changed)
    print(json.dumps(metrics))
    return 0


def grid(args) -> int:
    from colam.runs import open_run
    from pipelines.grid import collect_grid
    from pipelines.tracking import connect

    given = params(args)
    run = open_run(args.run, "--run")
    start(args, run)
    client = args.tracker[0] if args.tracker is not None else connect()  # the store start() reached, if any
    found = collect_grid(client, args.experiment or given.tracking.experiment, given)
    section, seed = given.config.method.colam, given.config.seed
    heat = figures.grid_heatmap(found.values, found.counts, found.epochs_per_stage, found.peers,
                                f"COLAM test accuracy (%) by update interval and peers\n(T = {section.temperature:g}, "
                                f"seed {seed}, {section.stages * section.epochs_per_stage} epochs in all)")
    curve = temperature_figure(found.temperature, title=f"Test accuracy vs temperature T\n(COLAM at t = "
                                                        f"{section.epochs_per_stage} epochs per stage, peers = "
                                                        f"{section.peers}; mean ± std over seeds)")
    values = [[float(v) if np.isfinite(v) else None for v in row] for row in found.values]
    cells = [[t, *(_percent(v, "not run") for v in row)] for t, row in zip(found.epochs_per_stage, values)]
    table = markdown_table(["epochs per stage", *found.peers], cells, "r" * (1 + len(found.peers)))
    lines = [f"COLAM test accuracy (%) by update interval (rows, epochs per stage) and peer samples (columns); "
             f"T = {section.temperature:g}, seed {seed}", "", *table, "",
             "Test accuracy against temperature (COLAM at the run's interval and peers; baselines as lines):",
             "", format_table(found.temperature)]
    results = {"epochs_per_stage": found.epochs_per_stage, "peers": found.peers, "test_acc": values,
               "runs": found.counts.tolist(),
               "temperature": [{"variant": r.variant, "temperature": r.temperature, "test_acc_mean": r.test_acc.mean,
                                "test_acc_std": r.test_acc.std, "n": r.n} for r in found.temperature.rows]}
    return _finish(args, run, "grid", {"grid_heatmap": heat, "accuracy_vs_temperature": curve}, lines, results, {})


def _label(config) -> str:
    """'COLAM (T=2)', 'kd (T=4)', 'hl': the method and its headline values (`Method.headline`)."""
    from colam.methods import METHODS

    name = config.method.name
    values = ", ".join(f"{'T' if key == 'temperature' else key}={value:g}"
                       for key, value in METHODS[name].headline_values(config).items())
    return ("COLAM" if name == "colam" else name) + (f" ({values})" if values else "")


def _metric_name(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def _percent(value: float | None, missing: str = "–") -> str:
    return missing if value is None else f"{100 * value:.2f}"


def _baselines(args) -> dict:
    from colam.runs import open_run

    found = {}
    for item in args.baselines:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ColamError(f"--baselines: '{item}' is not of the form NAME=DIR")
        if name in found:
            raise ColamError(f"--baselines: '{name}' is given twice")
        found[name] = open_run(folder, f"--baselines {name}")
    return found


def _same_data(runs: dict, run) -> None:
    from colam.data import SPLIT_KEYS

    for name, other in runs.items():
        for key in SPLIT_KEYS:
            mine, theirs = getattr(run.config.data, key), getattr(other.config.data, key)
            if theirs != mine:
                raise ColamError(f"--baselines {name}: '{other.path}' was trained on other data (data.{key}: "
                                 f"{theirs!r} there, {mine!r} in --run)")


def _choose_classes(run, class_names: list[str], chosen: list) -> tuple[list[int], str]:
    """analysis.classes, or by default the paper's choice made from the run's last soft labels."""
    from colam.analysis.expected import labelled_stages, read_soft_labels
    from colam.analysis.structure import default_classes, resolve_classes

    if chosen:
        return resolve_classes(chosen, class_names), "analysis.classes"
    stage, labels_file = labelled_stages(run)[-1]
    return (default_classes(read_soft_labels(labels_file)),
            f"the two most similar classes under the soft labels of stage {stage}, and the least similar to both")


def _class_subset(dataset, labels, classes: list[int], per_class: int, split: str):
    """The first `per_class` samples of each of `classes` (by the data set's own labels), in data order."""
    from colam.data import Indexed

    labels = torch.as_tensor(labels)
    keep = torch.cat([torch.nonzero(labels == k).flatten()[:per_class] for k in classes]).sort().values.numpy()
    for k in classes:
        if not (labels == k).any():
            raise ColamError(f"analysis.classes: class {k} has no samples in the {split} split")
    return Indexed(dataset.base, dataset.indices[keep], labels.numpy()[keep])


def _measure(model, run, classes: list[int], names: list[str], splits: dict) -> tuple[dict, dict]:
    """One network's template distances, ADT and ADC per split (for results.json), and its projection panels."""
    from colam.analysis import geometry as geo
    from colam.data import loader

    w = geo.templates(model)[classes]
    distances, plane = geo.template_distances(w), geo.template_plane(w)
    templates_2d = plane.project(w).tolist()
    entry = {"path": str(run.path),
             "template_distances": {f"{names[i]} – {names[j]}": float(distances[i, j])
                                    for i in range(3) for j in range(i + 1, 3)},
             "template_distance_average": float(distances[np.triu_indices(3, k=1)].mean()), "splits": {}}
    panels = {}
    for split, subset in splits.items():
        feats = geo.features(model, loader(subset, run.config.train.eval_batch_size, shuffle=False, num_workers=0))
        entry["splits"][split] = {"adt": geo.average_distances(w, feats, classes).tolist(),
                                  "adc": geo.average_distances(geo.centroids(feats, classes), feats, classes).tolist()}
        panels[split] = {"points": plane.project(feats.values).tolist(),
                         "labels": [classes.index(int(k)) for k in feats.labels], "templates": templates_2d}
    entry["projection"] = {"origin": plane.origin.tolist(), "basis": plane.basis.T.tolist(), "templates": templates_2d}
    return entry, panels


def _geometry_table(results: dict, names: list[str]) -> list[str]:
    runs = results["runs"]
    pairs = list(next(iter(runs.values()))["template_distances"])
    rows = [[f"({pair})", *(f"{e['template_distances'][pair]:.3f}" for e in runs.values())] for pair in pairs]
    rows.append(["average", *(f"{e['template_distance_average']:.3f}" for e in runs.values())])
    lines = [f"Classes: {', '.join(names)} ({results['chosen_by']}); samples per split: "
             + ", ".join(f"{s} {n}" for s, n in results["samples"].items()), "",
             "Euclidean distance between the normalised templates (the paper's Table 5)", "",
             *markdown_table(["distance", *runs], rows, "l" + "r" * len(runs))]
    for split in results["samples"]:
        for kind, long in (("adt", "template"), ("adc", "centroid")):
            rows = [[r, name, *(f"{v:.3f}" for v in e["splits"][split][kind][i])]
                    for r, e in runs.items() for i, name in enumerate(names)]
            lines += ["", f"Average distance from each {long} ({kind.upper()}, rows) to each class's {split} samples "
                          f"(columns), normalised vectors", "",
                      *markdown_table(["run", "from", *names], rows, "ll" + "r" * len(names))]
    return lines


def _finish(args, run, name: str, figs: dict, lines: list[str], results: dict, metrics: dict) -> int:
    """Write the figures, table.md and results.json into --out; log them (and `metrics`, each a list of (step,
    value)) to the MLflow parent run of --run when tracking."""
    out = Path(args.out)
    try:
        cio.take_folder(out, "analysis")
    except OSError as exc:
        raise ColamError(f"--out: cannot create '{out}' ({exc.strerror})") from None
    table = "\n".join(lines)
    paths = [figures.save_png(figure, out / f"{key}.png") for key, figure in figs.items()]
    cio.write_text(out / "table.md", table.rstrip("\n") + "\n")
    cio.write_json(out / "results.json", results)
    paths += [out / "table.md", out / "results.json"]
    if args.tracker is not None:
        from pipelines.tracking import log_files, log_points

        client, experiment, parent = args.tracker
        log_files(client, parent, paths, f"analysis/{name}")
        log_points(client, parent, metrics)
        print(f"MLflow: logged analysis/{name} to run {parent} in experiment '{experiment}'", file=sys.stderr)
    print(table)
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def start(args, run) -> None:
    """Before any work: check --out, and when tracking, that the store answers and holds --run's MLflow run (an
    analysis that trains for minutes must not fail at its last step)."""
    cio.check_folder(Path(args.out), "analysis")
    args.tracker = None
    if tracking(args):
        from pipelines.tracking import connect, run_parent

        client = connect()
        experiment = args.experiment or params(args).tracking.experiment
        args.tracker = (client, experiment, run_parent(client, experiment, run.config, run.path))
