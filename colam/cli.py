"""The `colam` console script.

    colam train --config FILE [--set KEY=VALUE ...] --out DIR
    colam methods
    colam models
    colam datasets

Bad input exits with status 2 and one line on stderr naming the input; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from colam.errors import ColamError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except ColamError as exc:
        print(f"colam: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("colam: interrupted; run the same command again to resume from the last completed epoch",
              file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colam", description="COLAM and soft-label baselines for image classification")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one run (resumes an interrupted run in the same --out)")
    train.add_argument("--config", help="YAML config file (defaults apply to keys it leaves out)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set method.colam.temperature=2 (repeatable)")
    train.add_argument("--out", required=True, help="output folder of the run")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show a progress bar per epoch (default: when stderr is a terminal)")
    train.set_defaults(func=_train)

    commands.add_parser("methods", help="list the training methods").set_defaults(func=_methods)
    models = commands.add_parser("models", help="list the models with parameter counts")
    models.add_argument("--classes", type=int, nargs="+", default=[10, 100], help="class counts to count for")
    models.set_defaults(func=_models)
    commands.add_parser("datasets", help="list the data sets").set_defaults(func=_datasets)
    return parser


def _train(args) -> int:
    from colam.config import load_config
    from colam.engine import fit

    config = load_config(args.config, args.overrides)
    metrics = fit(config, args.out, progress=args.progress)
    print(json.dumps(metrics))
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
