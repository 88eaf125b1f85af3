"""The `colam` command: one argparse parser for every subcommand (docs/cli.md lists them); `colam analyze` is
defined in pipelines/analysis.py, `colam kfp` in pipelines/kubeflow.py.

`--config` may be a pipeline params.yaml: its compare, analysis, raw_data and tracking sections are checked and set
aside, the rest is the run's config. Training is tracked in MLflow with `--track`, or whenever MLFLOW_TRACKING_URI is
set (`--no-track`: never). Bad input exits with status 2 and one line on stderr naming the input; nothing is written.

Data-parallel training on several GPUs (or CPU processes) runs the same command under torchrun:
    torchrun --standalone --nproc-per-node N -m pipelines.cli train --config FILE --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from colam import distributed
from colam.errors import ColamError, one_line, os_error
from pipelines import analysis, compare, kubeflow, sweep
from pipelines.arguments import (alias_name, config_options, params, registered_name, run_log, tracking_options,
                                 training_options)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        # under torchrun, rank 0 tells the story; the other ranks speak only to warn
        logging.basicConfig(level=logging.INFO if distributed.env_world().main else logging.WARNING,
                            format="%(message)s", stream=sys.stderr)
        # MLflow's and alembic's INFO lines (store creation, migrations) would come before a one-line error; MLflow
        # reads the variable when it is imported, the logger level covers an earlier import.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        return args.func(args) or 0  # a command returns None when it succeeds
    except ColamError as exc:
        _say(f"colam: error: {exc}")
        return 2
    except OSError as exc:  # disk full, read-only, permission, not a folder: the path and the reason
        _say(f"colam: error: {os_error(exc)}")
        return 2
    except KeyboardInterrupt:
        _say("colam: interrupted; run the same command again to resume from the last completed epoch")
        return 130
    finally:
        distributed.shutdown()


def _say(line: str) -> None:
    """One line on stderr in a single write: under torchrun every rank may say it at once, and writes of a whole line
    to a pipe do not interleave (print writes the text and the newline apart). `one_line` escapes, cuts, redacts."""
    sys.stderr.write(one_line(line) + "\n")
    sys.stderr.flush()


class Parser(argparse.ArgumentParser):
    """argparse errors as every other (`colam: error: ...`, one line, exit 2), not a usage block; --help still works."""

    def error(self, message: str):
        raise ColamError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="colam", description="COLAM and soft-label baselines for image classification, "
                                              "tracked, compared and analysed")
    commands = parser.add_subparsers(dest="command", required=True)
    _run_commands(commands)
    commands.add_parser("methods", help="list the training methods").set_defaults(func=_registry)
    models = commands.add_parser("models", help="list the models with parameter counts")
    models.add_argument("--classes", type=int, nargs="+", default=[10, 100], help="class counts to count for")
    models.set_defaults(func=_models)
    commands.add_parser("datasets", help="list the data sets").set_defaults(func=_registry)
    _pipeline_commands(commands)
    return parser


def _run_commands(commands) -> None:
    """train, prepare, evaluate and data get: a run and its inputs."""
    train = commands.add_parser("train", help="train one run (resumes an interrupted run in the same --out)")
    config_options(train)
    train.add_argument("--out", required=True, help="output folder of the run")
    train.add_argument("--split", help="a split written by `colam prepare` (default: draw it from data.*)")
    train.add_argument("--stage", type=int, help="train this stage only, from --out/stage_{K-1} to --out/stage_K")
    training_options(train)
    tracking_options(train, "MLflow experiment (default: tracking.experiment of the params, or colam)")
    train.add_argument("--run-name", help="MLflow run name (default: the --out folder's name)")
    train.add_argument("--register", metavar="NAME", help="with tracking: register the final network as a version of "
                                                          "the MLflow registered model NAME")
    train.set_defaults(func=_train)

    prepare = commands.add_parser("prepare", help="write the training/validation split and the labels training sees")
    config_options(prepare)
    prepare.add_argument("--out", required=True, help="folder for split.npz and split.json")
    prepare.set_defaults(func=_prepare)

    evaluate = commands.add_parser("evaluate", help="score a stage's model: accuracy, NLL, calibration, confusion")
    config_options(evaluate)
    evaluate.add_argument("--stage-dir", required=True, help="a stage folder of a run (model.pt, state.pt)")
    evaluate.add_argument("--split", help="the split the run was trained on (default: draw it from data.*)")
    evaluate.add_argument("--out", required=True, help="folder for metrics.json, history.csv, predictions.csv")
    evaluate.set_defaults(func=_evaluate)

    data = commands.add_parser("data", help="data sets as files: a checked copy for DVC to version")
    get = data.add_subparsers(dest="data_command", required=True).add_parser(
        "get", help="write data.name's files, checked, into --out (the folder to use as data.root)")
    config_options(get)
    get.add_argument("--from", dest="source", required=True, help="a folder holding the data set's original files, "
                     "'download' (torchvision's mirrors) or 'bundled' (digits, shipped with scikit-learn)")
    get.add_argument("--out", required=True, help="the folder to write (data/raw/NAME in the DVC pipeline)")
    get.set_defaults(func=_data_get)


def _pipeline_commands(commands) -> None:
    """check, compare, analyze, tracking sync and kfp: the pipeline around the runs."""
    check = commands.add_parser("check", help="validate a params.yaml/config without training (exit 2 naming a "
                                              "bad key)")
    config_options(check, required=True, help="params.yaml or a colam config")
    check.add_argument("--out", help="write a marker file here when the params are valid (the DVC gate)")
    check.set_defaults(func=_check)

    comparison = commands.add_parser("compare", help="test accuracy by method and temperature over the MLflow runs")
    compare.add_arguments(comparison)
    comparison.add_argument("--params", help="take --experiment, --seeds, --methods and --temperatures from the "
                                             "tracking and compare sections of this params.yaml")
    comparison.set_defaults(func=_compare)

    sweep.add_arguments(commands.add_parser("sweep", help="train the pipeline's comparison, grid or expected-accuracy "
                                                          "runs, several at once (a process each imports torch once)"))
    analysis.add_arguments(commands.add_parser("analyze", help="the paper's analyses of finished runs: figures, "
                                                               "tables, MLflow (curves, expected-accuracy, ...)"))

    tracking = commands.add_parser("tracking", help="the MLflow records of a run folder")
    sync = tracking.add_subparsers(dest="tracking_command", required=True).add_parser(
        "sync", help="bring MLFLOW_TRACKING_URI up to what a run folder holds (what it kept while the store did not "
                     "answer)")
    sync.add_argument("dir", help="the run's --out folder")
    sync.add_argument("--experiment", default="colam",
                      help="the MLflow experiment the run is tracked in (default: colam)")
    sync.set_defaults(func=_tracking_sync)

    kubeflow.add_arguments(commands.add_parser("kfp", help="the Kubeflow pipeline: compile, submit, or run it here"))


def _train(args) -> None:
    from colam.engine import fit, fit_stage

    config = params(args).config
    with run_log(args, args.run_name) as log:
        if args.stage is None:
            metrics = fit(config, args.out, run_log=log, progress=args.progress, split_dir=args.split,
                          restart_if_changed=args.restart_if_changed)
        else:  # a stage folder is always trained afresh unless it holds this very stage
            metrics = fit_stage(config, args.out, args.stage, run_log=log, progress=args.progress, split_dir=args.split)
    if distributed.current().main:  # under torchrun, once
        print(json.dumps(metrics))


def _prepare(args) -> None:
    from colam.data import save_split

    summary = save_split(params(args).config.data, args.out)
    print(json.dumps({k: summary[k] for k in ("data", "train_samples", "val_samples", "test_samples", "noisy_labels")}))


def _evaluate(args) -> None:
    from colam.evaluation import evaluate_run

    metrics = evaluate_run(params(args).config, args.stage_dir, args.out, split_dir=args.split)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}))


def _data_get(args) -> None:
    from colam.datasets import get_data

    written = get_data(params(args).config.data.name, args.source, args.out)
    print(json.dumps({"out": args.out, "files": written}))


def _models(args) -> None:
    import torch

    from colam.models import MODELS, build_model, count_parameters

    header = "".join(f"{f'{c} classes':>14}" for c in args.classes)
    print(f"{'model':<18}{'input':>6}{header}")
    for name, spec in MODELS.items():
        with torch.device("meta"):  # counting needs shapes, not memory or initialisation time
            counts = [count_parameters(build_model(name, c)) for c in args.classes]
        print(f"{name:<18}{spec.input_size:>6}" + "".join(f"{n:>14,}" for n in counts))


def _registry(args) -> None:
    from colam.datasets import DATASETS
    from colam.methods import METHODS

    if args.command == "methods":
        print("\n".join(f"{name:<14} {method.summary}  [{method.paper}]" for name, method in METHODS.items()))
    else:
        print("\n".join(f"{name:<14} {spec.description}" for name, spec in DATASETS.items()))


def _check(args) -> None:
    from colam import io as cio
    from colam.engine import check_names
    from pipelines.params import check_pipeline

    checked = params(args)
    check_names(checked.config)
    check_pipeline(checked)
    if args.out:
        # Constant content: a valid change of params.yaml leaves this file as it was, so the stages
        # after the gate re-run only for the keys they declare themselves.
        cio.write_json(args.out, {"params": args.config, "valid": True})
    print(f"{args.config}: valid")


def _tracking_sync(args) -> None:
    from pipelines.tracking import sync

    print(sync(args.dir, args.experiment))


def _compare(args) -> int:
    from pipelines.params import load_params, pipeline_variants
    from pipelines.tracking import connect, protocol_digest

    if args.params:
        given = load_params(args.params)
        args.experiment = args.experiment or given.tracking.experiment
        args.protocol = args.protocol or protocol_digest(given.config)
        args.seeds = args.seeds or given.compare.seeds
        args.methods = args.methods or [*given.compare.baselines, "colam"]
        args.temperatures = args.temperatures or given.compare.temperatures
        # params.yaml's method settings: other runs in the experiment (the grid cells, earlier settings) are left out
        args.variants = pipeline_variants(given, args.methods)
        args.register = args.register or (given.tracking.register if args.track else None)
    args.register, args.alias = registered_name(args.register, "--register"), alias_name(args.alias)
    if args.register and not args.track:
        raise ColamError("--register: registers the best run's model in MLflow, with --track only")
    if not args.experiment:
        raise ColamError("--experiment: name the MLflow experiment to compare (or give --params)")
    return compare.run(args, connect(create=args.track))  # without --track it reads: no store is created


if __name__ == "__main__":
    sys.exit(main())
