"""What COLAM costs over vanilla training, and how fast the trainer is, measured side by side in one run on this
machine. Prints one table and writes it as JSON.

    python benchmarks/speed.py                      # the bundled default (configs/digits.yaml)
    python benchmarks/speed.py --config configs/cifar100_preact_resnet34.yaml --set data.root=DIR

(a) COLAM/hl training time at equal epochs (stage-end pass, online sums); (b) one estimation pass / one training
epoch; (c) the trainer / a bare PyTorch loop, img/s; (d) on a GPU, PreActResNet-18 bf16 img/s, MFU and peak memory,
data on the GPU against the DataLoader (docs/benchmarks.md). Each repeat runs hl, colam pass and colam online one
after the other; (a) is the median of the ratios of runs made side by side, the rest are medians. A shared CPU varies
by more than (a)'s targets from run to run, so `accounted` adds to hl's time only what COLAM does on top of it,
measured inside the runs."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

import colam.engine
from colam.config import load_config
from colam.data import Indexed, TrainingData
from colam.datasets import CIFAR_STATS, ImageTensors, TensorImageDataset
from colam.engine import autocast, fit, prepare, to_device
from colam.feed import ResidentFeed
from colam.models import build_model
from colam.soft_labels import OutputSums
from harness import check_table, markdown_table, publish, stage_files

TARGETS = {"a_pass": 1.02, "a_online": 1.005, "c": 0.95, "d": 50_000}
VERDICT = {True: "meets", False: "misses"}
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched on the device name.
# The first name found in the device's name wins: the more specific names come first.
PEAK_BF16 = {"H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 70e12, "A10": 125e12}


def median(values):
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {gpu}")


def timed_fit(config, folder: Path) -> dict:
    """fit() with the seconds of every call of the trainer's training epoch and of every stage end."""
    epochs, real = [], colam.engine.train_one_epoch

    def timed(*args, **kwargs):
        began = time.perf_counter()
        result = real(*args, **kwargs)  # ends in .tolist(): the GPU has finished the epoch
        epochs.append(time.perf_counter() - began)
        return result

    with mock.patch.object(colam.engine, "train_one_epoch", timed):
        metrics = fit(config, folder, progress=False)
    stages = stage_files(folder, "metrics.json")
    estimation = [json.loads(p.read_text()).get("estimation_seconds") or 0.0 for p in stages]
    return {"wall": metrics["wall_time_s"], "epochs": epochs, "estimation": estimation}


def bare_loop(config, epochs: int) -> list[float]:
    """Plain PyTorch: the same model, data, batch, optimiser, precision and layout as the trainer's hl run, and nothing
    else (no method hooks, no evaluation, no checkpoints)."""
    p = prepare(config)  # the model and device exactly as the trainer builds them
    model, device = p.model, p.device
    net = torch.compile(model) if config.train.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=config.train.lr, momentum=config.train.momentum,
                                weight_decay=config.train.weight_decay)
    loader = DataLoader(p.data.train, batch_size=config.train.batch_size, shuffle=True,
                        num_workers=config.data.num_workers, pin_memory=device.type == "cuda")
    seconds = []
    for _ in range(epochs):
        model.train()
        began = time.perf_counter()
        for images, targets, _ in loader:
            images, targets = to_device(images, device, p.channels_last), targets.to(device, non_blocking=True)
            with autocast(device, p.precision):
                loss = F.cross_entropy(net(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
    return seconds


def method_costs(args) -> dict:
    config = load_config(args.config, args.overrides)
    epochs, stages = args.epochs or config.train.epochs, config.method.colam.stages
    if epochs % stages:
        raise SystemExit(f"--epochs {epochs} must be a multiple of method.colam.stages ({stages})")
    common = [*args.overrides, f"train.epochs={epochs}", f"method.colam.epochs_per_stage={epochs // stages}",
              f"data.num_workers={args.workers or 0}"]
    runs = {"hl": common + ["method.name=hl"],
            "colam_pass": common + ["method.name=colam", "method.colam.estimation=pass"],
            "colam_online": common + ["method.name=colam", "method.colam.estimation=online"]}
    hl = prepare(load_config(args.config, runs["hl"]))
    samples, loader_run = len(hl.data.train), "hl"
    if isinstance(hl.feed, ResidentFeed):  # (c) compares like with like: the trainer on the DataLoader path too
        loader_run = "hl_loader"
        runs[loader_run] = common + ["method.name=hl", "train.data_on_device=false"]
    results, bare = {name: [] for name in runs}, []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name, overrides in runs.items():
                results[name].append(timed_fit(load_config(args.config, overrides), Path(scratch) / f"{name}_{repeat}"))
            bare += bare_loop(load_config(args.config, runs[loader_run]), epochs)[1:]

    def train_rate(name):  # the first epoch of each run warms up (allocators, caches, compilation)
        return samples / median([s for r in results[name] for s in r["epochs"][1:]])

    def train_time(run):  # the training loop and the stage ends: what COLAM changes (evaluation is the same)
        return sum(run["epochs"]) + sum(run["estimation"])

    hl_train = median([train_time(r) for r in results["hl"]])
    online = load_config(args.config, runs["colam_online"])
    steps = -(-samples // online.train.batch_size) * stages  # the steps of the stages' last epochs
    add_seconds = accumulation_seconds(online, hl.device, hl.data.num_classes)
    a = {}
    for mode in ("pass", "online"):
        mine = results[f"colam_{mode}"]
        paired = [train_time(c) / train_time(h) for c, h in zip(mine, results["hl"])]
        extra = median([sum(r["estimation"]) for r in mine]) + (steps * add_seconds if mode == "online" else 0)
        a[mode] = {"ratio": median(paired),  # runs made side by side: slow drift of the machine cancels
                   "paired_min": min(paired), "paired_max": max(paired),
                   "wall_ratio": median([r["wall"] for r in mine]) / median([r["wall"] for r in results["hl"]]),
                   "accounted": 1 + extra / hl_train, "colam_train_s": median([train_time(r) for r in mine]),
                   "hl_train_s": hl_train}
    a["online"]["accumulation_us_per_step"] = add_seconds * 1e6
    estimation = median([s for r in results["colam_pass"] for s in r["estimation"]])
    epoch = median([s for r in results["colam_pass"] for s in r["epochs"][1:]])
    bare_rate = samples / median(bare)
    timings = {k: [{"wall_s": r["wall"], "estimation_s": r["estimation"]} for r in rs] for k, rs in results.items()}
    return {"config": args.config, "overrides": common, "epochs": epochs, "stages": stages, "repeats": args.repeats,
            "train_samples": samples, "a": a, "runs": timings,
            "b": {"estimation_s": estimation, "epoch_s": epoch, "fraction": estimation / epoch},
            "c": {"trainer_img_s": train_rate(loader_run), "bare_img_s": bare_rate,
                  "ratio": train_rate(loader_run) / bare_rate, "trainer_default_feed_img_s": train_rate("hl")}}


def accumulation_seconds(config, device: torch.device, classes: int, repeats: int = 2000) -> float:
    """What online estimation adds to one training step: OutputSums.add of a batch of logits."""
    batch = config.train.batch_size
    sums = OutputSums(classes, config.method.colam.aggregation, device=device)
    logits, targets = torch.randn(batch, classes, device=device), torch.randint(0, classes, (batch,), device=device)
    # torch's Timer warms up first and synchronises a GPU around the timed loop
    return Timer("sums.add(logits, targets)", globals={"sums": sums, "logits": logits, "targets": targets},
                 num_threads=torch.get_num_threads()).timeit(repeats).mean


def synthetic_cifar(n: int, classes: int, seed: int = 0) -> TrainingData:
    """CIFAR-sized training data without a download: random 32x32 RGB pixels, balanced labels. The DataLoader path
    augments per sample with torchvision's transforms, as for CIFAR."""
    pixels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    labels, index, test = (torch.arange(n) % classes).numpy(), torch.arange(n).numpy(), min(n, 1000)
    mean, std = CIFAR_STATS["cifar100"]
    normalize = T.Normalize(mean, std)
    train = TensorImageDataset(pixels, labels, T.Compose([
        T.ConvertImageDtype(torch.float32), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), normalize]))
    evaluation = TensorImageDataset(pixels, labels, T.Compose([T.ConvertImageDtype(torch.float32), normalize]))
    return TrainingData(train=Indexed(train, index, labels), train_eval=Indexed(evaluation, index, labels), val=None,
                        test=Indexed(evaluation, index[:test], labels[:test]),
                        train_targets=torch.from_numpy(labels), clean_train_targets=torch.from_numpy(labels),
                        classes=[str(c) for c in range(classes)], in_channels=3, image_size=32,
                        tensors=ImageTensors(pixels, pixels[:1000], mean, std, pad=4, flip=True))


def training_flops(batch: int, device: torch.device) -> float:
    """FLOPs per image of one bf16 training step (forward and backward) of PreActResNet-18, counted by torch."""
    model = build_model("preact_resnet18", 100).to(device, memory_format=torch.channels_last)
    images = torch.rand(batch, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        with autocast(device, torch.bfloat16):
            loss = F.cross_entropy(model(images), torch.randint(100, (batch,), device=device))
        loss.backward()
    return counter.get_total_flops() / batch


def gpu_throughput(args, device: torch.device) -> dict:
    """(d): the trainer's epochs of PreActResNet-18, bf16 and channels-last, on CIFAR-sized images."""
    data, cuda = synthetic_cifar(args.gpu_images, 100), device.type == "cuda"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak is None and cuda:
        peak = next((value for key, value in PEAK_BF16.items() if key in torch.cuda.get_device_name(device)), None)
    flops = training_flops(args.gpu_batch, device)
    results = {}
    for path, on_device in (("resident", "true"), ("dataloader", "false")):
        config = load_config(None, [
            "model.name=preact_resnet18", "method.name=hl", "train.lr=0.1", f"train.epochs={args.gpu_epochs + 1}",
            f"train.batch_size={args.gpu_batch}", f"train.device={device.type}", "train.precision=bf16",
            "train.channels_last=true", f"train.compile={str(args.compile).lower()}",
            f"train.data_on_device={on_device}", f"data.num_workers={args.gpu_workers}"])
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with mock.patch.object(colam.engine, "build_data", lambda *_: data), tempfile.TemporaryDirectory() as folder:
            seconds = timed_fit(config, Path(folder))["epochs"][1:]  # epoch 1 warms up (cuDNN autotuning, compilation)
        rate = len(data.train) / median(seconds)
        results[path] = {"img_s": rate, "flops_per_image": flops, "achieved_tflops": rate * flops / 1e12,
                         "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                         "mfu": rate * flops / peak if peak else None}
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "images": args.gpu_images, "batch": args.gpu_batch, "epochs": args.gpu_epochs, "compile": args.compile,
            "peak_bf16_tflops": peak / 1e12 if peak else None, **results}


def table(report: dict) -> str:
    a, b, c, d = report["a"], report["b"], report["c"], report.get("d")
    rows = [["figure", "value", "detail", "target", ""]]
    rows += [[f"(a) COLAM/hl time, {mode}" + (f", m={report['stages']}" if mode == "pass" else ""),
              f"{a[mode]['ratio']:.3f}",
              f"runs {a[mode]['paired_min']:.3f}-{a[mode]['paired_max']:.3f}; accounted {a[mode]['accounted']:.4f}",
              f"<= {target}", VERDICT[a[mode]["ratio"] <= target]]
             for mode, target in (("pass", TARGETS["a_pass"]), ("online", TARGETS["a_online"]))]
    rows += [["(b) estimation pass / training epoch", f"{b['fraction']:.3f}",
              f"{b['estimation_s'] * 1e3:.1f} ms / {b['epoch_s'] * 1e3:.1f} ms", "", ""],
             ["(c) trainer / bare loop, img/s", f"{c['ratio']:.3f}",
              f"{c['trainer_img_s']:,.0f} / {c['bare_img_s']:,.0f}", ">= 0.95", VERDICT[c["ratio"] >= TARGETS["c"]]]]
    if d is None:
        rows.append(["(d) PreActResNet-18 bf16 img/s on GPU", "-", report["d_note"], ">= 50,000", "not measured"])
    else:
        for path in ("resident", "dataloader"):
            r = d[path]
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
            memory = f", peak {r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else ""
            rows.append([f"(d) PreActResNet-18 bf16, {path}", f"{r['img_s']:,.0f}",
                         f"{r['achieved_tflops']:.1f} TFLOP/s{mfu}{memory}", ">= 50,000",
                         VERDICT[r["img_s"] >= TARGETS["d"]]])
    return markdown_table(rows, "lllll")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml", help="the run (a)-(c) time (default: bundled)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the config's)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per method for (a)-(c)")
    parser.add_argument("--workers", type=int, help="data.num_workers for (a)-(c) (default 0)")
    parser.add_argument("--gpu-images", type=int, default=50_000, help="(d): synthetic CIFAR-sized training images")
    parser.add_argument("--gpu-batch", type=int, default=512)
    parser.add_argument("--gpu-epochs", type=int, default=3, help="(d): timed epochs after one warm-up epoch")
    parser.add_argument("--gpu-workers", type=int, default=8, help="(d): DataLoader workers of the DataLoader path")
    parser.add_argument("--compile", action="store_true", help="(d): torch.compile the model")
    parser.add_argument("--peak-tflops", type=float, help="(d): the GPU's dense bf16 peak, for MFU (default: by name)")
    parser.add_argument("--d-on-cpu", action="store_true", help="run (d) on the CPU (a smoke test, not a figure)")
    parser.add_argument("--json", type=Path, default=Path("runs/benchmarks/speed.json"))
    parser.add_argument("--docs", action="store_true", help="also write the table into the docs (<!-- table:speed -->)")
    args = parser.parse_args(argv)
    if args.docs:
        check_table("speed")

    report = {"machine": machine(), **method_costs(args)}
    if torch.cuda.is_available() or args.d_on_cpu:
        report["d"] = gpu_throughput(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        report["d_note"] = "no GPU on this machine"
    text = table(report)
    publish(f"machine: {report['machine']}\n\n(a)-(c): {report['config']}, {report['epochs']} epochs, "
            f"{report['train_samples']} training images, median of {report['repeats']} interleaved runs each\n\n{text}",
            docs="speed" if args.docs else None)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**report, "table": text}, indent=2))
    print(f"written: {args.json}")
    return report


if __name__ == "__main__":
    main()
