"""The hyperparameter grids of the COLAM paper's Fig. 4, read back from MLflow: a grid cell is matched by the COLAM
variant its configuration gives (`pipelines.tracking.variant`), never by run names."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from colam.config import Config, validate
from colam.errors import ColamError, require
from pipelines.compare import Comparison, collect
from pipelines.params import Params, pipeline_variants
from pipelines.tracking import protocol_digest, variant


def parse_peers(text: str, key: str) -> int | str:
    try:
        peers = text if text == "all" else int(text)
    except ValueError:
        peers = 0
    require(peers == "all" or peers >= 1, key, text, "must be 'all' or an integer >= 1")
    return peers


def cell_config(config: Config, epochs_per_stage: int, peers: int | str) -> Config:
    """COLAM with the run's settings but the update interval t and the peer count: m = epochs / t."""
    epochs = config.train.epochs
    require(epochs_per_stage >= 1 and epochs % epochs_per_stage == 0, "--epochs-per-stage", epochs_per_stage,
            f"must divide train.epochs ({epochs}) into whole stages")
    colam = replace(config.method.colam, epochs_per_stage=epochs_per_stage, stages=epochs // epochs_per_stage,
                    peers=peers)
    cell = replace(config, method=replace(config.method, name="colam", colam=colam))
    validate(cell)
    return cell


@dataclass(frozen=True)
class Grid:
    epochs_per_stage: list[int]  # rows
    peers: list[int | str]  # columns
    values: np.ndarray  # mean test accuracy (fraction) per cell, NaN where no run was found
    counts: np.ndarray  # runs (seeds) per cell
    temperature: Comparison  # COLAM at the run's t and peers over T, and the baselines


def collect_grid(client, experiment: str, params: Params) -> Grid:
    config, grid = params.config, params.analysis.grid
    protocol, temperature = protocol_digest(config), config.method.colam.temperature
    cells = collect(client, experiment, protocol=protocol, seeds=[config.seed], methods=["colam"],
                    temperatures=[temperature])
    by_variant = {row.variant: row for row in cells.rows if row.temperature == temperature}
    values = np.full((len(grid.epochs_per_stage), len(grid.peers)), np.nan)
    counts = np.zeros(values.shape, dtype=int)
    for i, interval in enumerate(grid.epochs_per_stage):
        for j, peers in enumerate(grid.peers):
            row = by_variant.get(variant(cell_config(config, interval, peers)))
            if row is not None:
                values[i, j], counts[i, j] = row.test_acc.mean, row.n
    if not counts.any():
        raise ColamError(f"--experiment: no finished grid runs in experiment {experiment!r} (protocol {protocol}); "
                         f"train them first (colam sweep grid, the grid_cells stage of dvc.yaml)")
    methods = [*params.compare.baselines, "colam"]
    over_t = collect(client, experiment, protocol=protocol, seeds=params.compare.seeds, methods=methods,
                     temperatures=sorted({*params.compare.temperatures, temperature}),
                     variants=pipeline_variants(params, methods))
    return Grid(list(grid.epochs_per_stage), list(grid.peers), values, counts, over_t)
