"""Train several methods over several seeds with one config and print accuracy (mean ± std) and
wall time per method, the way the closing notes and the README quote them.

    python benchmarks/compare_methods.py --config configs/digits.yaml --methods hl ls colam \
        --seeds 0 1 2 --out runs/compare [--set KEY=VALUE ...] [--jobs 2] [--docs NAME]

Each run is `colam train` in its own process (one torch thread each when --jobs > 1), into
OUT/<method>/seed_<s>; a finished run is not trained again. Writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docs_tables


def run_one(config: str, method: str, seed: int, out: Path, overrides: list[str], threads: int) -> dict:
    run_dir = out / method / f"seed_{seed}"
    command = [sys.executable, "-m", "pipelines.cli", "train", "--config", config, "--out", str(run_dir),
               "--set", f"method.name={method}", "--set", f"seed={seed}", "--no-progress", "--no-track"]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed:\n{result.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["process_seconds"] = time.perf_counter() - began
    return metrics


def summarise(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--methods", nargs="+", default=["hl", "ls", "colam"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores/jobs threads)")
    parser.add_argument("--docs", metavar="NAME", help="also write the table into the docs, between "
                                                       "<!-- table:NAME --> markers")
    args = parser.parse_args()
    if args.docs:
        docs_tables.check_table(args.docs)

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(args.config, *job, args.out, args.overrides, threads), jobs))
    rows = {}
    for (method, _), metrics in zip(jobs, results):
        rows.setdefault(method, []).append(metrics)
    has_val = all("val_acc" in m for m in results)
    lines = [f"config {args.config} {' '.join(args.overrides)}; seeds {args.seeds}; {threads} thread(s) per run", "",
             "| method | test acc % |" + (" val acc % |" if has_val else "") + " train s/run |",
             "|---|---:|" + ("---:|" if has_val else "") + "---:|"]
    summary = {}
    for method, runs in rows.items():
        test = [r["test_acc"] for r in runs]
        seconds = statistics.mean(r["wall_time_s"] for r in runs)
        val = f" {summarise([r['val_acc'] for r in runs])} |" if has_val else ""
        lines.append(f"| {method} | {summarise(test)} |{val} {seconds:.1f} |")
        summary[method] = {"test_acc": test, "val_acc": [r.get("val_acc") for r in runs],
                           "wall_time_s": [r["wall_time_s"] for r in runs]}
    print("\n".join(lines))
    if args.docs:
        docs_tables.write_table(args.docs, "\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                                       "seeds": args.seeds, "methods": summary}, indent=2))


if __name__ == "__main__":
    main()
