"""Expected accuracy of soft-label checkpoints (COLAM paper, Sec. 5.1, Fig. 1b).

For each stage of a finished COLAM run, a fresh model is trained from scratch on that stage's
saved soft-label matrix, fixed for the whole run (method `fixed`: COLAM's Eq. 4 with the labels
never re-estimated); its test accuracy is the checkpoint's expected accuracy. Everything else is
the COLAM run's own configuration: data, model, epochs, schedule and seed.
"""

from __future__ import annotations

import json
from pathlib import Path

from colam import io as cio
from colam.config import Config, from_dict, validate
from colam.engine import fit
from colam.errors import ColamError
from colam.runs import RunFolder


def labelled_stages(run: RunFolder, key: str = "--run") -> list[tuple[int, Path]]:
    """(stage, soft_labels.npy) of every stage of `run` that saved a C x C soft-label matrix."""
    found = [(k, d / "soft_labels.npy") for k, d in enumerate(run.stage_dirs, start=1) if (d / "soft_labels.npy").is_file()]
    if not found:
        raise ColamError(f"{key}: '{run.path}' saved no soft labels (stage_K/soft_labels.npy); the analysis needs a "
                         f"run of a method that estimates them, such as colam")
    return found


def labels_temperature(labels_file: Path) -> float:
    """The T the labels were estimated with, from the soft_labels.json written next to them."""
    try:
        return float(json.loads(labels_file.with_suffix(".json").read_text())["temperature"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ColamError(f"--run: '{labels_file.with_suffix('.json')}' does not record the temperature the soft "
                         f"labels were estimated with") from None


def fixed_label_config(run: RunFolder, labels_file: Path) -> Config:
    """The COLAM run's configuration, with the method replaced by training on `labels_file`."""
    settings = run.config.to_dict()
    settings["method"]["name"] = "fixed"
    settings["method"]["fixed"] = {"labels": str(labels_file), "temperature": labels_temperature(labels_file)}
    config = from_dict(settings)
    validate(config)
    return config


def expected_accuracy(run: RunFolder, out_dir: str | Path, *, split_dir: str | Path | None = None,
                      progress: bool | None = None) -> list[dict]:
    """Train one fixed-label run per labelled stage into out_dir/stage_K (resumable); one row per stage."""
    out_dir = Path(out_dir)
    rows = []
    for stage, labels_file in labelled_stages(run):
        folder = out_dir / f"stage_{stage}"
        digest = cio.sha256_file(labels_file)
        _refuse_other_labels(folder, digest)
        metrics = fit(fixed_label_config(run, labels_file), folder, progress=progress, split_dir=split_dir)
        stage_metrics = json.loads((run.stage_dirs[stage - 1] / "metrics.json").read_text())
        rows.append({"stage": stage, "epoch": stage_metrics["epoch"], "soft_labels": str(labels_file),
                     "soft_labels_sha256": digest, "temperature": labels_temperature(labels_file),
                     "expected_test_acc": metrics["test_acc"], "expected_val_acc": metrics.get("val_acc"),
                     "run_test_acc_at_stage_end": stage_metrics["test_acc"], "out": str(folder)})
    return rows


def _refuse_other_labels(folder: Path, digest: str) -> None:
    """A finished fixed-label run is reused only if it trained on these very labels: a re-trained
    COLAM run writes new labels at the same path, and the old result must not be taken for theirs."""
    state_file = folder / "stage_1" / "state.pt"
    if not state_file.is_file():
        return
    state = cio.load_torch(state_file, "--out")
    saved = state.get("method", {}).get("labels_sha256") if isinstance(state, dict) else None
    if saved is not None and saved != digest:
        raise ColamError(f"--out: '{folder}' holds a run trained on other soft labels (sha256 {saved[:12]}, the file "
                         f"now has {digest[:12]}); delete it to measure the new ones")
