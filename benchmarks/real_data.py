"""Fashion-MNIST on a CPU: COLAM against hard labels, label smoothing and the other cheap methods, and the recipe
choices the paper leaves open (docs/benchmarks.md, "Real data").

Every run is `colam train --config configs/fashion_mnist.yaml` plus the variant's overrides, one torch thread, `--jobs`
at a time, into OUT/PART/VARIANT-seedS (a finished run is read back, so an interrupted benchmark continues). Prints a
markdown table per part (also OUT/PART.md), writes OUT/PART.json. table: the methods' test and validation accuracy,
wall time / hl; recipe: COLAM's open choices; guard: the collapse guard with short and long stages (these two on the
validation split only)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from harness import ROOT, check_table, markdown_table, mean_std, publish, stage_files, train_all

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
    "table": {**{name: [f"method.name={name}"] for name in ("hl", "ls", "cp", "disturblabel", "cskd", "ols")},
              "colam": COLAM},
    "recipe": {
        **{f"T={t:g}": [*LITERAL, f"method.colam.temperature={t}"] for t in (0.5, 1.0, 2.0)},
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
        **{f"m=2 t=10, T={t:g}, guard anchor": [*TWO_STAGES, f"method.colam.temperature={t}"]
           for t in (0.25, 0.5, 2.0)},
    },
    "guard": {f"t={t} guard {guard}": [*STUDY, f"method.colam.stages={20 // t}", f"method.colam.epochs_per_stage={t}",
                                       f"method.colam.guard={guard}"]
              for t in (2, 10) for guard in ("none", "keep", "anchor")},
}
# For scale: the Fashion-MNIST README's benchmark table (all 60,000 training images, many epochs;
# figures as submitted, "not tested" by the data set's authors).
PUBLISHED = [("ResNet-18, flips, translation, rotation (Efthymiadis)", 94.9),
             ("WRN-28-10 + random erasing (Zhong et al.)", 96.3),
             ("2 conv + pooling, no augmentation (TensorFlow tutorial)", 91.6),
             ("human, crowd-sourced, no fashion expertise", 83.5)]


def table(part: str, runs: dict[str, list[dict]]) -> str:
    """The markdown table of a part: the table shows test accuracy and wall time; the studies validation only."""
    if part == "table":
        base = statistics.mean(r["wall_time_s"] for r in runs.get("hl") or next(iter(runs.values())))
        rows = [[name, mean_std([r["test_acc"] for r in found]), mean_std([r["val_acc"] for r in found]),
                 f"{statistics.mean(r['wall_time_s'] for r in found) / base:.2f}"] for name, found in runs.items()]
        published = "\n".join(f"- {name}: {acc:.1f}%" for name, acc in PUBLISHED)
        return (markdown_table([["method", "test acc %", "val acc %", "wall time / hl"], *rows])
                + f"\n\nPublished for scale (Fashion-MNIST README, all 60,000 training images):\n\n{published}")
    rows = [[name, mean_std([r["val_acc"] for r in found]),
             "; ".join("/".join("–" if c is None else str(c) for c in r["collapsed_rows"]) for r in found)]
            for name, found in runs.items()]
    return markdown_table([["variant", "val acc %", "label rows collapsed (per stage, each seed)"], *rows], "lrl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), default="table")
    parser.add_argument("--root", type=Path, default=next((p for p in ROOTS if p.is_dir()), ROOTS[0]),
                        help="data.root: a folder with Fashion-MNIST's files (default: the DVC copy, else Debian's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time, one thread each")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "real_data")
    parser.add_argument("--variants", nargs="+", help="only these variants of the part (default: all)")
    parser.add_argument("--docs", action="store_true",
                        help="also write the table into the docs, between <!-- table:fashion-mnist-PART --> markers")
    args = parser.parse_args()
    if args.docs:
        check_table(f"fashion-mnist-{args.part}")

    unknown = sorted(set(args.variants or []) - set(PARTS[args.part]))
    if unknown:
        parser.error(f"--variants: {', '.join(unknown)} not in part {args.part} ({', '.join(PARTS[args.part])})")
    variants = {name: overrides for name, overrides in PARTS[args.part].items()
                if args.variants is None or name in args.variants}
    runs = {(name, seed): (PROTOCOL, args.out / args.part / f"{name.replace(' ', '_').replace('=', '')}-seed{seed}",
                           [f"data.root={args.root}", *variants[name], f"seed={seed}"])
            for seed in args.seeds for name in variants}  # every variant's first seed first
    results = {name: [] for name in variants}
    for (name, seed), metrics in train_all(runs, args.jobs):  # with each stage end's count of collapsed label rows
        metrics["collapsed_rows"] = [json.loads(p.read_text()).get("collapsed_rows")
                                     for p in stage_files(runs[name, seed][1], "metrics.json")]
        results[name].append(metrics)
    header = (f"Fashion-MNIST, {PROTOCOL.relative_to(ROOT)}, seeds {args.seeds}, 1 thread per run, {args.jobs} at "
              f"a time, {args.part}")
    publish(header + "\n\n" + table(args.part, results), args.out / f"{args.part}.md",
            f"fashion-mnist-{args.part}" if args.docs else None)
    summary = {"seeds": args.seeds, "root": str(args.root), "runs": results}
    (args.out / f"{args.part}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
