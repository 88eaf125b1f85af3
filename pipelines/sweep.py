"""`colam sweep`: the pipeline's many short runs (comparison, grid, expected-accuracy) side by side in a few worker
processes that each import torch once and train one run after another.

Each run is the `colam` command its own DVC stage would run (`train ... --restart-if-changed`, `analyze grid-cell ...`,
`analyze expected-accuracy --stage K ...`), called in the worker: same folder, MLflow records and numbers, and a
finished run is read, not trained again. On CPU a run's numbers depend on torch's thread count, so that is the run's
own `train.threads`, never the number of runs beside it: `--jobs auto` runs cores / train.threads at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from colam.errors import ColamError
from pipelines.params import Params, load_params

log = logging.getLogger("colam")
PLANS = ("compare", "grid", "expected")
_running = ""  # the run this process trains now: its log lines start with its name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", choices=PLANS, help="compare: every compare.baselines method and COLAM at every "
                        "compare.temperatures T, once per compare.seeds seed; grid: COLAM at every analysis.grid "
                        "cell; expected: a fixed-label run on each stage's soft labels of --run")
    parser.add_argument("--params", required=True, help="the pipeline's params.yaml")
    parser.add_argument("--out", required=True, type=Path, help="the folder of the runs, one subfolder a run")
    parser.add_argument("--split", help="a split written by `colam prepare` (default: draw it from data.*)")
    parser.add_argument("--run", help="expected: the COLAM run whose stages' soft labels are trained on")
    parser.add_argument("--jobs", default="auto", help="runs at once (default auto: the CPU cores / train.threads, "
                                                       "1 where train.threads is auto)")
    parser.set_defaults(func=sweep)


def plan_runs(args, params: Params) -> list[tuple[str, list[str]]]:
    """(name, the colam command's arguments) of every run of the plan, each into --out/NAME."""
    common = ["--config", args.params, *(["--split", args.split] if args.split else []), "--no-progress",
              "--restart-if-changed"]
    if args.plan == "compare":
        compare = params.compare
        runs = [(f"{m}-seed{s}", [f"method.name={m}", f"seed={s}"]) for m in compare.baselines for s in compare.seeds]
        runs += [(f"colam-T{t}-seed{s}", ["method.name=colam", f"method.colam.temperature={t}", f"seed={s}"])
                 for t in compare.temperatures for s in compare.seeds]
        return [(name, ["train", *common, "--out", str(args.out / name), "--track",
                        *(arg for item in sets for arg in ("--set", item))]) for name, sets in runs]
    if args.plan == "grid":
        grid = params.analysis.grid
        return [(f"t{t}-peers{p}", ["analyze", "grid-cell", *common, "--epochs-per-stage", str(t), "--peers", str(p),
                                    "--out", str(args.out / f"t{t}-peers{p}"), "--track"])
                for t in grid.epochs_per_stage for p in grid.peers]
    if not args.run:
        raise ColamError("--run: required by the expected plan (the COLAM run whose soft labels are trained on)")
    from colam.analysis.expected import labelled_stages
    from colam.runs import open_run

    stages = [k for k, _ in labelled_stages(open_run(args.run, "--run"))]
    return [(f"stage_{k}", ["analyze", "expected-accuracy", *common, "--run", args.run, "--runs-out", str(args.out),
                            "--stage", str(k), "--no-track"]) for k in stages]


def jobs_flag(text: str) -> int | None:
    if text == "auto":
        return None
    with contextlib.suppress(ValueError):
        if (count := int(text)) >= 1:
            return count
    raise ColamError(f"--jobs: must be auto or a whole number >= 1, got {text!r}")


def workers(jobs: int | None, threads: int | str, runs: int) -> int:
    """How many runs train at once: --jobs, or (auto) as many as the cores hold at train.threads each."""
    if jobs is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        jobs = cores // threads if threads != "auto" else 1
    return max(1, min(jobs, runs))


def sweep(args) -> int:
    jobs = jobs_flag(args.jobs)
    params = load_params(args.params)
    runs = plan_runs(args, params)
    count = workers(jobs, params.config.train.threads, len(runs))
    if count > 1 and params.config.train.threads == "auto":
        log.warning("train.threads is auto: each of the %d runs side by side uses every core (set train.threads to "
                    "cores / --jobs to share them)", count)
    log.info("sweep %s: %d run(s) into %s, %d at a time", args.plan, len(runs), args.out, count)
    began = time.perf_counter()
    code = _in_process(runs) if count == 1 else _in_workers(runs, count)
    if code == 0:
        log.info("sweep %s: %d run(s) done in %.1f s", args.plan, len(runs), time.perf_counter() - began)
    return code


def _in_process(runs: list[tuple[str, list[str]]]) -> int:
    _name_log_lines()
    for name, argv in runs:
        if code := train_one(name, argv):  # the first failure stops the sweep
            return code
    return 0


def _in_workers(runs: list[tuple[str, list[str]]], workers: int) -> int:
    """The runs in `workers` processes, in order, no more handed out than there are workers (the pool would
    queue one more, and it could not be taken back): after a run fails none starts, those under way finish."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker)
    waiting, running, failed = list(runs), set(), 0
    try:
        while running or (waiting and not failed):
            while waiting and not failed and len(running) < workers:
                running.add(pool.submit(train_one, *waiting.pop(0)))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            failed = failed or next(filter(None, (future.result() for future in done)), 0)
        return failed
    except BrokenProcessPool:
        sys.stderr.write("colam: error: a worker process of the sweep died (killed, or out of memory); run the same "
                         "command again to resume\n")
        return 1
    finally:  # on Ctrl-C too: each worker has it, and stops its run as a plain run does
        pool.shutdown(wait=True, cancel_futures=True)


def train_one(name: str, argv: list[str]) -> int:
    """One run of the sweep: the colam command, its log lines named; its exit status."""
    global _running
    from pipelines.cli import main

    _running = name
    try:
        return main(argv)
    finally:
        sys.stdout.flush()


def _start_worker() -> None:
    if sys.platform == "linux":  # a worker whose sweep was killed stops too, rather than train on alone
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _name_log_lines()


class _Named(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"[{_running}] {super().format(record)}" if _running else super().format(record)


def _name_log_lines() -> None:
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_Named("%(message)s"))
