"""The Kubeflow pipeline run locally against `colam train` on the same config: wall times and ratio.

    .venv/bin/python benchmarks/kfp_local_overhead.py [--params params.yaml] [--stages M] [--repeats 3]
                                                      [--docker-image local/colam:0.1.0]

A: `colam kfp local`: prepare, M x (train stage, estimate soft labels), evaluate, each step a
   process started by kfp's SubprocessRunner (untracked: MLFLOW_TRACKING_URI is removed);
B: `colam train` of the config the pipeline resolves, one process, untracked;
C: with --docker-image, `colam kfp local --runner docker`: each step a container of that image.
They alternate (A B C A B C ...), each in a fresh folder; the medians and the median ratios to B are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COLAM = Path(sys.executable).parent / "colam"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--stages", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docker-image", help="also time `colam kfp local --runner docker --image IMAGE`")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from colam.steps import step_config
    from pipelines.params import load_params

    params = load_params(args.params)
    stages = args.stages or params.config.method.colam.stages
    config = step_config(params.config.to_dict(), steps=stages)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    work = Path(tempfile.mkdtemp(prefix="colam-kfp-bench-"))
    (work / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    commands = {
        "kfp local": [str(COLAM), "kfp", "local", "--params", str(args.params.resolve()), "--stages", str(stages),
                      "--root", "{out}"],
        "colam train": [str(COLAM), "train", "--config", str(work / "config.yaml"), "--out", "{out}"],
    }
    if args.docker_image:
        commands["kfp docker"] = [*commands["kfp local"], "--runner", "docker", "--image", args.docker_image]
    times: dict[str, list[float]] = {name: [] for name in commands}
    metrics: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name, command in commands.items():
            out = work / f"{name.replace(' ', '-')}-{repeat}"
            began = time.perf_counter()
            result = subprocess.run([part.replace("{out}", str(out)) for part in command], cwd=work, env=env,
                                    capture_output=True, text=True)
            times[name].append(time.perf_counter() - began)
            if result.returncode != 0:
                sys.stderr.write(result.stdout[-2000:] + result.stderr[-2000:])
                return 1
            metrics[name] = json.loads(result.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    train_acc = metrics["colam train"]["test_acc"]
    print(f"config: {args.params.name}, {stages} stages x {config.train.epochs // stages} epochs, "
          f"{config.method.name}, {config.data.name}/{config.model.name}; {args.repeats} runs each, alternating")
    for name, values in times.items():
        print(f"  {name:<12} median {statistics.median(values):7.1f} s   (min {min(values):.1f}, max {max(values):.1f})")
    for name in (name for name in commands if name != "colam train"):
        ratios = [a / b for a, b in zip(times[name], times["colam train"])]
        acc = metrics[name]["metrics"]["test_acc"]
        print(f"  ratio {name} / colam train: median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}); test accuracy {acc:.4f} against {train_acc:.4f} "
              f"({'identical' if acc == train_acc else 'DIFFERENT'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
