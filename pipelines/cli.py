"""The `colam` console script: the library's commands, plus MLflow tracking and `colam compare`.

    colam train --config params.yaml --out DIR [--track] [--experiment NAME] ...
    colam compare --experiment NAME [--params params.yaml] [--out DIR]
    colam analyze curves|expected-accuracy|geometry|soft-labels|grid-cell|grid ...   (pipelines/analysis.py)
    colam kfp compile|submit|local ...   (pipelines/kubeflow.py)
    colam tracking sync DIR   (send the MLflow records a run kept offline in DIR/mlflow-journal)

`--config` may be a pipeline params.yaml: its `compare` and `tracking` sections are checked and set
aside, the rest is the run's config. Training is tracked in MLflow with `--track`, or whenever
MLFLOW_TRACKING_URI is set; the library's own `python -m colam.cli` never tracks.
"""

from __future__ import annotations

import argparse
import os
import sys

from colam import cli as library_cli


def main(argv: list[str] | None = None) -> int:
    return library_cli.main(argv, build_parser())


def build_parser() -> argparse.ArgumentParser:
    parser = library_cli.build_parser()
    parser.set_defaults(load_config=_load_config, run_log=_run_log)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = commands.choices["train"]
    train.add_argument("--track", action=argparse.BooleanOptionalAction, default=None,
                       help="log the run to MLflow (default: when MLFLOW_TRACKING_URI is set)")
    train.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment of the params, or colam)")
    train.add_argument("--run-name", help="MLflow run name (default: the --out folder's name)")

    check = commands.add_parser("check", help="validate a params.yaml/config without training (exit 2 naming a bad key)")
    check.add_argument("--config", required=True, help="params.yaml or a colam config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--out", help="write a marker file here when the params are valid (the DVC gate)")
    check.set_defaults(func=_check)

    compare = commands.add_parser("compare", help="test accuracy by method and temperature over the MLflow runs")
    from pipelines.compare import add_arguments

    add_arguments(compare)
    compare.add_argument("--params", help="take --experiment, --seeds, --methods and --temperatures from the "
                                          "tracking and compare sections of this params.yaml")
    compare.set_defaults(func=_compare)

    from pipelines.analysis import add_arguments as analysis_arguments

    analysis_arguments(commands.add_parser("analyze", help="the paper's analyses of finished runs: figures, tables, "
                                                           "MLflow (curves, expected-accuracy, geometry, ...)"))

    tracking = commands.add_parser("tracking", help="the MLflow records a run kept offline")
    tracking_commands = tracking.add_subparsers(dest="tracking_command", required=True)
    sync = tracking_commands.add_parser("sync", help="send the journal of a run folder (kept while the tracking "
                                                     "store did not answer) to MLFLOW_TRACKING_URI")
    sync.add_argument("dir", help="the run's --out folder (or its mlflow-journal folder)")
    sync.set_defaults(func=_tracking_sync)

    from pipelines.kubeflow import add_arguments as kubeflow_arguments

    kubeflow_arguments(commands.add_parser("kfp", help="the Kubeflow pipeline: compile, submit, or run it here"))
    return parser


def _load_config(args):
    from pipelines.params import load_params

    params = load_params(args.config, args.overrides)
    args.params_tracking, args.params_given = params.tracking, params.given
    return params.config


def _check(args) -> int:
    from colam import io as cio
    from colam.engine import check_names

    config = args.load_config(args)
    check_names(config)
    if {"analysis", "raw_data"} & set(args.params_given):
        from pipelines.params import check_pipeline_analysis, check_pipeline_data, load_params

        params = load_params(args.config, args.overrides)
        if "raw_data" in args.params_given:
            check_pipeline_data(params)
        if "analysis" in args.params_given:
            check_pipeline_analysis(params)
    if args.out:
        # Constant content: a valid change of params.yaml leaves this file as it was, so the stages
        # after the gate re-run only for the keys they declare themselves.
        cio.write_json(args.out, {"params": args.config, "valid": True})
    print(f"{args.config}: valid")
    return 0


def _run_log(args, config):
    from contextlib import nullcontext

    from colam.distributed import env_world

    track = args.track if args.track is not None else bool(os.environ.get("MLFLOW_TRACKING_URI"))
    if not track or not env_world().main:  # under torchrun, rank 0 alone reports
        return nullcontext(None)
    from pipelines.tracking import open_run_log

    experiment = args.experiment or args.params_tracking.experiment
    return open_run_log(experiment, args.out, run_name=args.run_name)


def _tracking_sync(args) -> int:
    from pipelines.tracking import sync

    print(sync(args.dir))
    return 0


def _compare(args) -> int:
    from pipelines.compare import run
    from pipelines.tracking import connect

    if args.params:
        from pipelines.params import load_params

        from pipelines.tracking import protocol_digest

        params = load_params(args.params)
        args.experiment = args.experiment or params.tracking.experiment
        args.protocol = args.protocol or protocol_digest(params.config)
        args.seeds = args.seeds or params.compare.seeds
        args.methods = args.methods or [*params.compare.baselines, "colam"]
        args.temperatures = args.temperatures or params.compare.temperatures
        # the methods' settings of params.yaml: other runs in the experiment (the analyses' grid
        # cells, earlier settings) are left out
        from pipelines.params import pipeline_variants

        args.variants = pipeline_variants(params, args.methods)
    if not args.experiment:
        from colam.errors import ColamError

        raise ColamError("--experiment: name the MLflow experiment to compare (or give --params)")
    return run(args, connect())


if __name__ == "__main__":
    sys.exit(main())
