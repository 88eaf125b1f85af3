"""What orchestration costs against the same training done by bare `colam train` processes, untracked.

startup: the wall time of `colam --help`, `colam check` and a one-epoch training step, and their imports.

kfp: `colam kfp local` (each step a process; with --docker-image also a run where each is a container) against one
     `colam train` of the config it resolves, alternating; medians and median ratios; and the floor of a runner that
     runs the steps one after another: each step process imports torch, which one `colam train` does once.
dvc: `dvc repro` from scratch (tracked) in a fresh git copy of the pipeline under --workdir against bare untracked
     `colam train` processes of every run it trained (main, comparison, grid, expected), each from the run's own
     config.yaml, as many at a time as `colam sweep` runs; wall times, ratio, training-loop seconds, and where A's time
     went: its stages' wall times by what they run."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from functools import partial
from pathlib import Path

import yaml

from colam.steps import step_config
from harness import ROOT, train_all
from pipelines.params import load_params
from pipelines.sweep import workers

BIN = Path(sys.executable).parent
UNTRACKED = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def kfp_local(args) -> None:
    run = load_params(args.params).config
    stages = args.stages or run.method.colam.stages
    config = step_config(run.to_dict(), steps=stages)
    work = Path(tempfile.mkdtemp(prefix="colam-kfp-bench-"))
    (work / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    local = [str(BIN / "colam"), "kfp", "local", "--params", str(args.params.resolve()), "--stages", str(stages)]
    commands = {"kfp local": local, "colam train": [str(BIN / "colam"), "train", "--config", str(work / "config.yaml")]}
    if args.docker_image:
        commands["kfp docker"] = [*local, "--runner", "docker", "--image", args.docker_image]
    times, metrics = {name: [] for name in commands}, {}
    for repeat in range(args.repeats):
        for name, command in commands.items():
            out = work / f"{name.replace(' ', '-')}-{repeat}"
            began = time.perf_counter()
            result = subprocess.run([*command, "--root" if "kfp" in name else "--out", str(out)], cwd=work,
                                    env=UNTRACKED, capture_output=True, text=True)
            times[name].append(time.perf_counter() - began)
            if result.returncode != 0:
                sys.exit(result.stdout[-2000:] + result.stderr[-2000:])
            metrics[name] = json.loads(result.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    train_acc = metrics["colam train"]["test_acc"]
    print(f"config: {args.params.name}, {stages} stages x {config.train.epochs // stages} epochs, "
          f"{config.method.name}, {config.data.name}/{config.model.name}; {args.repeats} runs each, alternating")
    for name, values in times.items():
        print(f"  {name:<12} median {statistics.median(values):7.1f} s   "
              f"(min {min(values):.1f}, max {max(values):.1f})")
    for name in (name for name in commands if name != "colam train"):
        ratios = [a / b for a, b in zip(times[name], times["colam train"])]
        acc = metrics[name]["metrics"]["test_acc"]
        print(f"  ratio {name} / colam train: median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}); test accuracy {acc:.4f} against {train_acc:.4f} "
              f"({'identical' if acc == train_acc else 'DIFFERENT'})")
    _kfp_floor(run, stages, statistics.median(times["colam train"]), args.repeats)


def _kfp_floor(run, stages: int, train_seconds: float, repeats: int) -> None:
    """The least `colam kfp local` (one step after another) can take: `colam train`'s time plus, for every step process
    but one, a Python process that imports torch and nothing else (each step trains, estimates or reads with torch).
    A cluster may run the last estimate and the evaluation side by side: one import fewer."""
    from pipelines.kubeflow import build_pipeline

    steps = len(build_pipeline(stages, run.to_dict(), "floor").pipeline_spec.root.dag.tasks)
    import_torch = partial(subprocess.run, [sys.executable, "-c", "import torch"], check=True, env=UNTRACKED)
    torch_import = statistics.median(timeit.repeat(import_torch, number=1, repeat=repeats))
    floor = train_seconds + (steps - 1) * torch_import
    print(f"  floor: {steps} step processes, each importing torch ({torch_import:.2f} s for a process that only "
          f"does that): at least {floor:.1f} s, {floor / train_seconds:.2f}x colam train")


def dvc_repro(args) -> None:
    shutil.rmtree(args.workdir, ignore_errors=True)
    repo = args.workdir / "repo"
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    for package in ("colam", "pipelines"):  # the stages' code dependencies (dvc.yaml deps)
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for command in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=repo, check=True)
    began = time.perf_counter()
    tracked = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
               "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"}
    stages = _timed_repro(repo, tracked, args.workdir / "repro.log")
    dvc_seconds = time.perf_counter() - began
    print(f"A. dvc repro (from scratch, tracked):      {dvc_seconds:7.1f} s "
          f"(DVC before its first stage: {dvc_seconds - sum(seconds for *_, seconds in stages):.1f} s)", flush=True)
    runs = _pipeline_runs(repo)
    kinds = ", ".join(f"{sum(name.startswith(kind) for name in runs)} {kind}" for kind in ("main", "compare", "grid",
                                                                                        "expected"))
    print(f"   of which the training loops themselves: {sum(_loop(folder) for folder, _ in runs.values()):7.1f} s "
          f"(summed over the runs, {kinds})")
    _stage_times(stages, runs)
    jobs = args.jobs or workers(None, load_params(repo / "params.yaml").config.train.threads, len(runs))
    os.chdir(repo)  # the runs' configs name data.root and soft labels relative to the repository
    began = time.perf_counter()  # each run's own config (its train.threads too), `jobs` processes at a time
    direct = dict(train_all({name: (config, args.workdir / "direct" / name, []) for name, (_, config) in runs.items()},
                            jobs, threads=None))
    direct_seconds = time.perf_counter() - began
    print(f"B. colam train, one process per run:       {direct_seconds:7.1f} s ({jobs} at a time)")
    direct_loops = sum(_loop(args.workdir / "direct" / name) for name in direct)
    print(f"   of which the training loops themselves: {direct_loops:7.1f} s")
    print(f"orchestration overhead A/B: {dvc_seconds / direct_seconds:.2f}x")


def _timed_repro(repo: Path, env: dict, log_path: Path) -> list[tuple[str, str, float]]:
    """`dvc repro` with its output in `log_path`; each stage it ran: (name, command, wall seconds), the seconds
    from DVC's 'Running stage' line to the next one's (or the end): the stage's process, DVC's work on its
    outputs and on the next stage's dependencies."""
    stages, began = [], time.perf_counter()
    with open(log_path, "w") as log, subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=repo, env=env, text=True,
                                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as repro:
        for line in repro.stdout:
            log.write(f"{time.perf_counter() - began:8.2f} {line}")
            if line.startswith("Running stage '"):
                stages.append([line.split("'")[1], "", time.perf_counter()])
            elif line.startswith("> ") and stages and not stages[-1][1]:
                stages[-1][1] = line[2:].strip()
    if repro.returncode != 0:
        sys.exit(f"dvc repro failed; its output: {log_path}")
    ends = [start for _, _, start in stages[1:]] + [time.perf_counter()]
    return [(name, command, end - start) for (name, command, start), end in zip(stages, ends)]


def _stage_times(stages: list[tuple[str, str, float]], runs: dict[str, tuple[Path, Path]]) -> None:
    """A's stages by what they run: the chain's `colam train` steps, the `colam sweep`s, and the rest (they
    train nothing); each group's wall time and the training loops its runs hold (a sweep trains two at once)."""
    groups = {"colam train": ("the main run, a process per stage", ("main",)),
              "colam sweep": ("the comparison, grid and expected runs", ("compare/", "grid/", "expected/")),
              "": ("stages that train nothing", ())}
    for command, (label, kinds) in groups.items():
        chosen = [(name, seconds) for name, cmd, seconds in stages
                  if next(c for c in groups if cmd.startswith(c)) == command]
        loops = sum(_loop(folder) for name, (folder, _) in runs.items() if kinds and name.startswith(kinds))
        print(f"   {command or 'other'} ({label}): {sum(s for _, s in chosen):6.1f} s"
              + (f", training loops {loops:.1f} s" if kinds else "")
              + f" [{', '.join(f'{name} {seconds:.1f}' for name, seconds in chosen)}]")


def _pipeline_runs(repo: Path) -> dict[str, tuple[Path, Path]]:
    """Every training run `dvc repro` made, with its config: the main run (params.yaml: it was trained stage by
    stage, its folder holds no config.yaml), and each run of runs/compare, runs/grid and runs/expected."""
    runs = {"main": (repo / "runs/main/stage_4", repo / "params.yaml")}
    for kind in ("compare", "grid", "expected"):
        runs.update({f"{kind}/{folder.name}": (folder, folder / "config.yaml")
                     for folder in sorted((repo / "runs" / kind).iterdir()) if (folder / "metrics.json").is_file()})
    return runs


def _loop(folder: Path) -> float:
    """The seconds of a run's epochs (history.csv: the last stage's holds every epoch of the run)."""
    with open(folder / "history.csv") as rows:
        return sum(float(row["seconds"]) for row in csv.DictReader(rows))


def startup(args) -> None:
    """What a process pays before it trains: the wall time of `colam --help` and `colam check`, and of a step that
    trains one epoch with how much of it is imports (`python -X importtime`, the modules' own times summed)."""
    work = Path(tempfile.mkdtemp(prefix="colam-startup-"))
    digits = work / "digits"  # the bundled digits' arrays, as DVC's data stage and the Kubeflow prepare step save them
    subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "get", "--from", "bundled", "--out", str(digits)],
                   check=True, capture_output=True, env=UNTRACKED)
    one_epoch = ["train", "--config", str(args.params), "--set", "train.epochs=1", "--set", "method.name=hl",
                 "--set", f"data.root={digits}", "--no-track", "--no-progress"]
    commands = {"colam --help": ["--help"], "colam check": ["check", "--config", str(args.params)],
                "train step, 1 epoch": one_epoch}
    print(f"start-up ({args.repeats} runs each, medians; {os.cpu_count()} CPU cores):")
    for name, argv in commands.items():
        walls, imports = [], []
        for repeat in range(args.repeats):
            out = ["--out", str(work / f"run-{repeat}")] if argv is one_epoch else []
            began = time.perf_counter()
            result = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipelines.cli", *argv, *out],
                                    capture_output=True, text=True, env=UNTRACKED)
            walls.append(time.perf_counter() - began)
            if result.returncode != 0:
                sys.exit(result.stderr[-2000:])
            imports.append(_import_seconds(result.stderr))
        print(f"  {name:<20} wall {statistics.median(walls):5.2f} s, "
              f"of which imports {statistics.median(imports):5.2f} s")
    shutil.rmtree(work, ignore_errors=True)


def _import_seconds(report: str) -> float:
    """The modules' own import times summed, from `python -X importtime`'s lines ('import time: SELF | ...')."""
    own = [line.split("|")[0].removeprefix("import time:").strip() for line in report.splitlines()
           if line.startswith("import time:")]
    return sum(int(us) for us in own if us.isdigit()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measure", nargs="?", choices=("startup", "kfp", "dvc", "all"), default="all")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--stages", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docker-image", help="kfp: also time `colam kfp local --runner docker --image IMAGE`")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/colam-overhead"))
    parser.add_argument("--jobs", type=int, help="dvc: B's processes at a time (default: cores / train.threads)")
    args = parser.parse_args()
    for name, measure in (("startup", startup), ("kfp", kfp_local), ("dvc", dvc_repro)):
        if args.measure in (name, "all"):
            measure(args)


if __name__ == "__main__":
    main()
