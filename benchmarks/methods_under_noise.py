"""Every method on the bundled default, clean and under 40% symmetric label noise, over 3 seeds.

Each run is `colam train` of params.yaml's run config with one method (its settings plus VARIANTS' overrides) at
data.label_noise 0 and --noise (symmetric, training labels only), one thread, --jobs at a time. `kd` distils from the
final soft labels of the COLAM run of the same seed and noise (the meta-learning paper's downstream use of learned
labels), so it runs after them. Prints a markdown table (test accuracy mean ± std, clean and noisy; the clean runs'
wall_time_s relative to hl's) and writes it with every run's metrics to --out (table.md, results.json)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from harness import ROOT, check_table, markdown_table, mean_std, publish, stage_files, train_all
from pipelines.params import load_params

# (slug, label, method, overrides): a method's defaults unless a setting is needed for this protocol.
VARIANTS = [
    *[(method, method, method, []) for method in ("hl", "ls", "colam", "cskd", "ols")],
    ("refinery", "refinery (2 generations, 2x epochs)", "refinery", []),
    ("collaborative", "collaborative (4 heads)", "collaborative", []),
    ("meta-class", "meta (class-wise)", "meta", ["method.meta.labels=class"]),
    ("meta-instance", "meta (instance-wise)", "meta", ["method.meta.labels=instance"]),
    ("kd", "kd (from COLAM's soft labels, same T)", "kd", []),
]


def overrides_for(method: str, extra: list[str], base_epochs: int, noise: float, seed: int, out: Path) -> list[str]:
    settings = [f"method.name={method}", f"seed={seed}", f"data.label_noise={noise}", "data.noise_type=symmetric",
                *extra]
    if method == "refinery":  # the paper's protocol: every generation a full training budget
        settings += [f"train.epochs={2 * base_epochs}", "method.refinery.generations=2",
                     f"method.refinery.epochs_per_generation={base_epochs}"]
    elif method == "kd":
        teacher = out / f"colam-noise{noise}-seed{seed}"
        stages = stage_files(teacher, "soft_labels.json")
        if not stages:
            raise SystemExit(f"kd distils from the colam run {teacher}, which is not there: run colam too")
        # The labels were tempered with COLAM's T: the student's logits are softened with the same T.
        temperature = json.loads(stages[-1].read_text())["temperature"]
        settings += [f"method.kd.teacher={stages[-1].parent / 'soft_labels.npy'}",
                     f"method.kd.temperature={temperature}"]
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "methods")
    parser.add_argument("--only", nargs="+", help="methods or variants (e.g. meta-class) to run (default: all)")
    parser.add_argument("--clean-only", action="store_true", help="skip the noisy runs (a timing pass with --jobs 1)")
    parser.add_argument("--docs", action="store_true",
                        help="also write the table into the docs, between <!-- table:methods-under-noise --> markers")
    args = parser.parse_args()
    if args.docs:
        check_table("methods-under-noise")

    config = load_params(args.params).config
    run_config = args.out / "config.yaml"
    args.out.mkdir(parents=True, exist_ok=True)
    run_config.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only or v[2] in args.only]
    results = []
    for phase in ([v for v in variants if v[2] != "kd"], [v for v in variants if v[2] == "kd"]):  # kd after colam
        runs = {(label, noise, seed): (run_config, args.out / f"{slug}-noise{noise}-seed{seed}",
                                       overrides_for(method, extra, config.train.epochs, noise, seed, args.out))
                for slug, label, method, extra in phase
                for noise in ((0.0,) if args.clean_only else (0.0, args.noise)) for seed in args.seeds}
        for (label, noise, seed), metrics in train_all(runs, args.jobs):
            print(f"{label:<38} noise {noise:.1f} seed {seed}: test {metrics['test_acc']:.4f}  "
                  f"{metrics['wall_time_s']:.1f}s", flush=True)
            results.append({"label": label, "noise": noise, "seed": seed, "overrides": runs[label, noise, seed][2],
                            "metrics": metrics})
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    publish(format_table(results, args.noise), args.out / "table.md", "methods-under-noise" if args.docs else None)


def format_table(results: list[dict], noise: float) -> str:
    hl_times = [r["metrics"]["wall_time_s"] for r in results if r["label"] == "hl" and r["noise"] == 0]
    hl_time = statistics.mean(hl_times) if hl_times else None
    rows = [["method", "clean test acc %", f"{noise:.0%} symmetric noise test acc %", "wall time / hl (clean)"]]
    for label in dict.fromkeys(r["label"] for r in results):
        mine = [r for r in results if r["label"] == label]
        clean = [r["metrics"]["test_acc"] for r in mine if r["noise"] == 0]
        noisy = [r["metrics"]["test_acc"] for r in mine if r["noise"] != 0]  # none with --clean-only
        seconds = statistics.mean(r["metrics"]["wall_time_s"] for r in mine if r["noise"] == 0)
        rows.append([label, mean_std(clean), mean_std(noisy), f"{seconds / hl_time:.2f}" if hl_time else "–"])
    seeds = sorted({r["seed"] for r in results})
    note = f"mean ± sample std over seeds {seeds}; wall time = the runs' own training time (wall_time_s)"
    return markdown_table(rows) + "\n\n" + note


if __name__ == "__main__":
    main()
