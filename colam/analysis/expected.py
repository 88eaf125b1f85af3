"""Expected accuracy of soft-label checkpoints (COLAM paper, Sec. 5.1, Fig. 1b): a fresh model trained with the COLAM
run's own settings on one stage's soft labels, fixed (method `fixed`), and its test accuracy."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from colam import io as cio
from colam.config import validate
from colam.engine import fit
from colam.errors import ColamError
from colam.runs import RunFolder
from colam.soft_labels import load_soft_labels


def labelled_stages(run: RunFolder) -> list[tuple[int, Path]]:
    """(stage, soft_labels.npy) of every stage of `run` that saved a C x C soft-label matrix."""
    files = [directory / "soft_labels.npy" for directory in run.stage_dirs]
    found = [(k, file) for k, file in enumerate(files, start=1) if file.is_file()]
    if not found:
        raise ColamError(f"--run: '{run.path}' saved no soft labels (stage_K/soft_labels.npy); the analysis needs a "
                         f"run of a method that estimates them, such as colam")
    return found


def _recorded(path: Path, key: str, what: str, kind=None):
    """`key` of the JSON file `path` (converted by `kind`), or one line saying the file lacks `what`."""
    try:
        value = json.loads(path.read_text())[key]
        return value if kind is None else kind(value)
    except (OSError, ValueError, KeyError, TypeError):
        raise ColamError(f"--run: '{path}' {what}") from None


def labels_temperature(labels_file: Path) -> float:
    """The T the labels were estimated with, from the soft_labels.json written next to them."""
    return _recorded(labels_file.with_suffix(".json"), "temperature",
                     "does not record the temperature the soft labels were estimated with", float)


def expected_accuracy(run: RunFolder, out_dir: str | Path, *, split_dir: str | Path | None = None,
                      progress: bool | None = None, stages: list[int] | None = None,
                      restart_if_changed: bool = False) -> list[dict]:
    """Train one fixed-label run per labelled stage (or per stage of `stages`) into out_dir/stage_K (resumable; a
    finished one is read, not trained again); one row per stage. A folder that holds a run of other soft labels is
    refused, or with `restart_if_changed` (DVC) trained afresh."""
    labelled = labelled_stages(run)
    if stages is not None:
        missing = sorted(set(stages) - {k for k, _ in labelled})
        if missing:
            raise ColamError(f"--stage: stage {missing[0]} of '{run.path}' saved no soft labels (stage_"
                             f"{missing[0]}/soft_labels.npy)")
        labelled = [(k, f) for k, f in labelled if k in stages]
    rows = []
    for stage, labels_file in labelled:
        folder = Path(out_dir) / f"stage_{stage}"
        digest = cio.sha256_file(labels_file)
        if not restart_if_changed:
            _refuse_other_labels(folder, digest)
        fixed = type(run.config.method.fixed)(labels=str(labels_file), temperature=labels_temperature(labels_file))
        config = replace(run.config, method=replace(run.config.method, name="fixed", fixed=fixed))
        validate(config)
        metrics = fit(config, folder, progress=progress, split_dir=split_dir, restart_if_changed=restart_if_changed,
                      inputs={"soft_labels": labels_file})
        stage_file, what = run.stage_dirs[stage - 1] / "metrics.json", "is missing or holds no epoch and test_acc"
        rows.append({"stage": stage, "epoch": _recorded(stage_file, "epoch", what, int),
                     "soft_labels": str(labels_file), "soft_labels_sha256": digest, "temperature": fixed.temperature,
                     "expected_test_acc": metrics["test_acc"], "expected_val_acc": metrics.get("val_acc"),
                     "run_test_acc_at_stage_end": _recorded(stage_file, "test_acc", what, float), "out": str(folder)})
    return rows


def read_soft_labels(path: Path) -> np.ndarray:
    """A saved C x C soft-label matrix, refused in one line unless square, finite and row-stochastic."""
    return load_soft_labels(path, "--run")


def class_names(labels_file: Path, count: int) -> list[str]:
    path = labels_file.with_suffix(".json")
    names = _recorded(path, "class_names", "does not record the class names")
    if not isinstance(names, list) or len(names) != count:
        raise ColamError(f"--run: '{path}' names {len(names) if isinstance(names, list) else 0} "
                         f"classes, the soft labels have {count}")
    return [str(n) for n in names]


def _refuse_other_labels(folder: Path, digest: str) -> None:
    """A finished fixed-label run is reused only if it trained on these very labels: a re-trained COLAM run writes new
    labels at the same path, and the old result must not be taken for theirs."""
    state_file = folder / "stage_1" / "state.pt"
    if not state_file.is_file():
        return
    state = cio.load_torch(state_file, "--out")
    saved = state.get("method", {}).get("labels_sha256") if isinstance(state, dict) else None
    if saved is not None and saved != digest:
        raise ColamError(f"--out: '{folder}' holds a run trained on other soft labels (sha256 {saved[:12]}, the file "
                         f"now has {digest[:12]}); delete it to measure the new ones")
