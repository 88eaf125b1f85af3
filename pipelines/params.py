"""params.yaml: one colam config (seed, data, model, train, method) plus the sections only the pipeline reads:
compare, analysis, raw_data and tracking. Every section is checked with the library's rules, so an invalid
params.yaml fails in the first stage DVC runs, before it trains anything."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from colam.config import Config, build_section, dotted_items, from_dict, read_yaml, validate
from colam.errors import ColamError, require
from colam.methods import METHODS
from pipelines.arguments import registered_name


@dataclass
class CompareParams:
    baselines: list[str] = field(default_factory=lambda: ["hl", "ls"])  # methods run next to COLAM
    temperatures: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # COLAM's T values
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every method and T, once per seed


@dataclass
class GridParams:
    """The hyperparameter grid of the paper's Fig. 4a around the run's own settings: update intervals, each dividing
    train.epochs, x random peers per soft label (the paper's, Sec. 5.3, 160 epochs; its 100 peers are "all" here)."""

    epochs_per_stage: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 40, 80])
    peers: list[int | str] = field(default_factory=lambda: [1, 2, 5, 10, "all"])


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


@dataclass
class TrackingParams:
    experiment: str = "colam"  # MLflow experiment of the runs; the server is MLFLOW_TRACKING_URI
    register: str = ""  # `colam compare` registers its best run's network here, alias champion ("": none)


@dataclass
class Params:
    config: Config
    compare: CompareParams
    tracking: TrackingParams
    analysis: AnalysisParams = field(default_factory=AnalysisParams)
    raw_data: RawDataParams = field(default_factory=RawDataParams)
    given: tuple[str, ...] = ()  # the pipeline sections the file itself holds


PIPELINE_SECTIONS = {"compare": CompareParams, "analysis": AnalysisParams, "raw_data": RawDataParams,
                     "tracking": TrackingParams}


def load_params(path: str | Path | None, overrides: list[str] | None = None) -> Params:
    raw = read_yaml(path, overrides)
    given = tuple(name for name in PIPELINE_SECTIONS if name in raw)
    sections = {name: build_section(kind, raw.pop(name, {}), f"{name}.") for name, kind in PIPELINE_SECTIONS.items()}
    config = from_dict(raw)
    validate(config)
    params = Params(config, **sections, given=given)
    _validate(params)
    return params


def _each(key: str, values: list, ok, what: str, required: bool = False) -> None:
    """Every item of the list `key` passes `ok`, and none repeats (DVC names one run per value); a `required`
    list holds at least one item."""
    require(values or not required, key, values, "must list at least one value")
    for i, value in enumerate(values):
        require(ok(value), f"{key}[{i}]", value, what)
    if len(set(values)) != len(values):
        raise ColamError(f"{key}: {values} repeats a value (DVC names one run per value)")


def _validate(params: Params) -> None:
    compare, analysis, grid = params.compare, params.analysis, params.analysis.grid
    _each("compare.baselines", compare.baselines, lambda name: name in METHODS and name != "colam",
          f"must be a method other than colam (COLAM runs once per temperature): {', '.join(METHODS)}")
    _each("compare.temperatures", compare.temperatures, lambda t: t > 0, "must be > 0")
    _each("compare.seeds", compare.seeds, lambda seed: 0 <= seed < 2**32, "must be in [0, 2**32)", required=True)
    experiment = params.tracking.experiment
    require(experiment.strip() != "", "tracking.experiment", experiment, "must not be empty")
    registered_name(params.tracking.register, "tracking.register")
    require(analysis.samples_per_class >= 1, "analysis.samples_per_class", analysis.samples_per_class, "must be >= 1")
    require(analysis.nearest >= 1, "analysis.nearest", analysis.nearest, "must be >= 1")
    require(not analysis.classes or len(analysis.classes) == 3, "analysis.classes", analysis.classes,
            "must list exactly 3 classes (names or indices), or be empty to choose them from the soft labels")
    _each("analysis.grid.epochs_per_stage", grid.epochs_per_stage, lambda t: t >= 1, "must be >= 1", required=True)
    _each("analysis.grid.peers", grid.peers, lambda p: p == "all" or (isinstance(p, int) and p >= 1),
          "must be 'all' or an integer >= 1", required=True)


def check_pipeline(params: Params) -> None:
    """What the DVC pipeline's stages need of the sections params.yaml holds (`colam check`, the gate): with raw_data,
    the data stage's folder as data.root; with analysis, its baselines at the run's seed, grid intervals dividing the
    epochs."""
    config, compare = params.config, params.compare
    if "raw_data" in params.given:
        expected = f"data/raw/{config.data.name}"  # the data stage writes data.name's files there
        require(config.data.root.rstrip("/") == expected, "data.root", config.data.root, f"must be {expected}: the "
                f"pipeline's data stage keeps {config.data.name}'s files there (set data.root={expected})")
        require(params.raw_data.source.strip() != "", "raw_data.source", params.raw_data.source,
                "must be a folder, download or bundled")
    if "analysis" in params.given:
        for name in ("hl", "ls"):  # the analyses compare the main COLAM run with these baselines
            require(name in compare.baselines, "compare.baselines", compare.baselines,
                    f"must include {name}: the analyses compare COLAM with hl and ls")
        require(config.seed in compare.seeds, "compare.seeds", compare.seeds,
                f"must include the run's seed {config.seed}: the analyses compare runs of that seed")
        for i, interval in enumerate(params.analysis.grid.epochs_per_stage):
            require(config.train.epochs % interval == 0, f"analysis.grid.epochs_per_stage[{i}]", interval,
                    f"must divide train.epochs ({config.train.epochs}) into whole stages")


def pipeline_variants(params: Params, methods: list[str]) -> list[str]:
    """The MLflow variant tags (`pipelines.tracking.variant`) of `methods` with params.yaml's settings."""
    from pipelines.tracking import variant

    config = params.config
    return [variant(replace(config, method=replace(config.method, name=name))) for name in methods]


def dvc_sets(path: str | Path) -> list[str]:
    """`dvc exp run -S KEY=VALUE` arguments that lay the run config in `path` over params.yaml: one per value (nested
    keys dotted, lists and mappings in YAML flow style), so that a config file stays the one place its settings are
    written (the Makefile's run-fashion-mnist)."""
    import yaml

    raw = read_yaml(path)
    validate(from_dict(raw))  # a config colam train takes, or one line naming the bad key
    sets = []
    for key, value in dotted_items(raw):
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        sets += ["-S", f"{key}={text}"]
    return sets


if __name__ == "__main__":  # python -m pipelines.params dvc-sets FILE
    import shlex
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "dvc-sets":
        sys.exit("usage: python -m pipelines.params dvc-sets CONFIG")
    try:
        print(" ".join(shlex.quote(arg) for arg in dvc_sets(sys.argv[2])))
    except ColamError as exc:
        sys.exit(f"colam: error: {exc}")
