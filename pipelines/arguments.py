"""What several `colam` commands share: --config/--set (a params.yaml, read once), --track and --experiment
(MLflow), and the options of a command that trains (--restart-if-changed, --progress)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from pathlib import Path

from colam.errors import ColamError


def config_options(command: argparse.ArgumentParser, required: bool = False,
                   help: str = "params.yaml or a colam config (defaults apply to keys it leaves out)") -> None:
    command.add_argument("--config", required=required, help=help)
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override one key, e.g. --set method.colam.temperature=2 (repeatable)")


def tracking_options(command: argparse.ArgumentParser, experiment_help: str) -> None:
    command.add_argument("--track", action=argparse.BooleanOptionalAction, default=None,
                         help="log to MLflow (default: when MLFLOW_TRACKING_URI is set)")
    command.add_argument("--experiment", help=experiment_help)


def training_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--restart-if-changed", action="store_true",
                         help="when --out holds a run trained from another configuration, code or inputs, delete it "
                              "and train afresh (for runners that keep earlier outputs themselves, as DVC does)")
    command.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="show a progress bar per epoch (default: when stderr is a terminal)")


def params(args):
    """The params of --config and --set, read once per command."""
    if getattr(args, "loaded_params", None) is None:
        from pipelines.params import load_params

        args.loaded_params = load_params(args.config, args.overrides)
    return args.loaded_params


def tracking(args) -> bool:
    return args.track if args.track is not None else bool(os.environ.get("MLFLOW_TRACKING_URI"))


def run_log(args, run_name: str | None = None):
    """The MLflow run log of a command that trains into --out; none when not tracking, or on a rank other than 0
    under torchrun (rank 0 alone reports)."""
    from colam.distributed import env_world
    if getattr(args, "register", None) and not tracking(args):
        raise ColamError("--register: registers the run's model in MLflow, with --track (or MLFLOW_TRACKING_URI) only")
    if not tracking(args) or not env_world().main:
        return contextlib.nullcontext(None)
    from pipelines.tracking import open_run_log

    split, register = getattr(args, "split", None), registered_name(getattr(args, "register", None), "--register")
    return open_run_log(args.experiment or params(args).tracking.experiment, args.out, run_name=run_name,
                        data_source=str(Path(split).expanduser().resolve()) if split else None, register=register)


def registered_name(name: str | None, key: str) -> str | None:
    """A Model Registry name (None for none or empty), refused where MLflow would refuse it, or its search strings
    could not quote it."""
    if name and (any(c in name for c in "'\"`/:%") or name != name.strip()):
        raise ColamError(f"{key}: {name!r} is no usable model name (no quotes, / : or %, no spaces at its ends)")
    return name or None


def alias_name(alias: str, key: str = "--alias") -> str:
    """A Model Registry alias as MLflow takes it: letters, digits, _ and -, not 'latest' nor v<number>."""
    if not re.fullmatch(r"[\w-]{1,255}", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ColamError(f"{key}: {alias!r} is no usable alias (letters, digits, _ and -; not latest or v<number>)")
    return alias
