"""Train several methods over several seeds with one config and print accuracy (mean ± std) and
wall time per method, the way the closing notes and the README quote them.

Each run is `colam train` in its own process (cores/jobs torch threads each), into
OUT/<method>/seed_<s>; a finished run is not trained again. Writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docs_tables
from harness import mean_std, publish, train


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

    def run(method: str, seed: int) -> dict:
        return train(args.config, args.out / method / f"seed_{seed}",
                     [f"method.name={method}", f"seed={seed}", *args.overrides], threads)

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {method: [pool.submit(run, method, seed) for seed in args.seeds] for method in args.methods}
    rows = {method: [future.result() for future in runs] for method, runs in futures.items()}
    has_val = all("val_acc" in r for runs in rows.values() for r in runs)
    lines = [f"config {args.config} {' '.join(args.overrides)}; seeds {args.seeds}; {threads} thread(s) per run", "",
             "| method | test acc % |" + (" val acc % |" if has_val else "") + " train s/run |",
             "|---|---:|" + ("---:|" if has_val else "") + "---:|"]
    summary = {}
    for method, runs in rows.items():
        summary[method] = {key: [r.get(key) for r in runs] for key in ("test_acc", "val_acc", "wall_time_s")}
        val = f" {mean_std(summary[method]['val_acc'])} |" if has_val else ""
        lines.append(f"| {method} | {mean_std(summary[method]['test_acc'])} |{val} "
                     f"{statistics.mean(summary[method]['wall_time_s']):.1f} |")
    publish("\n".join(lines), docs=args.docs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                                       "seeds": args.seeds, "methods": summary}, indent=2))


if __name__ == "__main__":
    main()
