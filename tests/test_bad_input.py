"""Bad input (issues 8 and 18): one table of malformed configs, data, artifacts, oversized and special
inputs, command lines, and output folders holding the user's own files (kind "loss"), each run
through the real `colam` entry point (`pipelines.cli.main`).

Every case must exit with status 2 and one line on stderr, `colam: error: ...`, that names the
input (the key, the flag or the file) and says what is wrong with it; and it must leave every file
that existed before byte-for-byte as it was (sha256 and mtime), with no new file either, but for
the ones a case lists in `leaves` (a corrupt image is met only when training reads it: the fresh
--out then holds the run's config.yaml, nothing else).

The earlier artifacts are real: a finished tiny `colam train` run and a `colam prepare` split,
built once per module and copied into each case's folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from colam.models import build_model
from pipelines.cli import main
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]


def sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


# ----------------------------------------------------------------------------- a case's world


@dataclass
class World:
    """The folder of one case: `run` and `split` are copies of the earlier artifacts, `out` a fresh
    output folder, `data` a folder for image data, `tmp` the case's folder."""

    tmp: Path

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    @property
    def split(self) -> Path:
        return self.tmp / "split"

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def data(self) -> Path:
        return self.tmp / "images"

    def fill(self, text: str) -> str:
        """`text` with {tmp}, {run}, {split}, {out}, {data} replaced by this case's paths."""
        for name in ("tmp", "run", "split", "out", "data"):
            text = text.replace("{" + name + "}", str(getattr(self, name)))
        return text

    def path(self, relative: str) -> Path:
        return self.tmp / relative

    def write(self, relative: str, content: str | bytes) -> None:
        path = self.path(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    def truncate(self, relative: str) -> None:
        path = self.path(relative)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def npy(self, relative: str, array: np.ndarray, allow_pickle: bool = False) -> None:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=allow_pickle)
        self.write(relative, buffer.getvalue())

    def weights(self, relative: str, classes: int = 10, width: int = 8) -> None:
        """A small_cnn state_dict for 1-channel digits, of another width or class count than the run's."""
        torch.manual_seed(0)
        buffer = io.BytesIO()
        torch.save(build_model("small_cnn", classes, in_channels=1, width=width).state_dict(), buffer)
        self.write(relative, buffer.getvalue())

    def fifo(self, relative: str) -> None:
        """A named pipe in place of the file at `relative`: reading it would wait for a writer forever."""
        self.path(relative).unlink(missing_ok=True)
        self.path(relative).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(self.path(relative))

    def folder_at(self, relative: str) -> None:
        """A folder in place of the file at `relative`."""
        self.path(relative).unlink(missing_ok=True)
        self.path(relative).mkdir(parents=True)

    def torch_file(self, relative: str, obj) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        self.write(relative, buffer.getvalue())

    def images(self, train=("ant", "bee"), val=("ant", "bee"), per_class: int = 3) -> None:
        """An imagefolder data set under `data`: 16x16 RGB noise PNGs, `per_class` of each class."""
        rng = np.random.default_rng(0)
        for split, classes in (("train", train), ("val", val)):
            for name in classes:
                folder = self.data / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.png")


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    kind: str  # config, data or artifact
    id: str
    argv: tuple[str, ...]  # the command line, with {run}, {out}, ... filled in per case
    names: str  # the input the message must name: a key, a flag or a file path
    says: str  # a fragment of the message that says what is wrong
    setup: Callable[[World], None] | None = None
    leaves: tuple[str, ...] = ()  # new files the command may write (relative to the case's folder)
    fails: str = ""  # a known failure, and the change that fixes it (the case is a strict xfail until then)
    env: tuple[tuple[str, str], ...] = ()  # environment variables for the command, {tmp} ... filled in
    hides: str = ""  # a secret of the input that the message must not show


def train(*overrides: str, out: str = "{out}", extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return ("train", "--out", out, *extra, *sets(TINY + list(overrides)))


def evaluate(*overrides: str, stage: str = "{run}/stage_2") -> tuple[str, ...]:
    return ("evaluate", "--stage-dir", stage, "--out", "{out}", *sets(TINY + list(overrides)))


IMAGES = ("data.name=imagefolder", "data.root={data}", "data.train_subset=null", "data.val_fraction=0")
FIXED = ("method.name=fixed", "method.fixed.labels={tmp}/labels.npy")
KD = ("method.name=kd", "method.kd.teacher={tmp}/labels.npy")
RESUME = train(out="{run}")
# what a fresh --out holds when training stops at its first batch: the run's config and provenance
STARTED = ("out/.colam-files", "out/config.yaml", "out/.provenance.json")


def uniform(rows: int, cols: int) -> np.ndarray:
    return np.full((rows, cols), 1.0 / cols, dtype=np.float32)


def with_nan(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array[3, 2] = np.nan
    return array


def negative(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array[0, 0], array[0, 1] = -0.1, array[0, 1] + 0.2  # the row still sums to 1
    return array


def checkpoint_with_model(w: World, **weights) -> None:
    """The run's own checkpoint.pt (same config), with the weights of another model, as if it were
    interrupted before writing its metrics."""
    w.weights("other.pt", **weights)
    checkpoint_with(w, model=torch.load(w.path("other.pt"), weights_only=True))
    w.path("other.pt").unlink()


def checkpoint_with(w: World, **fields) -> None:
    """The run's own checkpoint.pt with `fields` replaced, as if it were interrupted before its metrics."""
    state = torch.load(w.run / "checkpoint.pt", weights_only=True)
    w.torch_file("run/checkpoint.pt", {**state, **fields})
    (w.run / "metrics.json").unlink()


def foreign_optimizer(w: World) -> dict:
    """The state of SGD with momentum over a small_cnn of another width, after one step."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=1, width=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def swapped_split(w: World) -> None:
    """split/split.npz replaced by the one of another split seed (split.json left as it was)."""
    assert main(["prepare", "--out", str(w.path("other")), *sets(TINY + ["data.split_seed=1"])]) == 0
    shutil.copyfile(w.path("other/split.npz"), w.split / "split.npz")
    shutil.rmtree(w.path("other"))


CONFIG = [
    Case("config", "unknown-method", train("method.name=xyz"), "method.name", "unknown method"),
    Case("config", "unknown-key", train("method.colam.tempreture=2"), "method.colam.tempreture", "unknown key"),
    Case("config", "unknown-section", train("optimizer.lr=0.1"), "optimizer", "unknown key"),
    Case("config", "string-for-int", train("train.epochs=four"), "train.epochs", "expected int"),
    Case("config", "float-for-int", train("train.batch_size=32.5"), "train.batch_size", "expected int"),
    Case("config", "list-for-float", train("train.lr=[0.1, 0.2]"), "train.lr", "expected float"),
    Case("config", "string-for-bool", train("data.download=maybe"), "data.download", "expected bool"),
    Case("config", "number-for-mapping", train("model.options=3"), "model.options", "expected a mapping"),
    Case("config", "value-for-section", ("train", "--out", "{out}", "--config", "{tmp}/c.yaml"), "train",
         "expected a section", lambda w: w.write("c.yaml", "train: 5\n")),
    Case("config", "temperature-zero", train("method.colam.temperature=0"), "method.colam.temperature", "must be > 0"),
    Case("config", "temperature-negative", train("method.colam.temperature=-1"), "method.colam.temperature",
         "must be > 0"),
    Case("config", "temperature-nan", train("method.colam.temperature=.nan"), "method.colam.temperature", "finite"),
    Case("config", "kd-temperature-zero", train("method.name=kd", "method.kd.teacher={run}", "method.kd.temperature=0"),
         "method.kd.temperature", "must be > 0"),
    Case("config", "lr-inf", train("train.lr=.inf"), "train.lr", "finite"),
    Case("config", "lr-negative", train("train.lr=-0.05"), "train.lr", "must be > 0"),
    Case("config", "weight-decay-negative", train("train.weight_decay=-1e-4"), "train.weight_decay", "must be >= 0"),
    Case("config", "momentum-nan", train("train.momentum=nan"), "train.momentum", "finite"),
    Case("config", "batch-size-negative", train("train.batch_size=-32"), "train.batch_size", "must be >= 1"),
    Case("config", "epochs-negative", train("train.epochs=-4"), "train.epochs", "must be >= 1"),
    Case("config", "epochs-zero", train("train.epochs=0", "method.name=hl"), "train.epochs", "must be >= 1"),
    Case("config", "stages-times-epochs", train("train.epochs=5"), "method.colam.stages", "must equal train.epochs"),
    Case("config", "epochs-per-stage-zero", train("method.colam.epochs_per_stage=0"), "method.colam.epochs_per_stage",
         "must be >= 1"),
    Case("config", "peers-zero", train("method.colam.peers=0"), "method.colam.peers", "integer >= 1"),
    Case("config", "peers-above-smallest-class", train("method.colam.peers=1000"), "method.colam.peers",
         "exceeds the smallest class"),
    Case("config", "label-noise-one", train("data.label_noise=1"), "data.label_noise", "must be in [0, 1)"),
    Case("config", "label-noise-negative", train("data.label_noise=-0.1"), "data.label_noise", "must be in [0, 1)"),
    Case("config", "val-fraction-one", train("data.val_fraction=1.0"), "data.val_fraction", "must be in [0, 1)"),
    Case("config", "seed-negative", train("seed=-1"), "seed", "must be in [0, 2**32)"),
    Case("config", "unknown-schedule", train("train.lr_schedule=linear"), "train.lr_schedule", "must be one of"),
    Case("config", "unknown-data-set", train("data.name=imagenet"), "data.name", "unknown data set"),
    Case("config", "unknown-model-option", train("model.options={depth: 3}"), "model.options.depth",
         "not an option of model"),
    Case("config", "yaml-truncated", ("train", "--out", "{out}", "--config", "{tmp}/c.yaml"), "{tmp}/c.yaml",
         "not valid YAML", lambda w: w.write("c.yaml", "train:\n  epochs: [4, 8\n  lr: 0.1\n")),
    Case("config", "yaml-not-text", ("train", "--out", "{out}", "--config", "{tmp}/c.yaml"), "{tmp}/c.yaml",
         "cannot read", lambda w: w.write("c.yaml", b"\xff\xfe\x00\x81 train")),
    Case("config", "yaml-list", ("train", "--out", "{out}", "--config", "{tmp}/c.yaml"), "{tmp}/c.yaml",
         "must hold a mapping", lambda w: w.write("c.yaml", "- train\n- method\n")),
    Case("config", "config-missing", ("train", "--out", "{out}", "--config", "{tmp}/none.yaml"), "{tmp}/none.yaml",
         "does not exist"),
    Case("config", "set-without-value", ("train", "--out", "{out}", "--set", "train.epochs"), "--set",
         "not of the form KEY=VALUE"),
    Case("config", "set-into-a-value", train("train.epochs.x=1"), "--set", "is a value, not a section"),
    Case("config", "eval-every-zero", train("train.eval_every=0"), "train.eval_every", "must be >= 1"),
    Case("config", "threads-zero", train("train.threads=0"), "train.threads", "must be auto or 1 to 1024"),
    Case("config", "threads-words", train("train.threads=all"), "train.threads", "must be auto or 1 to 1024"),
    Case("config", "unknown-stage1-loss", train("method.colam.stage1_loss=soft"), "method.colam.stage1_loss",
         "must be one of ce, tempered"),
    Case("config", "unknown-peer-labels", train("method.colam.peer_labels=batch"), "method.colam.peer_labels",
         "must be one of sample, class"),
    Case("config", "unknown-guard", train("method.colam.guard=fix"), "method.colam.guard",
         "must be one of none, keep, anchor"),
    Case("config", "params-data-root-elsewhere", ("check", "--config", "{tmp}/params.yaml"), "data.root",
         "must be data/raw/digits", lambda w: w.write("params.yaml", "data:\n  root: data\nraw_data:\n  source: bundled\n")),
    Case("config", "params-repeated-seeds", ("check", "--config", "{tmp}/params.yaml"), "compare.seeds",
         "repeats a value", lambda w: w.write("params.yaml", "compare:\n  seeds: [0, 0]\n")),
]

DATA = [
    Case("data", "class-missing-in-train", train(*IMAGES), "{data}", "different classes",
         lambda w: w.images(train=("ant", "bee"), val=("ant", "bee", "cat"))),
    Case("data", "class-folder-without-images", train(*IMAGES), "{data}/train", "cat",
         lambda w: (w.images(train=("ant", "bee"), val=("ant", "bee", "cat")),
                    (w.data / "train" / "cat").mkdir())),
    Case("data", "one-class", train(*IMAGES), "data.root", "2 or more", lambda w: w.images(("ant",), ("ant",))),
    Case("data", "corrupt-image", train(*IMAGES), "{data}/train/bee/1.png", "cannot be read",
         lambda w: (w.images(), w.write("images/train/bee/1.png", os.urandom(300))), STARTED),
    Case("data", "corrupt-image-in-a-worker", train(*IMAGES, "data.num_workers=2"), "{data}/train/bee/1.png",
         "cannot be read", lambda w: (w.images(), w.write("images/train/bee/1.png", os.urandom(300))),
         STARTED),
    Case("data", "truncated-image", train(*IMAGES), "{data}/train/ant/2.png", "cannot be read",
         lambda w: (w.images(), w.truncate("images/train/ant/2.png")), STARTED),
    Case("data", "train-subset-below-classes", train("data.train_subset=5", "data.val_fraction=0"),
         "data.train_subset", "no training samples"),
    Case("data", "val-fraction-takes-a-class", train("data.train_subset=10", "data.val_fraction=0.5"),
         "data.val_fraction", "no training samples"),
    Case("data", "label-noise-empties-a-class",
         train("data.train_subset=10", "data.val_fraction=0", "data.label_noise=0.5"), "data.label_noise",
         "no training samples"),
    Case("data", "train-subset-above-samples", train("data.train_subset=100000"), "data.train_subset", "exceeds"),
    Case("data", "root-missing", train(*IMAGES), "{data}", "does not exist"),
    Case("data", "root-without-val", train(*IMAGES), "{data}/val", "does not exist",
         lambda w: (w.images(), shutil.rmtree(w.data / "val"))),
    Case("data", "fashion-root-empty", train("data.name=fashion_mnist", "data.root={data}"), "data.root",
         "no fashion_mnist data set found", lambda w: w.data.mkdir()),
    Case("data", "fashion-file-of-other-content", train("data.name=fashion_mnist", "data.root={data}"),
         "{data}/train-images-idx3-ubyte", "is not fashion_mnist's original",
         lambda w: [w.write(f"images/{f}", b"\x00\x00\x08\x01\x00\x00\x00\x01\x05")
                    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                              "t10k-labels-idx1-ubyte")]),
    Case("data", "data-get-from-nowhere", ("data", "get", "--set", "data.name=mnist", "--from", "{tmp}/nowhere",
                                           "--out", "{out}"), "{tmp}/nowhere", "is not a folder"),
    Case("data", "cifar-root-empty", train("data.name=cifar10", "data.root={data}", "data.train_subset=null"),
         "{data}", "no cifar10 data set found", lambda w: w.data.mkdir()),
]

ARTIFACTS = [
    # resuming into an existing run folder
    Case("artifact", "resume-truncated-checkpoint", RESUME, "{run}/checkpoint.pt", "not a readable checkpoint",
         lambda w: w.truncate("run/checkpoint.pt")),
    Case("artifact", "resume-foreign-torch-file", RESUME, "{run}/checkpoint.pt", "not a colam training checkpoint",
         lambda w: w.torch_file("run/checkpoint.pt", {"weights": torch.zeros(3)})),
    Case("artifact", "resume-checkpoint-of-another-model", RESUME, "{run}/checkpoint.pt", "another model",
         lambda w: checkpoint_with_model(w, width=16)),
    Case("artifact", "out-holds-another-config", train("seed=1", out="{run}"), "{run}", "different configuration"),
    Case("artifact", "train-into-a-stage-folder", train(out="{run}/stage_2"), "{run}/stage_2",
         "another kind of colam output (stage, not training run)"),
    Case("artifact", "stage-into-a-stage-folder", train(out="{run}/stage_2", extra=("--stage", "1")), "{run}/stage_2",
         "another kind of colam output (stage, not folder of stages)"),
    Case("artifact", "evaluate-onto-the-run", ("evaluate", "--stage-dir", "{run}/stage_2", "--out", "{run}",
                                               *sets(TINY)), "{run}", "(training run, not evaluation)"),
    Case("artifact", "evaluate-into-its-stage-folder", ("evaluate", "--stage-dir", "{run}/stage_2", "--out",
                                                        "{run}/stage_2", *sets(TINY)), "{run}/stage_2",
         "(stage, not evaluation)"),
    Case("artifact", "out-holds-another-worker-count", train("data.num_workers=2", out="{run}"), "{run}",
         "different configuration"),
    Case("artifact", "out-holds-unreadable-config", RESUME, "{run}", "different configuration",
         lambda w: ((w.run / "checkpoint.pt").unlink(), w.write("run/config.yaml", "train: [1,\n"))),
    Case("artifact", "out-is-a-file", train(out="{tmp}/file"), "{tmp}/file", "not a folder",
         lambda w: w.write("file", "x")),
    Case("artifact", "stage-from-truncated-state", train(out="{run}", extra=("--stage", "2")),
         "{run}/stage_1/state.pt", "not a readable checkpoint",  # a chain of stages: no whole run's files
         lambda w: [(w.run / name).unlink() for name in ("checkpoint.pt", ".colam-files")]
         + [w.truncate("run/stage_1/state.pt")]),
    Case("artifact", "stage-into-a-whole-run", train(out="{run}", extra=("--stage", "2")), "{run}",
         "(training run, not folder of stages)"),
    Case("artifact", "stage-out-of-range", train(out="{run}", extra=("--stage", "3")), "--stage",
         "not a stage of this run"),
    # colam evaluate --stage-dir
    Case("artifact", "evaluate-model-of-another-model", evaluate(), "{run}/stage_2/model.pt", "another model",
         lambda w: w.weights("run/stage_2/model.pt", width=16)),
    Case("artifact", "evaluate-model-of-another-class-count", evaluate(), "{run}/stage_2/model.pt",
         "another model or class count", lambda w: w.weights("run/stage_2/model.pt", classes=5)),
    Case("artifact", "evaluate-truncated-model", evaluate(), "{run}/stage_2/model.pt", "not a readable checkpoint",
         lambda w: w.truncate("run/stage_2/model.pt")),
    Case("artifact", "evaluate-model-not-a-state-dict", evaluate(), "{run}/stage_2/model.pt", "not a model state_dict",
         lambda w: w.torch_file("run/stage_2/model.pt", [1, 2, 3])),
    Case("artifact", "evaluate-truncated-state", evaluate(), "{run}/stage_2/state.pt", "not a readable checkpoint",
         lambda w: w.truncate("run/stage_2/state.pt")),
    Case("artifact", "evaluate-stage-of-another-config", evaluate("seed=1"), "{run}/stage_2",
         "different configuration"),
    Case("artifact", "evaluate-stage-dir-missing", evaluate(stage="{run}/stage_9"), "{run}/stage_9", "does not exist"),
    # a prepared split
    Case("artifact", "split-truncated", train(extra=("--split", "{split}")), "{split}", "not a readable prepared split",
         lambda w: w.truncate("split/split.npz")),
    Case("artifact", "split-of-other-data", train("data.split_seed=1", extra=("--split", "{split}")), "{split}",
         "prepared with data.split_seed"),
    Case("artifact", "split-missing", train(extra=("--split", "{tmp}/nosplit")), "{tmp}/nosplit",
         "holds no prepared split"),
    # soft-label files: method.fixed.labels and method.kd.teacher
    Case("artifact", "labels-wrong-shape", train(*FIXED), "{tmp}/labels.npy", "has shape",
         lambda w: w.npy("labels.npy", uniform(3, 3))),
    Case("artifact", "labels-nan", train(*FIXED), "{tmp}/labels.npy", "NaN",
         lambda w: w.npy("labels.npy", with_nan(uniform(10, 10)))),
    Case("artifact", "labels-rows-not-summing-to-1", train(*FIXED), "{tmp}/labels.npy", "sum to 1",
         lambda w: w.npy("labels.npy", uniform(10, 10) * 2)),
    Case("artifact", "labels-negative", train(*FIXED), "{tmp}/labels.npy", "negative",
         lambda w: w.npy("labels.npy", negative(uniform(10, 10)))),
    Case("artifact", "labels-not-npy", train(*FIXED), "{tmp}/labels.npy", "no NumPy header",
         lambda w: w.write("labels.npy", "0.1,0.9\n0.9,0.1\n")),
    Case("artifact", "labels-pickled-objects", train(*FIXED), "{tmp}/labels.npy", "not a readable .npy",
         lambda w: w.npy("labels.npy", np.array([{"a": 1}] * 10, dtype=object), allow_pickle=True)),
    Case("artifact", "labels-missing", train(*FIXED), "{tmp}/labels.npy", "not a file"),
    Case("artifact", "kd-labels-wrong-shape", train(*KD), "{tmp}/labels.npy", "has shape",
         lambda w: w.npy("labels.npy", uniform(10, 9))),
    Case("artifact", "kd-labels-nan", train(*KD), "{tmp}/labels.npy", "NaN",
         lambda w: w.npy("labels.npy", with_nan(uniform(10, 10)))),
    Case("artifact", "kd-labels-not-npy", train("method.name=kd", "method.kd.teacher={tmp}/labels.csv"),
         "{tmp}/labels.csv", "not a .npy", lambda w: w.write("labels.csv", "0.5,0.5\n")),
    # a finished run as a teacher
    Case("artifact", "kd-teacher-of-another-class-count", train("method.name=kd", "method.kd.teacher={run}"),
         "{run}/stage_2/model.pt", "classifies 5 classes", lambda w: w.weights("run/stage_2/model.pt", classes=5)),
    Case("artifact", "kd-teacher-truncated-model", train("method.name=kd", "method.kd.teacher={run}"),
         "{run}/stage_2/model.pt", "not a readable checkpoint", lambda w: w.truncate("run/stage_2/model.pt")),
    Case("artifact", "kd-teacher-unfinished", train("method.name=kd", "method.kd.teacher={run}"), "{run}",
         "not a finished run", lambda w: (w.run / "stage_2" / "model.pt").unlink()),
    # the analyses read a run's soft labels and curves
    Case("artifact", "analyze-labels-not-summing-to-1", ("analyze", "soft-labels", "--run", "{run}", "--out", "{out}"),
         "{run}/stage_2/soft_labels.npy", "sum to 1",
         lambda w: w.npy("run/stage_2/soft_labels.npy", uniform(10, 10) / 2)),
    Case("artifact", "analyze-history-garbled", ("analyze", "curves", "--run", "{run}", "--out", "{out}"),
         "{run}/history.csv", "history.csv", lambda w: w.write("run/history.csv", "epoch,train_acc,test_acc\n1,x,y\n")),
]

def alias_bomb(levels: int = 9) -> list[str]:
    """YAML mapping entries whose last alias expands to 10**levels values ("billion laughs")."""
    return ["a0: &a0 [" + ",".join(["x"] * 10) + "]"] + [
        f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]


DEEP = "[" * 100 + "]" * 100
WITH_CONFIG = ("train", "--out", "{out}", "--config", "{tmp}/c.yaml")

BOUNDS = [
    Case("bounds", "config-alias-bomb", WITH_CONFIG, "{tmp}/c.yaml", "expands to more than",
         lambda w: w.write("c.yaml", "\n".join(alias_bomb()) + "\n")),
    Case("bounds", "set-alias-bomb", train("train.epochs={" + ", ".join(alias_bomb()) + "}"), "--set: 'train.epochs'",
         "expands to more than"),
    Case("bounds", "config-nested-too-deep", WITH_CONFIG, "{tmp}/c.yaml", "nests deeper than",
         lambda w: w.write("c.yaml", f"train: {DEEP}\n")),
    Case("bounds", "set-nested-too-deep", train(f"train.epochs={DEEP}"), "--set: 'train.epochs'", "nests deeper than"),
    Case("bounds", "set-nested-50k-deep", train("train.epochs=" + "[" * 50_000 + "]" * 50_000), "--set",
         "nests deeper than"),
    Case("bounds", "config-too-large", WITH_CONFIG, "{tmp}/c.yaml", "bytes, more than",
         lambda w: w.write("c.yaml", "# padding\n" * 120_000)),
    Case("bounds", "config-is-a-folder", WITH_CONFIG, "{tmp}/c.yaml", "is a folder",
         lambda w: w.path("c.yaml").mkdir()),
    Case("bounds", "config-is-a-fifo", WITH_CONFIG, "{tmp}/c.yaml", "not a regular file", lambda w: w.fifo("c.yaml")),
    Case("bounds", "config-is-a-device", ("train", "--out", "{out}", "--config", "/dev/zero"), "/dev/zero",
         "not a regular file"),
    Case("bounds", "resume-checkpoint-is-a-fifo", RESUME, "{run}/checkpoint.pt", "not a regular file",
         lambda w: w.fifo("run/checkpoint.pt")),
    Case("bounds", "resume-checkpoint-is-a-folder", RESUME, "{run}/checkpoint.pt", "is a folder",
         lambda w: w.folder_at("run/checkpoint.pt")),
    Case("bounds", "evaluate-model-is-a-fifo", evaluate(), "{run}/stage_2/model.pt", "not a regular file",
         lambda w: w.fifo("run/stage_2/model.pt")),
    Case("bounds", "evaluate-state-is-a-fifo", evaluate(), "{run}/stage_2/state.pt", "not a regular file",
         lambda w: w.fifo("run/stage_2/state.pt")),
    Case("bounds", "stage-from-a-fifo-state", train(out="{run}", extra=("--stage", "2")), "{run}/stage_1/state.pt",
         "not a regular file", lambda w: [(w.run / name).unlink() for name in ("checkpoint.pt", ".colam-files")]
         + [w.fifo("run/stage_1/state.pt")]),  # a chain of stages: no whole run's checkpoint.pt or manifest
    Case("bounds", "evaluate-history-is-a-fifo", evaluate(), "{run}/stage_2/history.csv", "not a regular file",
         lambda w: w.fifo("run/stage_2/history.csv")),
    Case("bounds", "labels-is-a-fifo", train(*FIXED), "{tmp}/labels.npy", "is not a file",
         lambda w: w.fifo("labels.npy")),
    Case("bounds", "kd-labels-is-a-fifo", train(*KD), "{tmp}/labels.npy", "neither a folder nor a file",
         lambda w: w.fifo("labels.npy")),
    Case("bounds", "kd-teacher-model-is-a-fifo", train("method.name=kd", "method.kd.teacher={run}"),
         "{run}/stage_2", "holds no model.pt", lambda w: w.fifo("run/stage_2/model.pt")),
    Case("bounds", "split-npz-is-a-fifo", train(extra=("--split", "{split}")), "{split}/split.npz",
         "not a regular file", lambda w: w.fifo("split/split.npz")),
    Case("bounds", "batch-size-10-to-the-30", train("train.batch_size=" + "1" + "0" * 30), "train.batch_size",
         "must be >= 1 and <="),
    Case("bounds", "eval-batch-size-huge", train("train.eval_batch_size=" + str(2**40)), "train.eval_batch_size",
         "must be >= 1 and <="),
    Case("bounds", "epochs-10-to-the-12", train("train.epochs=" + str(10**12)), "train.epochs", "must be >= 1 and <="),
    Case("bounds", "split-seed-negative", train("data.split_seed=-1"), "data.split_seed", "must be >= 0 and <="),
    Case("bounds", "split-seed-2-to-the-40", train("data.split_seed=" + str(2**40)), "data.split_seed",
         "must be >= 0 and <="),
    Case("bounds", "workers-100000", train("data.num_workers=100000"), "data.num_workers", "must be >= 0 and <="),
    Case("bounds", "train-subset-10-to-the-12", train("data.train_subset=" + str(10**12)), "data.train_subset",
         "<= 10**9"),
    Case("bounds", "model-width-10-to-the-12", train("model.options={width: " + str(10**12) + "}"),
         "model.options.width", "and <= 4,096"),
    Case("bounds", "kfp-stages-100000", ("kfp", "compile", "--params", str(REPO / "params.yaml"), "--stages", "100000",
                                         "--out", "{out}/p.yaml"), "--stages", "<= 200"),
    Case("bounds", "compare-creates-no-store", ("compare", "--experiment", "x"), "{tmp}/none.db", "no MLflow store",
         env=(("MLFLOW_TRACKING_URI", "sqlite:///{tmp}/none.db"),)),
    Case("bounds", "compare-hides-the-password", ("compare", "--experiment", "x"), "alice:***@127.0.0.1",
         "cannot use the tracking store", env=(("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:9/"),),
         hides="s3cret"),
    Case("bounds", "resume-checkpoint-epoch-negative", RESUME, "{run}/checkpoint.pt", "not an epoch of this run",
         lambda w: checkpoint_with(w, epoch=-3)),
    Case("bounds", "resume-checkpoint-epoch-million", RESUME, "{run}/checkpoint.pt", "not an epoch of this run",
         lambda w: checkpoint_with(w, epoch=10**6)),
    Case("bounds", "resume-checkpoint-epoch-a-string", RESUME, "{run}/checkpoint.pt", "not an epoch of this run",
         lambda w: checkpoint_with(w, epoch="2")),
    Case("bounds", "resume-foreign-optimizer-state", RESUME, "{run}/checkpoint.pt", "optimizer state of another model",
         lambda w: checkpoint_with(w, optimizer=foreign_optimizer(w))),
    Case("bounds", "resume-optimizer-state-not-a-dict", RESUME, "{run}/checkpoint.pt",
         "optimizer state of another model", lambda w: checkpoint_with(w, optimizer=[1, 2])),
    Case("bounds", "split-npz-of-another-split-seed", train(extra=("--split", "{split}")), "{split}/split.npz",
         "not the split its split.json describes", swapped_split),
    Case("bounds", "split-json-is-a-folder", train(extra=("--split", "{split}")), "{split}/split.json", "is a folder",
         lambda w: w.folder_at("split/split.json")),
]

CLI = [
    Case("cli", "unknown-flag", train(extra=("--bogus",)), "--bogus", "unrecognized arguments"),
    Case("cli", "unknown-command", ("trian", "--out", "{out}"), "trian", "invalid choice"),
    Case("cli", "stage-not-a-number", train(extra=("--stage", "two")), "--stage", "invalid int value"),
    Case("cli", "out-missing", ("train", *sets(TINY)), "--out", "required"),
    Case("cli", "unknown-analysis", ("analyze", "curvez", "--run", "{run}"), "curvez", "invalid choice"),
    Case("cli", "unknown-kfp-command", ("kfp", "compyle"), "compyle", "invalid choice"),
    Case("cli", "register-quoted", train(extra=("--track", "--register", "it's")), "--register", "no usable model name"),
    Case("cli", "register-untracked", train(extra=("--no-track", "--register", "m")), "--register", "with --track"),
    Case("cli", "register-slash", train(extra=("--track", "--register", "a/b")), "--register", "no usable model name"),
    Case("cli", "alias-latest", ("compare", "--experiment", "x", "--track", "--register", "m", "--alias", "latest"),
         "--alias", "no usable alias"),
    Case("cli", "compare-register-untracked", ("compare", "--experiment", "x", "--register", "m"), "--register",
         "with --track only"),
    Case("cli", "unknown-sweep", ("sweep", "compair", "--params", "{tmp}/p.yaml", "--out", "{out}"), "compair",
         "invalid choice"),
    Case("cli", "sweep-jobs-zero", ("sweep", "grid", "--params", "{tmp}/p.yaml", "--out", "{out}", "--jobs", "0"),
         "--jobs", "must be auto or a whole number >= 1", lambda w: w.write("p.yaml", "seed: 0\n")),
    Case("cli", "sweep-expected-without-run", ("sweep", "expected", "--params", "{tmp}/p.yaml", "--out", "{out}"),
         "--run", "required by the expected plan", lambda w: w.write("p.yaml", "seed: 0\n")),
    Case("cli", "newline-in-a-key", train("trai\nn.epochs=1"), "trai\\nn", "unknown key"),
    Case("cli", "escape-sequence-in-a-key", train("\x1b[31mtrain.epochs=1"), "\\x1b[31mtrain", "unknown key"),
    Case("cli", "escape-sequence-in-out", train(out="{tmp}/file\x1b[2J"), "{tmp}/file\\x1b[2J", "not a folder",
         lambda w: w.write("file\x1b[2J", "x")),
    Case("cli", "set-python-tag", train('train.epochs=!!python/object/apply:os.system ["echo hi"]'), "train.epochs",
         "expected int"),
    Case("cli", "config-python-tag", WITH_CONFIG, "{tmp}/c.yaml", "not valid YAML",
         lambda w: w.write("c.yaml", 'train: !!python/object/apply:os.system ["echo hi"]\n')),
    Case("cli", "config-nul-byte", WITH_CONFIG, "{tmp}/c.yaml", "not valid YAML",
         lambda w: w.write("c.yaml", "train:\x00\n")),
    Case("cli", "set-empty-key", ("train", "--out", "{out}", "--set", "=3"), "--set", "not of the form KEY=VALUE"),
    # output paths the system refuses: one line naming the path, whichever command writes it
    Case("cli", "train-out-under-proc", train(out="/proc/colam-out"), "/proc/colam-out", "cannot create"),
    Case("cli", "prepare-out-is-a-file", ("prepare", "--out", "{tmp}/file", *sets(TINY)), "{tmp}/file",
         "exists and is not a folder",
         lambda w: w.write("file", "x")),
    Case("cli", "prepare-out-under-proc", ("prepare", "--out", "/proc/colam-out", *sets(TINY)), "/proc/colam-out",
         "No such file or directory"),
    Case("cli", "evaluate-out-under-proc", ("evaluate", "--stage-dir", "{run}/stage_2", "--out", "/proc/colam-out",
                                             *sets(TINY)), "/proc/colam-out", "No such file or directory"),
    Case("cli", "check-out-under-proc", ("check", "--config", str(REPO / "params.yaml"), "--out",
                                          "/proc/colam-out/marker"), "/proc/colam-out", "No such file or directory"),
    Case("cli", "kfp-compile-out-under-proc", ("kfp", "compile", "--params", str(REPO / "params.yaml"), "--stages", "2",
                                                "--out", "/proc/colam-out.yaml"), "/proc/colam-out.yaml",
         "No such file or directory"),
    Case("cli", "long-value-is-cut", train("method.name=" + "x" * 5000), "method.name", "(cut)"),
]


def mine(*relative: str) -> Callable[[World], None]:
    """Files of the user's own at `relative` paths (a trailing / makes an empty folder)."""
    def setup(w: World) -> None:
        for name in relative:
            if name.endswith("/"):
                w.path(name).mkdir(parents=True, exist_ok=True)
            else:
                w.write(name, f"the user's own {name}\n")
    return setup


def manifest_of(relative: str, kind: str) -> Callable[[World], None]:
    """A folder whose manifest says it holds colam's output of `kind`."""
    return lambda w: w.write(f"{relative}/.colam-files", f"# kind: {kind}\n")


def chain(w: World, *overrides: str) -> None:
    """out/ as a chain of stages: stage 1 trained alone (`train --stage 1`)."""
    assert main(train(*overrides, extra=("--stage", "1"), out=str(w.out))) == 0


STAGE_1 = train(extra=("--stage", "1"))
EVALUATE = evaluate()
PREPARE = ("prepare", "--out", "{out}", *sets(TINY))
CURVES = ("analyze", "curves", "--run", "{run}", "--out", "{out}", "--no-track", *sets(TINY))
DATA_GET = ("data", "get", "--from", "bundled", "--out", "{out}", *sets(TINY))
RESTART = train("seed=1", out="{run}", extra=("--restart-if-changed",))
FOREIGN = "what colam did not write"

# The folder is the user's (issue 18): every file that was there is byte-identical afterwards (the table's check).
LOSS = [
    *(Case("loss", f"train-out-holds-{tag}", train(), "{out}", f"{FOREIGN} ({name})", mine(f"out/{name}"))
      for tag, name in [("metrics", "metrics.json"), ("history", "history.csv"), ("tmp", "notes.tmp"),
                        ("dot-tmp", ".cache.tmp"), ("temporary-named-like-colam's", ".checkpoint.pt.a1b2c3d4.tmp"),
                        ("checkpoint", "checkpoint.pt"), ("config", "config.yaml"), ("provenance", ".provenance.json"),
                        ("gitkeep", ".gitkeep"), ("manifest-less-stage", "stage_1/")]),
    Case("loss", "train-out-holds-an-empty-folder", train(), "{out}", f"{FOREIGN} (notes/)", mine("out/notes/")),
    Case("loss", "train-out-holds-a-symlink", train(), "{out}", f"{FOREIGN} (link)",
         lambda w: (w.out.mkdir(), (w.out / "link").symlink_to(w.run / "metrics.json"))),
    Case("loss", "train-out-holds-a-broken-symlink", train(), "{out}", f"{FOREIGN} (gone)",
         lambda w: (w.out.mkdir(), (w.out / "gone").symlink_to(w.tmp / "nowhere"))),
    Case("loss", "train-out-is-a-symlink-to-photos", train(out="{tmp}/link"), "{tmp}/link", f"{FOREIGN} (a.jpg)",
         lambda w: (mine("photos/a.jpg")(w), w.path("link").symlink_to(w.path("photos")))),
    Case("loss", "train-out-is-a-symlink-loop", train(out="{tmp}/loop"), "{tmp}/loop", "a symbolic link to nothing",
         lambda w: w.path("loop").symlink_to(w.path("loop"))),
    Case("loss", "prepare-out-is-a-dangling-symlink", ("prepare", "--out", "{tmp}/gone", *sets(TINY)), "{tmp}/gone",
         "a symbolic link to nothing", lambda w: w.path("gone").symlink_to(w.path("nowhere"))),
    Case("loss", "resume-run-beside-a-backup-named-like-a-temporary", RESUME, "{run}",
         f"{FOREIGN} (.metrics.json.backup.tmp)", mine("run/.metrics.json.backup.tmp")),
    Case("loss", "resume-run-with-a-backup-in-a-stage", RESUME, "{run}", f"{FOREIGN} (stage_1/.history.csv.old.tmp)",
         mine("run/stage_1/.history.csv.old.tmp")),
    Case("loss", "evaluate-out-named-with-a-newline-in-a-run", ("evaluate", "--stage-dir", "{run}/stage_2", "--out",
                                                                "{run}/ev\nnotes.txt", *sets(TINY)),
         "{run}/ev\\nnotes.txt", "a name colam does not write"),
    Case("loss", "analysis-out-named-with-a-hash-in-a-run", ("analyze", "curves", "--run", "{run}", "--out",
                                                             "{run}/#an", "--no-track", *sets(TINY)), "{run}/#an",
         "a name colam does not write"),
    Case("loss", "expected-accuracy-out-holds-a-user-file", ("analyze", "expected-accuracy", "--run", "{run}",
                                                             "--runs-out", "{tmp}/ea", "--out", "{out}", "--no-track",
                                                             *sets(TINY)), "{out}", f"{FOREIGN} (notes.txt)",
         mine("out/notes.txt")),  # refused before the runs are trained: {tmp}/ea is not written
    Case("loss", "evaluate-out-is-a-file", ("evaluate", "--stage-dir", "{run}/stage_2", "--out", "{tmp}/file",
                                            *sets(TINY)), "{tmp}/file", "exists and is not a folder",
         lambda w: w.write("file", "x")),
    Case("loss", "restart-out-holds-user-files", train(extra=("--restart-if-changed",)), "{out}",
         f"{FOREIGN} (history.csv, metrics.json)", mine("out/metrics.json", "out/history.csv")),
    Case("loss", "restart-run-with-a-user-file", RESTART, "{run}", f"{FOREIGN} (notes.txt)", mine("run/notes.txt")),
    Case("loss", "restart-run-with-a-user-file-in-a-stage", RESTART, "{run}", f"{FOREIGN} (stage_2/plot.png)",
         mine("run/stage_2/plot.png")),
    Case("loss", "restart-run-with-a-user-folder", RESTART, "{run}", f"{FOREIGN} (mine/)", mine("run/mine/a.txt")),
    Case("loss", "restart-run-whose-stage-lost-its-manifest", RESTART, "{run}", f"{FOREIGN} (stage_1/history.csv",
         lambda w: (w.run / "stage_1" / ".colam-files").unlink()),
    Case("loss", "restart-run-beside-a-user-folder-named-as-colam-deletes", RESTART, "{run}",
         "where it is moved to be deleted, holds what colam did not write", mine(".run.deleting.tmp/mine.txt")),
    Case("loss", "resume-run-with-a-user-file", RESUME, "{run}", f"{FOREIGN} (notes.txt)", mine("run/notes.txt")),
    Case("loss", "resume-run-without-its-manifest", RESUME, "{run}", f"{FOREIGN} (.provenance.json",
         lambda w: (w.run / ".colam-files").unlink()),
    Case("loss", "manifest-is-a-fifo", RESUME, "{run}/.colam-files", "not a regular file",
         lambda w: w.fifo("run/.colam-files")),
    Case("loss", "manifest-is-a-folder", RESUME, "{run}/.colam-files", "is a folder",
         lambda w: w.folder_at("run/.colam-files")),
    Case("loss", "manifest-too-large", RESUME, "{run}/.colam-files", "more than the 1,048,576",
         lambda w: w.write("run/.colam-files", "x" * (1 << 21))),
    Case("loss", "manifest-not-text", RESUME, "{run}/.colam-files", "cannot read",
         lambda w: w.write("run/.colam-files", b"\xff\xfe\x00\x81")),
    *(Case("loss", f"stage-out-holds-{tag}", STAGE_1, "{out}/stage_1", f"{FOREIGN} ({name})",
           mine(f"out/stage_1/{name}")) for tag, name in [("npy", "mine.npy"), ("pt", "mine.pt"),
                                                           ("notes", "notes.txt")]),
    Case("loss", "stage-2-into-a-user-folder", train(extra=("--stage", "2")), "{out}/stage_2",
         f"{FOREIGN} (notes.txt)", lambda w: (chain(w), mine("out/stage_2/notes.txt")(w))),
    Case("loss", "stage-1-of-another-run-with-a-user-file", train("seed=1", extra=("--stage", "1")), "{out}/stage_1",
         f"{FOREIGN} (notes.txt)", lambda w: (chain(w), mine("out/stage_1/notes.txt")(w))),
    *(Case("loss", f"evaluate-out-holds-{tag}", EVALUATE, "{out}", f"{FOREIGN} ({name})", mine(f"out/{name}"))
      for tag, name in [("metrics", "metrics.json"), ("predictions", "predictions.csv"), ("history", "history.csv"),
                        ("a-folder", "figures/")]),
    *(Case("loss", f"prepare-out-holds-{tag}", PREPARE, "{out}", f"{FOREIGN} ({name})", mine(f"out/{name}"))
      for tag, name in [("split-json", "split.json"), ("split-npz", "split.npz"), ("notes", "notes.txt")]),
    Case("loss", "prepare-into-a-split-with-a-user-file", ("prepare", "--out", "{split}", *sets(TINY)), "{split}",
         f"{FOREIGN} (notes.txt)", mine("split/notes.txt")),
    *(Case("loss", f"analysis-out-holds-{tag}", CURVES, "{out}", f"{FOREIGN} ({name})", mine(f"out/{name}"))
      for tag, name in [("table", "table.md"), ("results", "results.json"), ("figure", "curves.png")]),
    Case("loss", "data-get-over-a-user-file", DATA_GET, "{out}/digits.json", "not written by colam and is not "
         "overwritten", mine("out/digits.json")),
    # a folder of colam's of another kind (its manifest says which) is no --out of this command
    *(Case("loss", f"{command}-into-{tag}", argv, out, f"another kind of colam output ({held}, not {wanted})", setup)
      for command, argv, wanted, tag, out, held, setup in [
          ("train", train(out="{split}"), "training run", "the-split", "{split}", "split", None),
          ("stage", train(out="{split}", extra=("--stage", "1")), "folder of stages", "the-split", "{split}", "split",
           None),
          ("evaluate", evaluate(), "evaluation", "an-analysis", "{out}", "analysis", manifest_of("out", "analysis")),
          ("evaluate", ("evaluate", "--stage-dir", "{run}/stage_2", "--out", "{split}", *sets(TINY)), "evaluation",
           "the-split", "{split}", "split", None),
          ("prepare", ("prepare", "--out", "{run}", *sets(TINY)), "split", "the-run", "{run}", "training run", None),
          ("analysis", ("analyze", "curves", "--run", "{run}", "--out", "{run}", "--no-track", *sets(TINY)),
           "analysis", "the-run", "{run}", "training run", None),
          ("data-get", ("data", "get", "--from", "bundled", "--out", "{run}", *sets(TINY)), "data set", "the-run",
           "{run}", "training run", None),
          ("train", train(), "training run", "an-evaluation", "{out}", "evaluation", manifest_of("out", "evaluation")),
          ("train", train(), "training run", "an-estimate", "{out}", "soft-label estimate",
           manifest_of("out", "soft-label estimate")),
          ("train", train(), "training run", "a-comparison", "{out}", "comparison", manifest_of("out", "comparison")),
      ]),
]


CASES = CONFIG + DATA + ARTIFACTS + BOUNDS + CLI + LOSS


def test_the_table_covers_every_kind_of_misuse():
    kinds = [case.kind for case in CASES]
    assert len(CASES) >= 200 and len({f"{case.kind}-{case.id}" for case in CASES}) == len(CASES)
    every = ("config", "data", "artifact", "bounds", "cli", "loss")
    assert {kind: kinds.count(kind) >= 10 for kind in every} == dict.fromkeys(every, True)


# ----------------------------------------------------------------------------- the earlier run


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """A finished tiny `colam train` run (run/) and a `colam prepare` split (split/)."""
    root = tmp_path_factory.mktemp("earlier")
    assert main(["train", "--out", str(root / "run"), *sets(TINY)]) == 0
    assert main(["prepare", "--out", str(root / "split"), *sets(TINY)]) == 0
    return root


def prepared_world(case: Case, earlier: Path, tmp: Path) -> World:
    world = World(tmp)
    shutil.copytree(earlier / "run", world.run)  # copy2: contents and mtimes
    shutil.copytree(earlier / "split", world.split)
    if case.setup is not None:
        case.setup(world)
    return world


def run_in_process(argv: list[str], capsys) -> tuple[object, str]:
    capsys.readouterr()
    try:
        status = main(argv)
    except BaseException as exc:  # noqa: BLE001 - a traceback is what the table checks against
        status = f"raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.kind}-{c.id}", marks=[pytest.mark.xfail(
    strict=True, reason=c.fails)] if c.fails else []) for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_it_and_touches_nothing(case, earlier, tmp_path, capsys, monkeypatch):
    world = prepared_world(case, earlier, tmp_path)
    argv = [world.fill(a) for a in case.argv]
    for name, value in case.env:
        monkeypatch.setenv(name, world.fill(value))
    before = snapshot(tmp_path)

    status, err = run_in_process(argv, capsys)

    lines = err.splitlines()
    assert status == 2, f"exit {status!r}; stderr: {err[-600:]!r}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {err[-600:]!r}"
    line = lines[0]
    assert line.startswith("colam: error: "), line
    assert world.fill(case.names) in line, f"does not name {world.fill(case.names)!r}: {line}"
    assert case.says in line, f"does not say {case.says!r}: {line}"
    assert not case.hides or case.hides not in err, f"shows {case.hides!r}: {line}"
    after = snapshot(tmp_path)
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(set(after) - set(before) - set(case.leaves))
    assert not changed, f"changed or removed: {changed}"
    assert not added, f"written: {added}"


# ----------------------------------------------------------------------------- real processes


REAL = ["config-unknown-key", "data-corrupt-image-in-a-worker", "artifact-resume-truncated-checkpoint"]


def test_representative_cases_in_a_real_process(earlier, tmp_path):
    by_id = {f"{c.kind}-{c.id}": c for c in CASES}
    for name in REAL:
        case = by_id[name]
        world = prepared_world(case, earlier, tmp_path / name)
        result = subprocess.run([sys.executable, "-m", "pipelines.cli", *(world.fill(a) for a in case.argv)],
                                capture_output=True, text=True, cwd=REPO, timeout=300,
                                env={**os.environ, "MLFLOW_TRACKING_URI": ""})
        lines = result.stderr.splitlines()
        assert result.returncode == 2, (name, result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("colam: error: "), (name, result.stderr[-2000:])
        assert case.says in lines[0], (name, lines[0])
