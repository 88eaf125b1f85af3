"""params.yaml: one colam config plus the sections only the pipeline reads.

    seed, data, model, train, method   the run, exactly as `colam train --config` reads it
    compare                            the comparison DVC runs: baselines, COLAM temperatures, seeds
    analysis                           the paper's analyses of the runs (`colam analyze`)
    raw_data                           where the `data` stage takes the data set's files from
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
class GridParams:
    """The hyperparameter grid of the paper's Fig. 4a, around the run's own settings."""

    # the paper's grid (Sec. 5.3, 160 epochs; its largest peer count, 100, is "all" here): update
    # intervals, each dividing train.epochs ...
    epochs_per_stage: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 40, 80])
    peers: list[int | str] = field(default_factory=lambda: [1, 2, 5, 10, "all"])  # ... x random peers per soft label


@dataclass
class AnalysisParams:
    classes: list[int | str] = field(default_factory=list)  # geometry: 3 class names (or indices); empty: the
    # two most similar classes under COLAM's final soft labels and the class least similar to both
    samples_per_class: int = 100  # geometry: samples of each class projected and measured (the paper's 100)
    nearest: int = 3  # soft-label structure: the nearest classes listed for each class
    grid: GridParams = field(default_factory=GridParams)


@dataclass
class RawDataParams:
    """The `data` stage: `colam data get --from SOURCE --out data.root`, the copy DVC versions."""

    source: str = "bundled"  # a folder holding the original files, `download` (torchvision) or `bundled` (digits)


RAW_DATA_FOLDER = "data/raw"  # the pipeline keeps data set NAME in data/raw/NAME (data.root)


@dataclass
class TrackingParams:
    experiment: str = "colam"  # MLflow experiment of the runs; the server is MLFLOW_TRACKING_URI


@dataclass
class Params:
    config: Config
    compare: CompareParams
    tracking: TrackingParams
    analysis: AnalysisParams = field(default_factory=AnalysisParams)
    raw_data: RawDataParams = field(default_factory=RawDataParams)
    given: tuple[str, ...] = ()  # the pipeline sections the file itself holds


PIPELINE_SECTIONS = ("compare", "analysis", "raw_data", "tracking")


def load_params(path: str | Path | None, overrides: list[str] | None = None) -> Params:
    raw = read_yaml(path, overrides)
    given = tuple(name for name in PIPELINE_SECTIONS if name in raw)
    sections = {name: raw.pop(name, {}) for name in PIPELINE_SECTIONS}
    config = from_dict(raw)
    validate(config)
    params = Params(config, build_section(CompareParams, sections["compare"], "compare."),
                    build_section(TrackingParams, sections["tracking"], "tracking."),
                    build_section(AnalysisParams, sections["analysis"], "analysis."),
                    build_section(RawDataParams, sections["raw_data"], "raw_data."), given)
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
    _validate_analysis(params)


# The analyses compare the main COLAM run with these baselines of the comparison, at the run's seed.
ANALYSIS_BASELINES = ("hl", "ls")


def _validate_analysis(params: Params) -> None:
    analysis = params.analysis
    require(analysis.samples_per_class >= 1, "analysis.samples_per_class", analysis.samples_per_class, "must be >= 1")
    require(analysis.nearest >= 1, "analysis.nearest", analysis.nearest, "must be >= 1")
    require(not analysis.classes or len(analysis.classes) == 3, "analysis.classes", analysis.classes,
            "must list exactly 3 classes (names or indices), or be empty to choose them from the soft labels")
    grid = analysis.grid
    for i, interval in enumerate(grid.epochs_per_stage):
        require(interval >= 1, f"analysis.grid.epochs_per_stage[{i}]", interval, "must be >= 1")
    for i, peers in enumerate(grid.peers):
        require(peers == "all" or (isinstance(peers, int) and peers >= 1), f"analysis.grid.peers[{i}]", peers,
                "must be 'all' or an integer >= 1")
    for key in ("epochs_per_stage", "peers"):
        values = getattr(grid, key)
        require(values, f"analysis.grid.{key}", values, "must list at least one value")
        if len(set(values)) != len(values):
            raise ColamError(f"analysis.grid.{key}: {values} repeats a value (DVC names one run per value)")


def check_pipeline_analysis(params: Params) -> None:
    """What the DVC pipeline's analysis stages need of the other sections (`colam check`, the gate,
    when params.yaml has an analysis section): the hl and ls runs of the run's seed, and grid
    intervals that split the epochs into whole stages."""
    config = params.config
    for name in ANALYSIS_BASELINES:
        require(name in params.compare.baselines, "compare.baselines", params.compare.baselines,
                f"must include {name}: the analyses compare COLAM with {' and '.join(ANALYSIS_BASELINES)}")
    require(config.seed in params.compare.seeds, "compare.seeds", params.compare.seeds,
            f"must include the run's seed {config.seed}: the analyses compare runs of that seed")
    for i, interval in enumerate(params.analysis.grid.epochs_per_stage):
        require(config.train.epochs % interval == 0, f"analysis.grid.epochs_per_stage[{i}]", interval,
                f"must divide train.epochs ({config.train.epochs}) into whole stages")


def check_pipeline_data(params: Params) -> None:
    """The `data` stage writes data.name's files to data/raw/<data.name> and every stage reads them
    there (`colam check`, the gate, when params.yaml has a raw_data section)."""
    data, source = params.config.data, params.raw_data.source
    expected = f"{RAW_DATA_FOLDER}/{data.name}"
    require(data.root.rstrip("/") == expected, "data.root", data.root,
            f"must be {expected}: the pipeline's data stage keeps {data.name}'s files there (set data.root={expected})")
    require(source.strip() != "", "raw_data.source", source, "must be a folder, download or bundled")


def pipeline_variants(params: Params, methods: list[str]) -> list[str]:
    """The MLflow variant tags (`pipelines.tracking.variant`) of `methods` with params.yaml's settings."""
    from colam.config import from_dict
    from pipelines.tracking import variant

    found = []
    for name in methods:
        settings = params.config.to_dict()
        settings["method"]["name"] = name
        found.append(variant(from_dict(settings)))
    return found


def dvc_sets(path: str | Path) -> list[str]:
    """`dvc exp run -S KEY=VALUE` arguments that lay the run config in `path` over params.yaml: one
    per value (nested keys dotted, lists and mappings in YAML flow style), so that a config file
    stays the one place its settings are written (the Makefile's run-fashion-mnist)."""
    import yaml

    def flatten(node: dict, prefix: str = "") -> list[str]:
        found = []
        for key, value in node.items():
            if isinstance(value, dict) and value and key != "options":
                found += flatten(value, f"{prefix}{key}.")
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
                found.append(f"{prefix}{key}={text.removesuffix('...').strip()}")
        return found

    raw = read_yaml(path)
    validate(from_dict(raw))  # a config colam train takes, or one line naming the bad key
    return [arg for item in flatten(raw) for arg in ("-S", item)]


if __name__ == "__main__":  # python -m pipelines.params dvc-sets FILE
    import shlex
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "dvc-sets":
        sys.exit("usage: python -m pipelines.params dvc-sets CONFIG")
    try:
        print(" ".join(shlex.quote(arg) for arg in dvc_sets(sys.argv[2])))
    except ColamError as exc:
        sys.exit(f"colam: error: {exc}")
