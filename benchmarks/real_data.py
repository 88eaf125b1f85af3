"""Fashion-MNIST on a CPU: COLAM against hard labels, label smoothing and the other cheap methods, and
the recipe choices the paper leaves open (docs/benchmarks.md, "Real data").

    python benchmarks/real_data.py --part table  [--root DIR] [--seeds 0 1 2] [--jobs 2] [--out DIR] [--docs]
    python benchmarks/real_data.py --part recipe [--seeds 0 1]
    python benchmarks/real_data.py --part guard  [--seeds 0 1]

Every run is `colam train --config configs/fashion_mnist.yaml` (the protocol, with its reasons) plus
the variant's overrides, with one torch thread, `--jobs` runs at a time, into OUT/PART/VARIANT-seedS;
a finished run is not trained again, so an interrupted benchmark continues where it stopped. Prints a
markdown table per part (also OUT/PART.md) and writes OUT/PART.json.

- table: the methods at their settings, test accuracy mean ± std over the seeds, validation accuracy,
  and each method's wall time relative to hl, beside published figures for scale.
- recipe: COLAM's open choices (T, stage-1 loss, lr schedule against the stage ends, k peers per
  sample or per class, the collapse guard), scored on the validation split only.
- guard: the collapse guard where collapse happens (a short first stage) and where it does not.

The data come from --root (default data/raw/fashion_mnist, the pipeline's DVC copy, else Debian's
/usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docs_tables

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "configs" / "fashion_mnist.yaml"
ROOTS = (ROOT / "data/raw/fashion_mnist", Path("/usr/share/datasets/fashion-mnist"))

COLAM = ["method.name=colam"]  # the recipe the study chose (configs/fashion_mnist.yaml)
# Where the study started: 4 stages of 5 epochs at T = 1, each variant changing what it names
STUDY = [*COLAM, "method.colam.stages=4", "method.colam.epochs_per_stage=5", "method.colam.temperature=1.0"]
LITERAL = [*STUDY, "method.colam.guard=none"]  # Algorithm 1 as written
TWO_STAGES = [*STUDY, "method.colam.stages=2", "method.colam.epochs_per_stage=10", "method.colam.guard=anchor"]
PARTS = {
    # Baselines at their papers' settings (ls: eps 0.1; cp: beta 0.1; disturblabel: alpha 0.1; cskd: T 4,
    # lambda 1; ols: alpha 0.5); COLAM at the recipe chosen on validation by the `recipe` part.
    "table": {
        "hl": ["method.name=hl"],
        "ls": ["method.name=ls"],
        "cp": ["method.name=cp"],
        "disturblabel": ["method.name=disturblabel"],
        "cskd": ["method.name=cskd"],
        "ols": ["method.name=ols"],
        "colam": COLAM,
    },
    "recipe": {
        "T=0.5": [*LITERAL, "method.colam.temperature=0.5"],
        "T=1": [*LITERAL, "method.colam.temperature=1.0"],
        "T=2": [*LITERAL, "method.colam.temperature=2.0"],
        "T=0.5 stage 1 tempered": [*LITERAL, "method.colam.temperature=0.5", "method.colam.stage1_loss=tempered"],
        "T=2 stage 1 tempered": [*LITERAL, "method.colam.temperature=2.0", "method.colam.stage1_loss=tempered"],
        "lr cosine": [*LITERAL, "train.lr_schedule=cosine"],
        "lr steps off the stage ends": [*LITERAL, "train.milestones=[0.6, 0.85]"],
        "peers 10 per sample": [*LITERAL, "method.colam.peers=10", "method.colam.peer_labels=sample"],
        "peers 10 per class": [*LITERAL, "method.colam.peers=10", "method.colam.peer_labels=class"],
        "guard keep": [*STUDY, "method.colam.guard=keep"],
        "guard anchor": [*STUDY, "method.colam.guard=anchor"],
        "T=2 stage 1 tempered, guard anchor": [*STUDY, "method.colam.temperature=2.0",
                                               "method.colam.stage1_loss=tempered", "method.colam.guard=anchor"],
        "m=2 t=10, guard anchor": TWO_STAGES,
        **{f"m=2 t=10, T={name}, guard anchor": [*TWO_STAGES, f"method.colam.temperature={value}"]
           for name, value in (("0.25", "0.25"), ("0.5", "0.5"), ("2", "2.0"))},
    },
    "guard": {
        f"t={t} guard {guard}": [*STUDY, f"method.colam.stages={20 // t}", f"method.colam.epochs_per_stage={t}",
                                 f"method.colam.guard={guard}"]
        for t in (2, 10) for guard in ("none", "keep", "anchor")
    },
}
# For scale: the Fashion-MNIST README's benchmark table (all 60,000 training images, many epochs;
# figures as submitted, "not tested" by the data set's authors).
PUBLISHED = [("ResNet-18, flips, translation, rotation (Efthymiadis)", 94.9),
             ("WRN-28-10 + random erasing (Zhong et al.)", 96.3),
             ("2 conv + pooling, no augmentation (TensorFlow tutorial)", 91.6),
             ("human, crowd-sourced, no fashion expertise", 83.5)]


def train(variant_dir: Path, overrides: list[str], data_root: Path) -> dict:
    """One run (one torch thread); a finished run is read back, not trained again."""
    command = [sys.executable, "-m", "pipelines.cli", "train", "--config", str(PROTOCOL), "--out", str(variant_dir),
               "--set", f"data.root={data_root}", "--no-progress", "--no-track"]
    for item in overrides:
        command += ["--set", item]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{variant_dir.name} failed:\n{result.stderr[-2000:]}")
    metrics = json.loads((variant_dir / "metrics.json").read_text())
    metrics["collapsed_rows"] = [json.loads(p.read_text()).get("collapsed_rows")
                                 for p in sorted(variant_dir.glob("stage_*/metrics.json"))]
    return metrics


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def table(part: str, runs: dict[str, list[dict]]) -> str:
    """The markdown table of a part: the table shows test accuracy and wall time; the studies validation only."""
    if part == "table":
        base = statistics.mean(r["wall_time_s"] for r in runs.get("hl") or next(iter(runs.values())))
        lines = ["| method | test acc % | val acc % | wall time / hl |", "|---|---:|---:|---:|"]
        for name, found in runs.items():
            ratio = statistics.mean(r["wall_time_s"] for r in found) / base
            lines.append(f"| {name} | {mean_std([r['test_acc'] for r in found])} | "
                         f"{mean_std([r['val_acc'] for r in found])} | {ratio:.2f} |")
        lines += ["", "Published for scale (Fashion-MNIST README, all 60,000 training images):", ""]
        lines += [f"- {name}: {acc:.1f}%" for name, acc in PUBLISHED]
        return "\n".join(lines)
    lines = ["| variant | val acc % | label rows collapsed (per stage, each seed) |", "|---|---:|---|"]
    for name, found in runs.items():
        collapsed = "; ".join("/".join("–" if c is None else str(c) for c in r["collapsed_rows"]) for r in found)
        lines.append(f"| {name} | {mean_std([r['val_acc'] for r in found])} | {collapsed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), default="table")
    parser.add_argument("--root", type=Path, default=next((p for p in ROOTS if p.is_dir()), ROOTS[0]),
                        help="data.root: a folder with Fashion-MNIST's files")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time, one thread each")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "real_data")
    parser.add_argument("--variants", nargs="+", help="only these variants of the part (default: all)")
    parser.add_argument("--docs", action="store_true",
                        help="also write the table into the docs, between <!-- table:fashion-mnist-PART --> markers")
    args = parser.parse_args()
    if args.docs:
        docs_tables.check_table(f"fashion-mnist-{args.part}")

    unknown = sorted(set(args.variants or []) - set(PARTS[args.part]))
    if unknown:
        parser.error(f"--variants: {', '.join(unknown)} not in part {args.part} ({', '.join(PARTS[args.part])})")
    variants = {name: overrides for name, overrides in PARTS[args.part].items()
                if args.variants is None or name in args.variants}
    jobs = [(name, seed) for seed in args.seeds for name in variants]  # every variant's first seed first
    folder = args.out / args.part

    def run(job):
        name, seed = job
        slug = name.replace(" ", "_").replace("=", "")
        return train(folder / f"{slug}-seed{seed}", [*variants[name], f"seed={seed}"], args.root)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, jobs))
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for (name, _), metrics in zip(jobs, results):
        runs[name].append(metrics)
    text = table(args.part, runs)
    header = (f"Fashion-MNIST, {PROTOCOL.relative_to(ROOT)}, seeds {args.seeds}, 1 thread per run, {args.jobs} at "
              f"a time, {args.part}")
    print(header + "\n\n" + text)
    folder.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.part}.md").write_text(header + "\n\n" + text + "\n")
    if args.docs:
        docs_tables.write_table(f"fashion-mnist-{args.part}", header + "\n\n" + text)
    (args.out / f"{args.part}.json").write_text(json.dumps({"seeds": args.seeds, "root": str(args.root), "runs": runs},
                                                           indent=2))


if __name__ == "__main__":
    main()
