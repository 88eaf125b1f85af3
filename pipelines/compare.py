"""`colam compare`: test accuracy by method and temperature over the finished MLflow parent runs of an experiment:
one protocol, the latest run per (variant, T, seed), where T is the run's own method's."""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from colam import io as cio
from colam.errors import ColamError
from pipelines.figures import new_figure, save_png

if TYPE_CHECKING:  # imported where used: `colam --help` and `colam train` need neither
    import mlflow
    from matplotlib.figure import Figure

_PAGE_SIZE = 1000  # MLflow's maximum page; a module constant so the tests can exercise paging
# Baselines first in the paper's order, other methods (4) alphabetically, colam (the one under study) last.
_METHOD_ORDER = {"hl": 0, "ls": 1, "cp": 2, "disturblabel": 3, "colam": 5}
_PARENTS = "tags.`colam.role` = 'parent' and attributes.status = 'FINISHED'"


@dataclass(frozen=True)
class Stats:
    """Accuracy over seeds as fractions in [0, 1]; std is the sample std (ddof=1), 0.0 for one run."""

    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        a = np.asarray(values, dtype=float)
        return cls(float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, float(a.min()), float(a.max()))


@dataclass(frozen=True)
class Row:
    method: str
    variant: str
    temperature: float | None  # None for methods without one
    n: int
    test_acc: Stats
    val_acc: Stats | None  # None when the runs logged no val_acc (no validation split)
    seeds: tuple[int, ...]
    run_ids: tuple[str, ...]


@dataclass(frozen=True)
class Comparison:
    experiment: str
    protocol: str
    rows: tuple[Row, ...]
    runs_used: int
    other_protocol_runs: int  # finished parents of other protocols, left out
    replaced_runs: int  # older runs of a (variant, temperature, seed) that a later run replaces
    incomplete_runs: int  # finished parents without a test_acc metric
    filters: dict[str, object]
    best_run: str | None = None  # the run of the highest validation accuracy (the earliest of a tie), if any has one


def collect(client: mlflow.MlflowClient, experiment: str, *, protocol: str | None = None,
            seeds: list[int] | None = None, methods: list[str] | None = None,
            temperatures: list[float] | None = None, variants: list[str] | None = None) -> Comparison:
    """One row per (variant, temperature) of the finished parent runs of `experiment`, of one protocol (by default the
    latest run's): runs of different data, model or training settings are never pooled."""
    from pipelines.tracking import display_uri

    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        state = "no experiment" if exp is None else "only a deleted experiment"
        raise ColamError(f"--experiment: {state} named {experiment!r} in the tracking store "
                         f"{display_uri(client.tracking_uri)!r}")
    filters = {"protocol": protocol, "seeds": seeds, "methods": methods, "temperatures": temperatures}
    runs = [r for r in _finished_parents(client, exp.experiment_id)
            if _selected(r, seeds, methods, temperatures, variants)]
    if protocol is None and runs:
        protocol = max(runs, key=lambda r: r.info.start_time).data.tags.get("colam.protocol", "")
    same = [r for r in runs if r.data.tags.get("colam.protocol", "") == protocol]
    complete = [r for r in same if "test_acc" in r.data.metrics]

    # a re-run replaces the older result, not pooled with it
    latest = {_key(r) + (_seed(r),): r for r in sorted(complete, key=lambda r: (r.info.start_time, r.info.run_id))}
    groups: dict[tuple, list] = {}
    for r in sorted(latest.values(), key=_seed):
        groups.setdefault(_key(r), []).append(r)
    if not groups:
        others = sorted({r.data.tags.get("colam.protocol", "") for r in runs} - {protocol})
        hint = f" (protocols present: {', '.join(others)})" if others else ""
        raise ColamError(f"--experiment: no finished runs with test_acc in experiment {experiment!r} match "
                         f"{_describe(filters)}{hint}")

    rows = [_row(key, rs) for key, rs in groups.items()]
    scored = (r for r in latest.values() if math.isfinite(r.data.metrics.get("val_acc", math.nan)))  # NaN: unscored
    best = min(scored, default=None, key=lambda r: (-r.data.metrics["val_acc"], r.info.start_time, r.info.run_id))
    rows.sort(key=lambda row: (_METHOD_ORDER.get(row.method, 4), row.method,
                               row.variant, -np.inf if row.temperature is None else row.temperature))
    return Comparison(experiment=experiment, protocol=protocol, rows=tuple(rows), runs_used=len(latest),
                      other_protocol_runs=len(runs) - len(same), replaced_runs=len(complete) - len(latest),
                      incomplete_runs=len(same) - len(complete), filters=filters,
                      best_run=best.info.run_id if best else None)


def markdown_table(header: list, rows: list[list], align: str) -> list[str]:
    """The lines of a markdown table; `align` holds an 'l' (left) or 'r' (right) per column."""
    def line(cells: list) -> str:
        return "| " + " | ".join(str(cell) for cell in cells) + " |"

    return [line(header), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|", *map(line, rows)]


def format_table(comparison: Comparison) -> str:
    """A markdown table (accuracies in percent), with the notes a reader needs to trust it."""
    c = comparison
    rows = [[row.variant.replace("|", r"\|"),  # a pipe would split the cell
             "–" if row.temperature is None else f"{row.temperature:g}", _pm(row.test_acc),
             f"{row.n}*" if row.n == 1 else row.n, "–" if row.val_acc is None else _pm(row.val_acc)]
            for row in c.rows]
    notes = [f"- {note}" for count, note in (
        (any(row.n == 1 for row in c.rows), "n = 1*: a single seed, so its std of 0.00 measures no spread"),
        (c.other_protocol_runs, f"{c.other_protocol_runs} runs of other protocols left out "
                                "(choose one with --protocol)"),
        (c.replaced_runs, f"{c.replaced_runs} older runs replaced by later runs of the same variant, T and seed"),
        (c.incomplete_runs, f"{c.incomplete_runs} finished runs without test_acc left out")) if count]
    lines = [f"Experiment {c.experiment!r}, protocol {c.protocol}: {c.runs_used} runs", "", *markdown_table(
        ["method", "T", "test acc % (mean ± std)", "n", "val acc % (mean ± std)"], rows, "lrrrr")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write(comparison: Comparison, out_dir: Path) -> dict[str, Path]:
    """Write table.md, summary.json, metrics.json and accuracy_vs_temperature.png into `out_dir`, each atomically."""
    out_dir, c = Path(out_dir), comparison
    cio.take_folder(out_dir, "comparison")
    summary = {"experiment": c.experiment, "protocol": c.protocol, "filters": c.filters, "runs_used": c.runs_used,
               "runs_left_out": {"other_protocol": c.other_protocol_runs, "replaced": c.replaced_runs,
                                 "incomplete": c.incomplete_runs},
               "accuracy_unit": "fraction", "rows": [asdict(row) for row in c.rows]}
    paths = {"table": out_dir / "table.md", "summary": out_dir / "summary.json", "metrics": out_dir / "metrics.json",
             "plot": out_dir / "accuracy_vs_temperature.png"}
    cio.write_text(paths["table"], format_table(c))
    cio.write_json(paths["summary"], summary)
    cio.write_json(paths["metrics"], metrics(c))
    save_png(temperature_figure(c), paths["plot"], dpi=150)
    return paths


def metrics(comparison: Comparison) -> dict:
    """Flat numbers per row, keyed by method (and T): what `dvc metrics show/diff` tabulates."""
    variants = Counter(method for method, _ in {(row.method, row.variant) for row in comparison.rows})
    flat = {}
    for row in comparison.rows:
        # the short method name unless the method appears with several settings
        name = row.method if variants[row.method] == 1 else row.variant
        key = name if row.temperature is None else f"{name} T={row.temperature:g}"
        flat[key] = {"test_acc_mean": round(row.test_acc.mean, 6), "test_acc_std": round(row.test_acc.std, 6),
                     "n": row.n}
    return flat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", help="MLflow experiment name")
    parser.add_argument("--protocol", help="protocol digest to compare (default: that of the latest run)")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds")
    parser.add_argument("--methods", nargs="+", help="only these methods, e.g. hl ls colam")
    parser.add_argument("--temperatures", type=float, nargs="+",
                        help="only these temperatures (methods without one are kept)")
    parser.add_argument("--out", type=Path, default=Path("runs/summary"), help="output folder")
    parser.add_argument("--track", action="store_true", help="log the table and the figure to the experiment's "
                                                             "comparison run of the protocol")
    parser.add_argument("--register", metavar="NAME", help="with --track: register the final network of the run of "
                        "the highest validation accuracy as a version of NAME, and point --alias at it")
    parser.add_argument("--alias", default="champion", help="the alias --register sets (default: champion)")


def run(args: argparse.Namespace, client: mlflow.MlflowClient) -> int:
    comparison = collect(client, args.experiment, protocol=args.protocol, seeds=args.seeds,
                         methods=args.methods, temperatures=args.temperatures, variants=getattr(args, "variants", None))
    print(format_table(comparison), end="")
    paths = write(comparison, args.out)
    # stderr, so that stdout stays the table alone
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    if args.track:
        from pipelines.tracking import log_comparison

        print(log_comparison(client, comparison, list(paths.values()), args.register, args.alias), file=sys.stderr)
    return 0


def _finished_parents(client: mlflow.MlflowClient, experiment_id: str) -> list:
    from mlflow.utils import get_results_from_paginated_fn

    return get_results_from_paginated_fn(lambda size, token: client.search_runs(
        [experiment_id], filter_string=_PARENTS, max_results=size, page_token=token), _PAGE_SIZE)


def _selected(run, seeds, methods, temperatures, variants) -> bool:
    method, variant, t = _key(run)
    return ((seeds is None or _seed(run) in seeds) and (methods is None or method in methods)
            and (temperatures is None or t is None or t in temperatures) and (variants is None or variant in variants))


def _key(run) -> tuple[str, str, float | None]:
    tags = run.data.tags
    return tags.get("colam.method", ""), tags.get("colam.variant", tags.get("colam.method", "")), _temperature(run)


def _temperature(run) -> float | None:
    """The T of the run's own method: its logged `method.<name>.temperature`, else the `colam.temperature` tag (runs
    tracked before issue 17); None for a method without one."""
    key = f"method.{run.data.tags.get('colam.method')}.temperature"
    if key in run.data.params:
        return _number(run, "parameter", key, float)
    return _number(run, "tag", "colam.temperature", float) if "colam.temperature" in run.data.tags else None


def _seed(run) -> int:
    return _number(run, "tag", "colam.seed", int)


def _number(run, what: str, key: str, kind: Callable):
    values = run.data.tags if what == "tag" else run.data.params
    try:
        return kind(values[key])
    except (KeyError, ValueError):
        raise ColamError(f"--experiment: a run has {what} {key}={values.get(key)!r}, expected a number "
                         f"(run name {run.data.tags.get('mlflow.runName')!r})") from None


def _row(key: tuple[str, str, float | None], runs: list) -> Row:
    vals = [r.data.metrics["val_acc"] for r in runs if "val_acc" in r.data.metrics]
    return Row(method=key[0], variant=key[1], temperature=key[2], n=len(runs),
               test_acc=Stats.of([r.data.metrics["test_acc"] for r in runs]), val_acc=Stats.of(vals) if vals else None,
               seeds=tuple(_seed(r) for r in runs), run_ids=tuple(r.info.run_id for r in runs))


def _pm(s: Stats) -> str:
    return f"{100 * s.mean:.2f} ± {100 * s.std:.2f}"


def _describe(filters: dict[str, object]) -> str:
    given = [f"--{key} {' '.join(map(str, value)) if isinstance(value, list) else value}"
             for key, value in filters.items() if value is not None]
    return ", ".join(given) if given else "(no filters)"


def temperature_figure(c: Comparison, title: str | None = None) -> Figure:
    fig, ax = new_figure(7, 4.5)
    with_t = [row for row in c.rows if row.temperature is not None]
    handles = []  # in table order; matplotlib would list the horizontal lines before the curves
    # the rows of a variant are consecutive, the one without T (a flat line) first
    for i, ((variant, flat), group) in enumerate(groupby(c.rows, lambda row: (row.variant, row.temperature is None))):
        rs, color = list(group), f"C{i % 10}"
        if flat:
            mean, std = 100 * rs[0].test_acc.mean, 100 * rs[0].test_acc.std
            handles.append(ax.axhline(mean, linestyle="--", color=color, label=f"{variant} (no T)"))
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.15)
        else:
            handles.append(ax.errorbar([r.temperature for r in rs], [100 * r.test_acc.mean for r in rs], marker="o",
                                       yerr=[100 * r.test_acc.std for r in rs], capsize=3, color=color, label=variant))
    if with_t:
        # T values are typically powers of two (0.5, 1, 2, 4, 8): even spacing on a log-2 axis
        ax.set_xscale("log", base=2)
        ts = sorted({r.temperature for r in with_t})
        ax.set_xticks(ts, [f"{t:g}" for t in ts])
    ax.set(xlabel="temperature T (log scale)" if with_t else "temperature T", ylabel="test accuracy (%)",
           title=title or f"Test accuracy vs temperature: {c.experiment} (protocol {c.protocol})")
    ax.grid(True, alpha=0.3)
    # below the axes: long COLAM variant labels would hide the curves
    long_labels = max((len(h.get_label()) for h in handles), default=0) > 40
    fig.legend(handles=handles, loc="outside lower center", ncols=1 if long_labels else 2, fontsize="small")
    return fig
