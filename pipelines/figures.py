"""The analyses' figures (COLAM paper, Sec. 5) as matplotlib Figures, and an atomic PNG writer.

Every figure is a bare `matplotlib.figure.Figure` drawn through Agg: no display, no pyplot state. Each has a title,
labelled axes and a legend wherever it shows more than one series."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from colam import io as cio

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def new_figure(width: float, height: float, grid: tuple[int, int] | None = None) -> tuple[Figure, Any]:
    """A figure and its axes: one Axes, or for `grid` = (rows, columns) a 2-D array of them."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot() if grid is None else figure.subplots(*grid, squeeze=False)


def save_png(figure: Figure, path: str | Path, dpi: int = 130) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    cio.atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def draw_soft_labels(axes: Axes, soft_labels: np.ndarray, class_names: list[str], title: str,
                     annotate: bool | None = None):
    """A C x C heatmap on `axes` (row c = the label of class c); returns the image for a colorbar."""
    count = len(soft_labels)
    image = axes.imshow(soft_labels, cmap="viridis", vmin=0.0, vmax=float(soft_labels.max()))
    if count <= 30:  # beyond that the names overlap
        axes.set_xticks(range(count), class_names, rotation=90)
        axes.set_yticks(range(count), class_names)
    if annotate if annotate is not None else count <= 12:
        for (row, col), value in np.ndenumerate(soft_labels):
            axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                      color="black" if value > 0.6 * soft_labels.max() else "white")
    axes.set(xlabel="class the label puts mass on", ylabel="true class", title=title)
    return image


def soft_label_heatmap(soft_labels: np.ndarray, class_names: list[str], title: str) -> Figure:
    size = min(4 + 0.4 * len(soft_labels), 16)
    figure, axes = new_figure(size, size * 0.85)
    image = draw_soft_labels(axes, soft_labels, class_names, title)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="probability")
    return figure


def soft_labels_by_stage(matrices: dict[int, np.ndarray], class_names: list[str], temperature: float) -> Figure:
    """One heatmap per stage, on one colour scale so the stages compare."""
    stages = sorted(matrices)
    columns = min(len(stages), 4)
    rows = -(-len(stages) // columns)
    panel = min(3 + 0.3 * len(class_names), 8)
    figure, grid = new_figure(panel * columns + 1, panel * rows + 0.6, (rows, columns))
    top = max(float(m.max()) for m in matrices.values())
    for axes, stage in zip(grid.flat, stages):
        image = draw_soft_labels(axes, matrices[stage], class_names, f"after stage {stage}",
                                 annotate=len(class_names) <= 10)
        image.set_clim(0.0, top)
    for axes in grid.flat[len(stages):]:  # the last row's empty places
        axes.remove()
    figure.colorbar(image, ax=figure.axes, shrink=0.8, label="probability")
    figure.suptitle(f"Soft labels estimated at each stage end (T = {temperature:g}); row = true class")
    return figure


def learning_curves(curves: dict[str, list[dict]], stage_ends: list[int], title: str) -> Figure:
    """Train and test accuracy per epoch of each run (paper Fig. 1a), stage boundaries dashed."""
    figure, axes = new_figure(9, 5)
    for i, (name, rows) in enumerate(curves.items()):
        color, scored = f"C{i}", [r for r in rows if "test_acc" in r]  # train.eval_every may skip epochs
        axes.plot([r["epoch"] for r in scored], [100 * r["test_acc"] for r in scored], color=color,
                  label=f"{name} test")
        axes.plot([r["epoch"] for r in rows], [100 * r["train_acc"] for r in rows], color=color, linestyle=":",
                  label=f"{name} train")
    for k, end in enumerate(stage_ends[:-1]):
        axes.axvline(end + 0.5, color="grey", linestyle="--", linewidth=0.8, label="stage boundary" if k == 0 else None)
    axes.set(xlabel="epoch", ylabel="accuracy (%)", title=title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    return figure


def expected_accuracy(rows: list[dict], references: dict[str, float], title: str) -> Figure:
    """Expected accuracy of each stage's soft labels (paper Fig. 1b), with the runs' final accuracies."""
    figure, axes = new_figure(7, 4.5)
    stages = [r["stage"] for r in rows]
    axes.plot(stages, [100 * r["expected_test_acc"] for r in rows], marker="o",
              label="expected accuracy (fresh model on the stage's soft labels)")
    axes.plot(stages, [100 * r["run_test_acc_at_stage_end"] for r in rows], marker="s", linestyle=":",
              label="COLAM's own test accuracy at the stage end")
    for i, (name, value) in enumerate(references.items()):
        axes.axhline(100 * value, color=f"C{i + 2}", linestyle="--", label=name)
    axes.set_xticks(stages)
    axes.set(xlabel="soft labels saved after stage", ylabel="test accuracy (%)", title=title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def projections(panels: dict[str, dict[str, dict]], class_names: list[str], title: str) -> Figure:
    """Features and templates on the templates' plane (paper Fig. 2): a row per split, a column per run;
    panels[run][split] = {"points": N x 2, "labels": N class positions 0..2, "templates": 3 x 2}."""
    runs = list(panels)
    splits = list(next(iter(panels.values())))
    figure, grid = new_figure(4.2 * len(runs), 4.0 * len(splits) + 0.4, (len(splits), len(runs)))
    for (row, split), (col, run) in itertools.product(enumerate(splits), enumerate(runs)):
        axes, panel = grid[row, col], panels[run][split]
        points, labels, tips = (np.asarray(panel[key]) for key in ("points", "labels", "templates"))
        for k, name in enumerate(class_names):
            mine = points[labels == k]
            axes.scatter(mine[:, 0], mine[:, 1], s=10, alpha=0.6, color=f"C{k}", label=name)
            axes.annotate(name, tips[k], textcoords="offset points", xytext=(6, 6), fontsize=8, color="red")
        axes.scatter(tips[:, 0], tips[:, 1], color="red", label="templates", marker="*", s=260, edgecolors="black",
                     linewidths=0.8, zorder=5)
        axes.set(xlabel="plane coordinate 1", ylabel="plane coordinate 2", title=f"{run}, {split} set")
        axes.grid(True, alpha=0.3)
    grid[0, 0].legend(fontsize="small", loc="best")
    figure.suptitle(title)
    return figure


def average_distances(tables: dict[str, dict[str, list[list[float]]]], class_names: list[str], title: str) -> Figure:
    """Grouped bars (paper Fig. 3): tables[run]["template"|"centroid"][i][j] = mean distance from
    class i's template or centroid to class j's samples; a row per kind, a column per run."""
    runs, kinds = list(tables), ("template", "centroid")
    figure, grid = new_figure(4.2 * len(runs), 7.5, (len(kinds), len(runs)))
    width, positions = 0.8 / len(class_names), np.arange(len(class_names))
    top = {k: max(max(max(row) for row in tables[r][k]) for r in runs) for k in kinds}  # one scale per row
    for (row, kind), (col, run) in itertools.product(enumerate(kinds), enumerate(runs)):
        axes, values = grid[row, col], np.asarray(tables[run][kind])
        for j, name in enumerate(class_names):
            axes.bar(positions + (j - (len(class_names) - 1) / 2) * width, values[:, j], width,
                     color=f"C{j}", label=f"samples of {name}")
        axes.set_xticks(positions, [f"{kind} {name}" for name in class_names], fontsize=8)
        axes.set_ylim(0, top[kind] * 1.1)
        axes.set(xlabel=f"distance from the {kind} of each class, to each class's samples (bars)",
                 ylabel="mean distance (normalised vectors)",
                 title=f"{run}: from each {kind} ({'ADT' if kind == 'template' else 'ADC'})")
        axes.grid(True, axis="y", alpha=0.3)
    grid[0, 0].legend(fontsize="small")
    figure.suptitle(title)
    return figure


def grid_heatmap(values: np.ndarray, counts: np.ndarray, rows: list, columns: list, title: str) -> Figure:
    """Test accuracy (%) of each (epochs per stage, peers) cell (paper Fig. 4a); NaN = not run."""
    figure, axes = new_figure(max(6.5, 1.6 + 1.3 * len(columns)), 1.8 + 0.9 * len(rows))
    shown = 100 * values
    finite = shown[np.isfinite(shown)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    image = axes.imshow(np.ma.masked_invalid(shown), cmap="viridis", aspect="auto", vmin=low, vmax=high)
    for (i, j), value in np.ndenumerate(shown):
        if np.isfinite(value):
            text = f"{value:.1f}" + (f"\n(n={counts[i, j]})" if counts[i, j] > 1 else "")
            axes.text(j, i, text, ha="center", va="center", fontsize=8,
                      color="black" if value > (low + high) / 2 else "white")
        else:
            axes.text(j, i, "not run", ha="center", va="center", fontsize=7, color="grey")
    axes.set_xticks(range(len(columns)), [str(c) for c in columns])
    axes.set_yticks(range(len(rows)), [str(r) for r in rows])
    axes.set(xlabel="number of peer samples per soft label", ylabel="update interval (epochs per stage)", title=title)
    figure.colorbar(image, ax=axes, label="test accuracy (%)")
    return figure
