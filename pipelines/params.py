"""params.yaml: one colam config plus the sections only the pipeline reads.

    seed, data, model, train, method   the run, exactly as `colam train --config` reads it
    compare                            the comparison DVC runs: baselines, COLAM temperatures, seeds
    tracking                           the MLflow experiment the runs are logged to

Every section is checked with the library's rules (unknown keys and bad values are refused with
one line naming the key), so an invalid params.yaml fails in the first stage DVC runs, before it
trains anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from colam.config import Config, build_section, from_dict, read_yaml, validate
from colam.errors import ColamError, require
from colam.methods import METHODS


@dataclass
class CompareParams:
    baselines: list[str] = field(default_factory=lambda: ["hl", "ls"])  # methods run next to COLAM
    temperatures: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # COLAM's T values
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every method and T, once per seed


@dataclass
class TrackingParams:
    experiment: str = "colam"  # MLflow experiment of the runs; the server is MLFLOW_TRACKING_URI


@dataclass
class Params:
    config: Config
    compare: CompareParams
    tracking: TrackingParams


PIPELINE_SECTIONS = ("compare", "tracking")


def load_params(path: str | Path | None, overrides: list[str] | None = None) -> Params:
    raw = read_yaml(path, overrides)
    sections = {name: raw.pop(name, {}) for name in PIPELINE_SECTIONS}
    config = from_dict(raw)
    validate(config)
    params = Params(config, build_section(CompareParams, sections["compare"], "compare."),
                    build_section(TrackingParams, sections["tracking"], "tracking."))
    _validate(params)
    return params


def _validate(params: Params) -> None:
    compare, tracking = params.compare, params.tracking
    for i, name in enumerate(compare.baselines):
        require(name in METHODS and name != "colam", f"compare.baselines[{i}]", name,
                f"must be a method other than colam (COLAM runs once per temperature): {', '.join(METHODS)}")
    for i, temperature in enumerate(compare.temperatures):
        require(temperature > 0, f"compare.temperatures[{i}]", temperature, "must be > 0")
    for i, seed in enumerate(compare.seeds):
        require(0 <= seed < 2**32, f"compare.seeds[{i}]", seed, "must be in [0, 2**32)")
    for key in ("baselines", "temperatures", "seeds"):
        values = getattr(compare, key)
        if len(set(values)) != len(values):
            raise ColamError(f"compare.{key}: {values} repeats a value (DVC names one run per value)")
    require(compare.seeds, "compare.seeds", compare.seeds, "must list at least one seed")
    require(tracking.experiment.strip() != "", "tracking.experiment", tracking.experiment, "must not be empty")
