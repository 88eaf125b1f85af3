"""The `colam` console script: listings, a real run, and bad input (exit 2, one line, nothing written)."""

import json
import os
import subprocess
import sys

import pytest

from colam.methods import METHODS
from colam.models import list_models
from pipelines.cli import main
from tests.conftest import TINY


def run_cli(*args):
    """The `colam` command in a process of its own, untracked (MLFLOW_TRACKING_URI unset)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, env=env)


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(METHODS)


def test_models_lists_every_model_with_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert sorted(names) == sorted(list_models())
    row = next(line for line in out.splitlines() if line.startswith("resnet56 "))
    assert "853,018" in row and "858,868" in row  # 10 and 100 classes


def test_train_writes_metrics_and_stage_folders(tmp_path):
    overrides = [a for item in TINY for a in ("--set", item)]
    result = run_cli("train", "--out", str(tmp_path / "run"), *overrides)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert json.loads(result.stdout.splitlines()[-1]) == metrics
    for stage in (1, 2):
        for name in ("model.pt", "soft_labels.npy", "soft_labels.json", "metrics.json"):
            assert (tmp_path / "run" / f"stage_{stage}" / name).exists()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["method.name=xyz"], "method.name"),
        (["method.colam.tempreture=2"], "method.colam.tempreture"),
        (["method.colam.temperature=0"], "method.colam.temperature"),
        (["method.colam.temperature=-1"], "method.colam.temperature"),
        (["train.epochs=5"], "method.colam.stages"),
        (["method.colam.peers=0"], "method.colam.peers"),
        (["method.colam.peers=1000"], "method.colam.peers"),
        (["data.name=cifar10", "data.root=/nonexistent/cifar"], "data.root"),
        (["data.name=imagenet"], "data.name"),
        (["model.name=vgg"], "model.name"),
        (["model.options={depth: 3}"], "model.options.depth"),
        (["train.lr=fast"], "train.lr"),
        (["train.lr=1" + "0" * 400], "train.lr"),
        (["train.device=cudax"], "train.device"),
        (["train.device=cuda:7"], "train.device"),
        (["seed=-1"], "seed"),
        (["seed=18446744073709551616"], "seed"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, overrides, key):
    out = tmp_path / "run"
    args = ["train", "--out", str(out)] + [a for item in TINY + overrides for a in ("--set", item)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"colam: error: {key}"), err
    assert not out.exists()


def test_bad_input_has_no_traceback_in_a_real_process(tmp_path):
    result = run_cli("train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"colam: error: --config: file '{tmp_path / 'nope.yaml'}' does not exist"


def test_exponent_floats_are_read_as_numbers(tmp_path):
    from colam.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 1e-3, weight_decay: 5e-4}\n")
    config = load_config(path)
    assert config.train.lr == 0.001 and config.train.weight_decay == 0.0005


def test_out_that_is_a_file_and_unreadable_config_are_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    args = [a for item in TINY for a in ("--set", item)]
    assert main(["train", "--out", str(target), *args]) == 2
    assert capsys.readouterr().err.startswith(f"colam: error: --out: '{target}' exists and is not a folder")
    assert target.read_text() == "keep me"
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert main(["train", "--config", str(binary), "--out", str(tmp_path / "run")]) == 2
    assert "--config: cannot read" in capsys.readouterr().err


def test_one_command_and_no_argparse_internals():
    """`colam` is pipelines.cli alone: the library has no command line of its own."""
    import importlib.util
    from pathlib import Path

    assert importlib.util.find_spec("colam.cli") is None and importlib.util.find_spec("colam.__main__") is None
    root = Path(__file__).resolve().parent.parent
    for path in [*root.joinpath("colam").rglob("*.py"), *root.joinpath("pipelines").rglob("*.py")]:
        text = path.read_text()
        assert "_SubParsersAction" not in text and "._actions" not in text and ".choices[" not in text, path
