"""Orchestration overhead: `dvc repro` from scratch against the same training done by `colam train`.

Copies the pipeline (dvc.yaml, params.yaml, colam/) into a fresh git repository under --workdir,
then times, end to end:

  A. `dvc repro`: the gate, prepare, COLAM's 4 stages (one process each, tracked in MLflow),
     evaluate, every comparison run (tracked), and `colam compare`;
  B. the same training directly: `colam train` of the main config and of every comparison run,
     one process each, untracked, no DVC.

It prints both wall times, their ratio, and the training-loop seconds the runs report themselves.

    .venv/bin/python benchmarks/pipeline_overhead.py [--workdir /tmp/colam-overhead] [--repro-seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/colam-overhead"))
    parser.add_argument("--repro-seconds", type=float,
                        help="skip A and use this wall time of a `dvc repro` from scratch (e.g. timed `make run`)")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    repo = args.workdir / "repo"
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    shutil.copytree(ROOT / "colam", repo / "colam", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"}
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for command in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=repo, check=True)

    dvc_seconds = args.repro_seconds
    if dvc_seconds is None:
        began = time.perf_counter()
        subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
        dvc_seconds = time.perf_counter() - began

    params = yaml.safe_load((repo / "params.yaml").read_text())
    compare = params["compare"]
    runs = [("main", [])]
    runs += [(f"{m}-seed{s}", [f"method.name={m}", f"seed={s}"]) for m in compare["baselines"] for s in compare["seeds"]]
    runs += [(f"colam-T{t}-seed{s}", ["method.name=colam", f"method.colam.temperature={t}", f"seed={s}"])
             for t in compare["temperatures"] for s in compare["seeds"]]
    env.pop("MLFLOW_TRACKING_URI")
    direct = args.workdir / "direct"
    loop_seconds = 0.0
    began = time.perf_counter()
    for name, overrides in runs:
        sets = [part for item in overrides for part in ("--set", item)]
        subprocess.run([str(BIN / "colam"), "train", "--config", str(repo / "params.yaml"), "--out",
                        str(direct / name), "--no-track", "--no-progress", *sets], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loop_seconds += json.loads((direct / name / "metrics.json").read_text())["wall_time_s"]
    direct_seconds = time.perf_counter() - began

    print(f"training runs: {len(runs)} (main + {len(runs) - 1} comparison runs)")
    print(f"A. dvc repro (from scratch, tracked):      {dvc_seconds:7.1f} s")
    print(f"B. colam train, one process per run:       {direct_seconds:7.1f} s")
    print(f"   of which the training loops themselves: {loop_seconds:7.1f} s")
    print(f"orchestration overhead A/B: {dvc_seconds / direct_seconds:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
