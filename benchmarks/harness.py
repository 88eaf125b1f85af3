"""What the benchmark scripts share: a `colam train` run in its own process, a mean ± std cell, and
the table printed, written to a file and into the docs."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import docs_tables


def train(config, out, overrides: list[str], threads: int = 1) -> dict:
    """`colam train` into `out` with `threads` torch threads; its metrics.json. `colam train` resumes
    in its --out, so a finished run is read back, not trained again."""
    command = [sys.executable, "-m", "pipelines.cli", "train", "--config", str(config), "--out", str(out),
               "--no-progress", "--no-track", *(arg for item in overrides for arg in ("--set", item))]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"{out} failed:\n{result.stderr[-2000:]}")
    return json.loads((Path(out) / "metrics.json").read_text())


def stage_files(run, name: str) -> list[Path]:
    """A run's stage_K/NAME files in stage order (stage_10 after stage_9)."""
    return sorted(Path(run).glob(f"stage_*/{name}"), key=lambda p: int(p.parent.name.split("_")[1]))


def mean_std(values: list[float]) -> str:
    """Accuracies in percent, mean ± sample std over the seeds ('–' for none)."""
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def publish(text: str, file: Path | None = None, docs: str | None = None) -> None:
    """Print the table, write it to `file` and between the docs' markers `docs` (each where given)."""
    print(text)
    if file:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text + "\n")
    if docs:
        docs_tables.write_table(docs, text)
