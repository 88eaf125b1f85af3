"""A real data set versioned by DVC: Fashion-MNIST from Debian's package through the pipeline's `data`
stage into data/raw/fashion_mnist, what re-runs when that copy or its source changes, and `dvc pull`
from S3 restoring it byte for byte. Skipped where dataset-fashion-mnist is not installed (CI installs it)."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid

import pytest

from colam.idx_datasets import CONTENT
from tests.test_dvc_pipeline import _ran, scratch_repo
from tests.test_idx_datasets import DEBIAN_FASHION, needs_debian_fashion

pytestmark = needs_debian_fashion

RAW = "data/raw/fashion_mnist"
IMAGES = f"{RAW}/FashionMNIST/raw/train-images-idx3-ubyte"
CHAIN = ["check", "data", "prepare"] + [f"train@stage_{k}" for k in range(1, 5)] + ["evaluate"]
TINY_FASHION = {
    "data": {"name": "fashion_mnist", "root": RAW, "train_subset": 200},
    "model": {"name": "small_cnn", "options": {"width": 8}},
    "train": {"epochs": 4, "batch_size": 32, "lr": 0.05},
    "method": {"colam": {"stages": 4, "epochs_per_stage": 1, "temperature": 1.0}},
    "compare": {"baselines": ["hl", "ls"], "temperatures": [1.0], "seeds": [0]},
    "analysis": {"grid": {"epochs_per_stage": [1], "peers": ["all"]}},
    "raw_data": {"source": str(DEBIAN_FASHION)},
    "tracking": {"experiment": "fashion-test"},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = scratch_repo(tmp_path_factory.mktemp("fashion"), TINY_FASHION)
    repo.first = repo.dvc("repro", "evaluate")
    return repo


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_the_data_stage_keeps_the_release_files_and_every_stage_reads_them(repo):
    assert _ran(repo.first.stdout) == CHAIN
    copied = {p.name: _md5(p) for p in (repo.path / RAW / "FashionMNIST" / "raw").iterdir()
              if p.name != ".colam-files"}  # colam's manifest of what it wrote there
    assert copied == {f: digest for f, (digest, _) in CONTENT["fashion_mnist"].items()}
    split = json.loads((repo.path / "data/prepared/split.json").read_text())
    assert split["raw_train_samples"] == 60_000 and split["classes"][0] == "T-shirt/top"
    lock = (repo.path / "dvc.lock").read_text()
    assert f"path: {RAW}" in lock  # versioned: an output of `data`, a dependency of what reads images
    assert repo.dvc("status", "evaluate").stdout.strip() == "Data and pipelines are up to date."


def test_a_corrupted_copy_is_restored_by_the_data_stage_alone(repo):
    path = repo.path / IMAGES
    before = path.read_bytes()
    path.write_bytes(before[:-1] + bytes([before[-1] ^ 0xFF]))  # one pixel of the last image
    assert "data" in json.loads(repo.dvc("status", "--json").stdout)
    assert _ran(repo.dvc("repro", "evaluate").stdout) == ["data"]  # the same bytes again: nothing after it
    assert path.read_bytes() == before


def test_the_same_files_from_another_source_re_run_nothing_downstream(repo, tmp_path):
    other = tmp_path / "torchvision-layout"
    shutil.copytree(repo.path / RAW, other)  # uncompressed, torchvision's layout: another source, same content
    params = repo.params()
    try:
        repo.write_params({**params, "raw_data": {"source": str(other)}})
        assert _ran(repo.dvc("repro", "evaluate").stdout) == ["check", "data"]
    finally:
        repo.write_params(params)
        repo.dvc("repro", "evaluate")


def test_a_source_with_other_content_stops_repro_in_one_line_and_keeps_every_file(repo, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(DEBIAN_FASHION, corrupt)
    (corrupt / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 20)
    kept = repo.hashes(RAW, "data/prepared", "runs/main")
    params = repo.params()
    try:
        repo.write_params({**params, "raw_data": {"source": str(corrupt)}})
        result = repo.dvc("repro", "evaluate", check=False)
        assert result.returncode != 0
        (line,) = [x for x in (result.stdout + result.stderr).splitlines() if x.startswith("colam: error:")]
        assert f"'{corrupt / 't10k-labels-idx1-ubyte.gz'}'" in line
        assert repo.hashes(RAW, "data/prepared", "runs/main") == kept
    finally:
        repo.write_params(params)
        repo.dvc("repro", "evaluate")


def test_dvc_pull_from_s3_restores_the_data_set_byte_for_byte(repo, s3_server):
    repo.dvc("remote", "modify", "--local", "storage", "url", f"s3://{s3_server.bucket}/dvc-{uuid.uuid4().hex[:8]}")
    before = repo.hashes(RAW)
    repo.dvc("push", "evaluate", "--with-deps", env=s3_server.env())
    shutil.rmtree(repo.path / ".dvc" / "cache")  # a fresh clone's state for the data set: neither copy nor cache
    shutil.rmtree(repo.path / "data" / "raw")
    repo.dvc("pull", "evaluate", "--with-deps", env=s3_server.env())
    assert repo.hashes(RAW) == before
    assert _ran(repo.dvc("repro", "evaluate").stdout) == []  # the pulled copy is the one everything was trained on


def test_the_documented_fashion_mnist_experiment_passes_the_gate():
    """`make run-fashion-mnist`: configs/fashion_mnist.yaml's settings plus the Makefile's pipeline
    settings, laid over params.yaml, are valid params for every stage (the gate, `colam check`)."""
    import re
    import shlex
    import subprocess
    import sys

    from pipelines.params import dvc_sets
    from tests.test_dvc_pipeline import ROOT

    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    pipeline = shlex.split(re.search(r"^FASHION_MNIST_PIPELINE := (.*)$", makefile, re.M).group(1)
                           .replace("$(FASHION_MNIST_SOURCE)", str(DEBIAN_FASHION)))
    settings = dvc_sets(ROOT / "configs/fashion_mnist.yaml") + pipeline
    assert settings[::2] == ["-S"] * (len(settings) // 2)
    command = [sys.executable, "-m", "pipelines.cli", "check", "--config", str(ROOT / "params.yaml")]
    for item in settings[1::2]:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
