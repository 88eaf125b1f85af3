"""What the benchmark scripts share: `colam train` runs in their own processes, a few at a time, a mean ± std cell, and
a markdown table printed, written to a file and into the docs.

Benchmark tables in the docs are refreshed by the script that measures them, never copied by hand. A page (README.md
or one under docs/) holds a table between `<!-- table:NAME -->` and `<!-- /table:NAME -->`. A benchmark calls
`check_table(NAME)` before it measures, so a missing marker stops it at once, not after an hour of training, and
`write_table(NAME, text)` (or `publish`) when it has the table."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(config, out, overrides: list[str], threads: int | None = 1) -> dict:
    """`colam train` into `out` with `threads` torch threads (None: torch's default); its metrics.json. `colam train`
    resumes in its --out, so a finished run is read back, not trained again."""
    command = [sys.executable, "-m", "pipelines.cli", "train", "--config", str(config), "--out", str(out),
               "--no-progress", "--no-track", *(arg for item in overrides for arg in ("--set", item))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{out} failed:\n{result.stderr[-2000:]}")
    return json.loads((Path(out) / "metrics.json").read_text())


def train_all(runs: dict, jobs: int, threads: int = 1):
    """`train` of every key's (config, out, overrides), `jobs` at a time in the order given; yields (key, metrics) in
    that order, each as soon as it and those before it have finished."""
    with ThreadPoolExecutor(jobs) as pool:
        futures = [(key, pool.submit(train, *run, threads)) for key, run in runs.items()]  # all submitted at once
        for key, future in futures:
            yield key, future.result()


def stage_files(run, name: str) -> list[Path]:
    """A run's stage_K/NAME files in stage order (stage_10 after stage_9)."""
    return sorted(Path(run).glob(f"stage_*/{name}"), key=lambda p: int(p.parent.name.split("_")[1]))


def mean_std(values: list[float]) -> str:
    """Accuracies in percent, mean ± sample std over the seeds ('–' for none)."""
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def markdown_table(rows: list[list[str]], align: str = "") -> str:
    """`rows`, the header first, as a markdown table padded to line up in a terminal too; `align` has one letter per
    column, l (left) or r (right); by default the first column is left, the figures right."""
    align = align or "l" + "r" * (len(rows[0]) - 1)
    widths = [max(map(len, column)) for column in zip(*rows)]
    cells = [[f" {c.rjust(w) if a == 'r' else c.ljust(w)} " for c, w, a in zip(row, widths, align)] for row in rows]
    rule = ["-" * (w + 1) + (":" if a == "r" else "-") for w, a in zip(widths, align)]
    return "\n".join("|" + "|".join(row) + "|" for row in [cells[0], rule, *cells[1:]])


def publish(text: str, file: Path | None = None, docs: str | None = None) -> None:
    print(text)
    if file:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text + "\n")
    if docs:
        write_table(docs, text)


def _markers(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- table:{re.escape(name)} -->\n).*?(\n<!-- /table:{re.escape(name)} -->)", re.DOTALL)


def check_table(name: str, root: Path = ROOT) -> list[Path]:
    """The pages that hold the markers NAME; SystemExit naming the markers when none does."""
    pages = [page for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
             if page.is_file() and _markers(name).search(page.read_text())]
    if not pages:
        raise SystemExit(f"no page of README.md or docs/ holds <!-- table:{name} --> ... <!-- /table:{name} -->")
    return pages


def write_table(name: str, table: str, root: Path = ROOT) -> list[Path]:
    """Put `table` between the markers NAME in every page that holds them; the pages written."""
    pages = check_table(name, root)
    for page in pages:  # a function, not a replacement string: a table's backslashes are no group references
        page.write_text(_markers(name).sub(lambda found: found.group(1) + table.strip("\n") + found.group(2),
                                           page.read_text()))
    return pages
