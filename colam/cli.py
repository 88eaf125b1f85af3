"""The `colam` console script.

    colam train --config FILE [--set KEY=VALUE ...] --out DIR [--split DIR] [--stage K]
    colam prepare --config FILE --out DIR
    colam evaluate --config FILE --stage-dir DIR --out DIR [--split DIR]
    colam data get --config FILE --from SOURCE --out DIR
    colam methods
    colam models
    colam datasets

Bad input exits with status 2 and one line on stderr naming the input; nothing is written.

Data-parallel training on several GPUs (or CPU processes) runs the same command under torchrun:
    torchrun --standalone --nproc-per-node N -m colam.cli train --config FILE --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from colam.errors import ColamError


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run the command line; `parser` lets a wrapper (pipelines.cli) add commands and tracking."""
    args = (parser or build_parser()).parse_args(argv)
    try:
        from colam.distributed import env_world

        # under torchrun, rank 0 tells the story; the other ranks speak only to warn
        logging.basicConfig(level=logging.INFO if env_world().main else logging.WARNING, format="%(message)s",
                            stream=sys.stderr)
        return args.func(args)
    except ColamError as exc:
        _say(f"colam: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("colam: interrupted; run the same command again to resume from the last completed epoch")
        return 130
    finally:
        from colam import distributed

        distributed.shutdown()


def _say(line: str) -> None:
    """One line on stderr in a single write: under torchrun every rank may say it at once, and
    writes of a whole line to a pipe do not interleave (print writes the text and the newline apart)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colam", description="COLAM and soft-label baselines for image classification")
    # Hooks a wrapper may replace: how --config is read, and the run log a training run reports to.
    parser.set_defaults(load_config=_load_config, run_log=_no_run_log)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one run (resumes an interrupted run in the same --out)")
    _config_arguments(train)
    train.add_argument("--out", required=True, help="output folder of the run")
    train.add_argument("--split", help="a split written by `colam prepare` (default: draw it from data.*)")
    train.add_argument("--stage", type=int, help="train this stage only, from --out/stage_{K-1} to --out/stage_K")
    restart_argument(train)
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show a progress bar per epoch (default: when stderr is a terminal)")
    train.set_defaults(func=_train)

    prepare = commands.add_parser("prepare", help="write the training/validation split and the labels training sees")
    _config_arguments(prepare)
    prepare.add_argument("--out", required=True, help="folder for split.npz and split.json")
    prepare.set_defaults(func=_prepare)

    evaluate = commands.add_parser("evaluate", help="score a stage's model: accuracy, NLL, calibration, confusion")
    _config_arguments(evaluate)
    evaluate.add_argument("--stage-dir", required=True, help="a stage folder of a run (model.pt, state.pt)")
    evaluate.add_argument("--split", help="the split the run was trained on (default: draw it from data.*)")
    evaluate.add_argument("--out", required=True, help="folder for metrics.json, history.csv, predictions.csv")
    evaluate.set_defaults(func=_evaluate)

    data = commands.add_parser("data", help="data sets as files: a checked copy for DVC to version")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    get = data_commands.add_parser("get", help="write data.name's files, checked, into --out (the folder to use as "
                                               "data.root)")
    _config_arguments(get)
    get.add_argument("--from", dest="source", required=True,
                     help="a folder holding the data set's original files, 'download' (torchvision's mirrors) or "
                          "'bundled' (digits, shipped with scikit-learn)")
    get.add_argument("--out", required=True, help="the folder to write (data/raw/NAME in the DVC pipeline)")
    get.set_defaults(func=_data_get)

    commands.add_parser("methods", help="list the training methods").set_defaults(func=_methods)
    models = commands.add_parser("models", help="list the models with parameter counts")
    models.add_argument("--classes", type=int, nargs="+", default=[10, 100], help="class counts to count for")
    models.set_defaults(func=_models)
    commands.add_parser("datasets", help="list the data sets").set_defaults(func=_datasets)
    return parser


def restart_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--restart-if-changed", action="store_true",
                         help="when --out holds a run trained from another configuration, code or inputs, delete it "
                              "and train afresh (for runners that keep earlier outputs themselves, as DVC does)")


def _config_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", help="YAML config file (defaults apply to keys it leaves out)")
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override one key, e.g. --set method.colam.temperature=2 (repeatable)")


def _load_config(args):
    from colam.config import load_config

    return load_config(args.config, args.overrides)


def _no_run_log(args, config):
    return contextlib.nullcontext(None)


def _train(args) -> int:
    from colam import distributed
    from colam.engine import fit, fit_stage

    config = args.load_config(args)
    with args.run_log(args, config) as run_log:
        if args.stage is None:
            metrics = fit(config, args.out, run_log=run_log, progress=args.progress, split_dir=args.split,
                          restart_if_changed=args.restart_if_changed)
        else:  # a stage folder is always trained afresh unless it holds this very stage
            metrics = fit_stage(config, args.out, args.stage, run_log=run_log, progress=args.progress,
                                split_dir=args.split)
    if distributed.current().main:  # under torchrun, once
        print(json.dumps(metrics))
    return 0


def _prepare(args) -> int:
    from colam.data import save_split

    summary = save_split(args.load_config(args).data, args.out)
    print(json.dumps({k: summary[k] for k in ("data", "train_samples", "val_samples", "test_samples", "noisy_labels")}))
    return 0


def _evaluate(args) -> int:
    from colam.evaluation import evaluate_run

    metrics = evaluate_run(args.load_config(args), args.stage_dir, args.out, split_dir=args.split)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}))
    return 0


def _data_get(args) -> int:
    from colam.datasets import get_data

    written = get_data(args.load_config(args).data.name, args.source, args.out)
    print(json.dumps({"out": args.out, "files": written}))
    return 0


def _methods(args) -> int:
    from colam.methods import METHODS

    for name, method in METHODS.items():
        print(f"{name:<14} {method.summary}  [{method.paper}]")
    return 0


def _models(args) -> int:
    import torch

    from colam.models import MODELS, build_model, count_parameters

    header = "".join(f"{f'{c} classes':>14}" for c in args.classes)
    print(f"{'model':<18}{'input':>6}{header}")
    for name, spec in MODELS.items():
        with torch.device("meta"):  # counting needs shapes, not memory or initialisation time
            counts = [count_parameters(build_model(name, c)) for c in args.classes]
        print(f"{name:<18}{spec.input_size:>6}" + "".join(f"{n:>14,}" for n in counts))
    return 0


def _datasets(args) -> int:
    from colam.datasets import DATASETS

    for name, spec in DATASETS.items():
        print(f"{name:<14} {spec.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
