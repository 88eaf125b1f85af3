"""Every method on the bundled default, clean and under 40% symmetric label noise, over 3 seeds.

    .venv/bin/python benchmarks/methods_under_noise.py [--params params.yaml] [--seeds 0 1 2] [--noise 0.4]
        [--jobs 2] [--out runs/methods] [--only METHOD ...] [--clean-only] [--docs]

Each run is `colam.engine.fit` of params.yaml's run config with one method (the method's own
settings from params.yaml/defaults, plus the overrides in VARIANTS), at data.label_noise 0 and
--noise (symmetric, training labels only, drawn from data.split_seed). `kd` distils from the final
soft labels of the COLAM run of the same seed and noise (the meta-learning paper's downstream use
of learned labels), so it runs after them. Runs go --jobs at a time, one thread each.

Prints a markdown table (test accuracy mean ± sample std over the seeds, clean and noisy; the
training wall time of the clean runs relative to hl's, from each run's own wall_time_s) and writes
it with every run's metrics to --out (table.md, results.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import docs_tables

ROOT = Path(__file__).resolve().parents[1]

# (slug, label, method, overrides): a method's defaults unless a setting is needed for this protocol.
VARIANTS = [
    ("hl", "hl", "hl", []),
    ("ls", "ls", "ls", []),
    ("colam", "colam", "colam", []),
    ("cskd", "cskd", "cskd", []),
    ("ols", "ols", "ols", []),
    ("refinery", "refinery (2 generations, 2x epochs)", "refinery", ["refinery"]),
    ("collaborative", "collaborative (4 heads)", "collaborative", []),
    ("meta-class", "meta (class-wise)", "meta", ["method.meta.labels=class"]),
    ("meta-instance", "meta (instance-wise)", "meta", ["method.meta.labels=instance"]),
    ("kd", "kd (from COLAM's soft labels, same T)", "kd", ["kd"]),
]


def run_one(job: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    from colam.config import load_config
    from colam.engine import fit

    config = load_config(job["params"], job["overrides"])
    began = time.perf_counter()
    metrics = fit(config, job["out"], progress=False)
    return {**job, "metrics": metrics, "process_seconds": time.perf_counter() - began}


def overrides_for(method: str, extra: list[str], base_epochs: int, noise: float, seed: int, out: Path) -> list[str]:
    settings = [f"method.name={method}", f"seed={seed}", f"data.label_noise={noise}", "data.noise_type=symmetric"]
    for item in extra:
        if item == "refinery":  # the paper's protocol: every generation a full training budget
            settings += [f"train.epochs={2 * base_epochs}", "method.refinery.generations=2",
                         f"method.refinery.epochs_per_generation={base_epochs}"]
        elif item == "kd":
            teacher = out / f"colam-noise{noise}-seed{seed}"
            stages = sorted(teacher.glob("stage_*/soft_labels.json"), key=lambda p: int(p.parent.name.split("_")[1]))
            if not stages:
                raise SystemExit(f"kd distils from the colam run {teacher}, which is not there: run colam too")
            # The labels were tempered with COLAM's T: the student's logits are softened with the same T.
            temperature = json.loads(stages[-1].read_text())["temperature"]
            settings += [f"method.kd.teacher={stages[-1].parent / 'soft_labels.npy'}",
                         f"method.kd.temperature={temperature}"]
        else:
            settings.append(item)
    return settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "methods")
    parser.add_argument("--only", nargs="+", help="labels or method names to run (default: all)")
    parser.add_argument("--clean-only", action="store_true", help="skip the noisy runs (e.g. a timing pass with --jobs 1)")
    parser.add_argument("--docs", action="store_true", help="also write the table into the docs, between "
                                                            "<!-- table:methods-under-noise --> markers")
    args = parser.parse_args()
    if args.docs:
        docs_tables.check_table("methods-under-noise")
    sys.path.insert(0, str(ROOT))
    from pipelines.params import load_params

    params = load_params(args.params)
    run_config = args.out / "config.yaml"
    args.out.mkdir(parents=True, exist_ok=True)
    import yaml

    run_config.write_text(yaml.safe_dump(params.config.to_dict(), sort_keys=False))
    base_epochs = params.config.train.epochs
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only or v[2] in args.only]
    phases = [[v for v in variants if v[2] != "kd"], [v for v in variants if v[2] == "kd"]]
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for phase in phases:
            jobs = []
            for slug, label, method, extra in phase:
                for noise in (0.0,) if args.clean_only else (0.0, args.noise):
                    for seed in args.seeds:
                        out = args.out / f"{slug}-noise{noise}-seed{seed}"
                        jobs.append({"label": label, "method": method, "noise": noise, "seed": seed,
                                     "params": str(run_config), "out": str(out),
                                     "overrides": overrides_for(method, extra, base_epochs, noise, seed, args.out)})
            for result in pool.map(run_one, jobs):
                print(f"{result['label']:<38} noise {result['noise']:.1f} seed {result['seed']}: "
                      f"test {result['metrics']['test_acc']:.4f}  {result['metrics']['wall_time_s']:.1f}s", flush=True)
                results.append(result)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    table = format_table(results, args.noise)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    if args.docs:
        docs_tables.write_table("methods-under-noise", table)
    return 0


def format_table(results: list[dict], noise: float) -> str:
    def cell(values: list[float]) -> str:
        if not values:
            return "–"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"

    labels = list(dict.fromkeys(r["label"] for r in results))
    hl_times = [r["metrics"]["wall_time_s"] for r in results if r["label"] == "hl" and r["noise"] == 0]
    hl_time = statistics.mean(hl_times) if hl_times else None
    lines = [f"| method | clean test acc % | {noise:.0%} symmetric noise test acc % | wall time / hl (clean) |",
             "|---|---:|---:|---:|"]
    for label in labels:
        mine = [r for r in results if r["label"] == label]
        clean = [r["metrics"]["test_acc"] for r in mine if r["noise"] == 0]
        noisy = [r["metrics"]["test_acc"] for r in mine if r["noise"] != 0]  # none with --clean-only
        seconds = statistics.mean(r["metrics"]["wall_time_s"] for r in mine if r["noise"] == 0)
        lines.append(f"| {label} | {cell(clean)} | {cell(noisy)} | {f'{seconds / hl_time:.2f}' if hl_time else '–'} |")
    seeds = sorted({r["seed"] for r in results})
    lines.append(f"\nmean ± sample std over seeds {seeds}; wall time = the runs' own training time (wall_time_s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
