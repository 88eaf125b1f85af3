"""Train several methods over several seeds with one config and print accuracy (mean ± std) and wall time per method,
the way the closing notes and the README quote them.

Each run is `colam train` in its own process (cores/jobs torch threads each), into OUT/<method>/seed_<s>; a finished
run is not trained again. Writes OUT/summary.json."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from harness import check_table, markdown_table, mean_std, publish, train_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--methods", nargs="+", default=["hl", "ls", "colam"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores/jobs threads)")
    parser.add_argument("--docs", metavar="NAME", help="also write the table into the docs (<!-- table:NAME -->)")
    args = parser.parse_args()
    if args.docs:
        check_table(args.docs)

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs = {(method, seed): (args.config, args.out / method / f"seed_{seed}",
                             [f"method.name={method}", f"seed={seed}", *args.overrides])
            for method in args.methods for seed in args.seeds}
    done = dict(train_all(runs, args.jobs, threads))
    summary = {method: {key: [done[method, seed].get(key) for seed in args.seeds]
                        for key in ("test_acc", "val_acc", "wall_time_s")} for method in args.methods}
    has_val = all(None not in found["val_acc"] for found in summary.values())
    rows = [["method", "test acc %", *(["val acc %"] if has_val else []), "train s/run"]]
    rows += [[method, mean_std(found["test_acc"]), *([mean_std(found["val_acc"])] if has_val else []),
              f"{statistics.mean(found['wall_time_s']):.1f}"] for method, found in summary.items()]
    publish(f"config {args.config} {' '.join(args.overrides)}; seeds {args.seeds}; {threads} thread(s) per run\n\n"
            + markdown_table(rows), docs=args.docs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                                       "seeds": args.seeds, "methods": summary}, indent=2))


if __name__ == "__main__":
    main()
