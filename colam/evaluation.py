"""Evaluate a trained stage: accuracy, negative log-likelihood and calibration on the test split
(soft-label methods soften the outputs, so they are judged on calibration as much as on accuracy)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
import torch.nn.functional as F

from colam import distributed
from colam import io as cio
from colam.config import Config
from colam.data import loader
from colam.engine import predict, prepare, run_metrics
from colam.run_folder import load_stage_state
from colam.errors import ColamError

EVALUATION = "evaluation"  # the kind of output (colam.io manifests) an evaluation's folder is
ECE_BINS = 15  # the usual choice since Guo et al. 2017


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the bin's share."""
    confidence, predicted = probs.max(dim=1)
    which = torch.bucketize(confidence, torch.linspace(0, 1, bins + 1)[1:-1])  # bin b holds (b / bins, (b + 1) / bins]
    total = torch.zeros(bins).index_add_(0, which, (predicted == targets).float() - confidence)
    return (total.abs().sum() / len(targets)).item()


def score(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    return {"acc": (logits.argmax(dim=1) == targets).sum().item() / len(targets),  # as the trainer counts it
            "nll": F.cross_entropy(logits, targets).item(),
            "ece": expected_calibration_error(logits.softmax(dim=1), targets)}


def evaluate_run(config: Config, stage_dir: str | Path, out_dir: str | Path,
                 split_dir: str | Path | None = None) -> dict:
    """Score `stage_dir/model.pt` on the val and test splits into out_dir: metrics.json (accuracy, NLL, ECE, per-class
    test accuracy, the run's settings), history.csv (the curves so far), predictions.csv (for the confusion matrix)."""
    stage_dir, out_dir = Path(stage_dir), Path(out_dir)
    cio.check_folder(out_dir, EVALUATION)  # before the work; the folder is taken to write the results
    if distributed.env_world().distributed:
        raise ColamError("WORLD_SIZE: evaluating a stage runs in one process; start `colam evaluate` without torchrun")
    state = load_stage_state(stage_dir, config)
    cio.check_file(stage_dir / "history.csv", "--stage-dir")  # copied at the end: a FIFO would be read forever
    p = prepare(config, split_dir)
    cio.load_weights(p.model, state["model"], "--stage-dir model", state["model_file"])
    metrics = {**run_metrics(config, state["history"], state["elapsed"]), "evaluated_epoch": state["epoch"]}
    predicted = {}
    for name, dataset in {"test": p.data.test, "val": p.data.val}.items():
        if dataset is not None:
            batches = loader(dataset, config.train.eval_batch_size, shuffle=False, num_workers=config.data.num_workers)
            logits = predict(p.model, batches, p.device)[0].cpu()
            metrics.update({f"{name}_{k}": v for k, v in score(logits, torch.as_tensor(dataset.targets)).items()})
            predicted[name] = logits.argmax(dim=1)
    test_targets, predicted = torch.as_tensor(p.data.test.targets), predicted["test"]
    metrics["test_per_class_acc"] = {
        name: (predicted[test_targets == c] == c).float().mean().item() if (test_targets == c).any() else None
        for c, name in enumerate(p.data.classes)}
    cio.take_folder(out_dir, EVALUATION)
    cio.atomic_write_bytes(out_dir / "history.csv", (stage_dir / "history.csv").read_bytes())
    buffer, classes = io.StringIO(), p.data.classes
    rows = [(i, classes[a], classes[b]) for i, (a, b) in enumerate(zip(test_targets.tolist(), predicted.tolist()))]
    csv.writer(buffer).writerows([("sample", "actual", "predicted"), *rows])
    cio.write_text(out_dir / "predictions.csv", buffer.getvalue())
    cio.write_json(out_dir / "metrics.json", metrics)  # last: a metrics.json means the evaluation is complete
    return metrics


def confusion_matrix(report_dir: str | Path, classes: list[str]) -> list[list[int]]:
    """Counts[actual][predicted] over the test set, from the predictions.csv of `evaluate_run`."""
    index = {name: i for i, name in enumerate(classes)}
    counts = [[0] * len(classes) for _ in classes]
    with open(Path(report_dir) / "predictions.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            counts[index[row["actual"]]][index[row["predicted"]]] += 1
    return counts
