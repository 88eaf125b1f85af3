"""Safe loading (issue 8): a file the project loads never runs code, and no credential is tracked.

A checkpoint crafted to run code when it is unpickled is put at every place colam loads a
checkpoint from (a run's checkpoint.pt, a stage's state.pt, model.pt and .partial.pt, a stage
folder to evaluate, a KD teacher run, a pipeline step's checkpoint). Each is refused with exit
status 2 and one line naming the file, and the code does not run: the marker file it would
create stays absent. The same file loaded the unsafe way does create it, so the check can fail.

Two scans of the tracked files back this up: no loader that can unpickle code (torch.load
without weights_only=True, pickle, yaml.load, np.load with allow_pickle=True), and no key-like
string (AWS keys, private keys, tokens, secret assignments) beyond the known placeholders.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from colam import steps
from colam.config import load_config
from colam.run_folder import PARTIAL, PROVENANCE
from colam.errors import ColamError
from pipelines.cli import main
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]


def sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


class RunsCode:
    """Unpickled, it calls exec: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('the checkpoint ran code')",)


def plant(path: Path, marker: Path) -> None:
    """Replace `path` with a checkpoint that runs code on unpickling (a dict, as a real one is)."""
    torch.save({"epoch": 1, "model": RunsCode(marker)}, path)


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """A finished tiny run (run/) and a stage-by-stage run with its first stage done (chain/)."""
    root = tmp_path_factory.mktemp("earlier")
    assert main(["train", "--out", str(root / "run"), *sets(TINY)]) == 0
    assert main(["train", "--stage", "1", "--out", str(root / "chain"), *sets(TINY)]) == 0
    return root


def test_the_crafted_checkpoint_runs_code_when_loaded_unsafely(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "evil.pt", marker)
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.read_text() == "the checkpoint ran code"


def _partial(w: Path, marker: Path) -> None:
    """chain/stage_1 as if killed mid-stage: provenance says incomplete, .partial.pt is the crafted file."""
    folder = w / "chain" / "stage_1"
    record = json.loads((folder / PROVENANCE).read_text())
    (folder / PROVENANCE).write_text(json.dumps({**record, "complete": False}))
    plant(folder / PARTIAL, marker)


# (id, the file replaced by the crafted one, the command line); paths relative to the test's folder
LOAD_POINTS = [
    ("resume-checkpoint", "run/checkpoint.pt", ["train", "--out", "{w}/run", *sets(TINY)]),
    ("stage-state", "chain/stage_1/state.pt", ["train", "--stage", "2", "--out", "{w}/chain", *sets(TINY)]),
    ("stage-model", "chain/stage_1/model.pt", ["train", "--stage", "2", "--out", "{w}/chain", *sets(TINY)]),
    ("stage-partial", "chain/stage_1/.partial.pt", ["train", "--stage", "1", "--out", "{w}/chain", *sets(TINY)]),
    ("evaluate-model", "run/stage_2/model.pt",
     ["evaluate", "--stage-dir", "{w}/run/stage_2", "--out", "{w}/eval", *sets(TINY)]),
    ("evaluate-state", "run/stage_2/state.pt",
     ["evaluate", "--stage-dir", "{w}/run/stage_2", "--out", "{w}/eval", *sets(TINY)]),
    ("kd-teacher-run", "run/stage_2/model.pt",
     ["train", "--out", "{w}/student", *sets(TINY), "--set", "method.name=kd", "--set", "method.kd.teacher={w}/run"]),
]


@pytest.mark.parametrize("name, planted, argv", LOAD_POINTS, ids=[p[0] for p in LOAD_POINTS])
def test_a_checkpoint_that_runs_code_is_refused_at_every_load_point(earlier, tmp_path, capsys, name, planted, argv):
    w = tmp_path / "w"
    shutil.copytree(earlier, w)
    marker = tmp_path / "ran"
    if name == "stage-partial":
        _partial(w, marker)
    else:
        plant(w / planted, marker)
    capsys.readouterr()

    status = main([a.replace("{w}", str(w)) for a in argv])

    err = capsys.readouterr().err
    assert status == 2, err
    assert not marker.exists(), "the crafted checkpoint ran code"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("colam: error: "), err
    assert str(w / planted) in lines[0] and "not a readable checkpoint" in lines[0], lines[0]


@pytest.mark.parametrize("step", [1, 2])
def test_a_pipeline_step_refuses_a_checkpoint_that_runs_code(earlier, tmp_path, step):
    """The Kubeflow components' library calls: the estimate step (step 1's checkpoint) and the
    training step that starts from it (step 2)."""
    config = load_config(None, TINY)
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(earlier / "chain" / "stage_1", checkpoint)
    marker = tmp_path / "ran"
    plant(checkpoint / "state.pt", marker)
    with pytest.raises(ColamError, match="not a readable checkpoint"):
        if step == 1:
            steps.estimate_step(config, 1, 2, checkpoint, tmp_path / "estimate")
        else:
            steps.train_step(config, 2, 2, tmp_path / "out", checkpoint=checkpoint, soft_labels=tmp_path / "none")
    assert not marker.exists()


# ----------------------------------------------------------------------------- scans of the tracked files


def tracked(*patterns: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", "--", *patterns], cwd=REPO, capture_output=True, check=True)
    return [REPO / name for name in listed.stdout.decode().split("\0") if name and (REPO / name).is_file()]


def _keyword(call: ast.Call, name: str):
    found = [k.value for k in call.keywords if k.arg == name]
    return found[0].value if found and isinstance(found[0], ast.Constant) else (None if not found else "?")


def unsafe_loads(source: str) -> list[str]:
    """The calls in `source` that can unpickle code from a file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        call = f"{owner}.{node.func.attr}"
        if call == "torch.load" and _keyword(node, "weights_only") is not True:
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif owner in ("pickle", "cPickle", "dill", "joblib") and node.func.attr in ("load", "loads"):
            found.append(f"line {node.lineno}: {call}")
        elif call in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"line {node.lineno}: {call}")
        elif node.func.attr == "load" and _keyword(node, "allow_pickle") is True:
            found.append(f"line {node.lineno}: {call} with allow_pickle=True")
    return found


def test_the_scan_finds_each_unsafe_loader():
    source = ("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)\nyaml.load(t)\n"
              "np.load(p, allow_pickle=True)\ntorch.load(p, weights_only=True)\nyaml.safe_load(t)\nnp.load(p)\n"
              "np.save(p, a, allow_pickle=True)\n")  # writing a pickled file (a bad input of a test) loads nothing
    assert len(unsafe_loads(source)) == 5


def test_no_tracked_code_loads_files_in_a_way_that_can_run_code():
    me = Path(__file__).resolve()
    found = {str(p.relative_to(REPO)): hits for p in tracked("*.py") if p != me
             and (hits := unsafe_loads(p.read_text(encoding="utf-8")))}
    assert found == {}


# Key-like strings: AWS access key ids, private keys, GitHub/GitLab/Slack tokens, and a secret,
# password or token assigned a literal value.
KEY_LIKE = [
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b")),
    ("private key", re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
    ("GitLab token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}\b")),
    ("Slack token", re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}\b")),
    ("secret assigned", re.compile(
        r"(?i)\b[\w.-]*(?:secret|password|passwd|token|api_?key)[\w.-]*\s*[:=]\s*['\"]?([A-Za-z0-9/+_=.-]{8,})")),
]
# What the tracked files may assign: placeholders and the names of variables, never a value.
PLACEHOLDERS = {"change-me", "not-the-secret", "automountServiceAccountToken"}


def key_like(text: str) -> list[str]:
    found = []
    for kind, pattern in KEY_LIKE:
        for match in pattern.finditer(text):
            value = match.group(1) if pattern.groups else match.group(0)
            if kind == "secret assigned" and (value in PLACEHOLDERS or not re.search(r"\d", value)
                                              or re.fullmatch(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", value)):
                continue  # a word, a setting's name or an attribute (s3.secret_key) is no key; a key has digits
            found.append(f"{kind}: {match.group(0)[:40]}")
    return found


def test_the_scan_finds_each_kind_of_key():
    planted = ["AKIA" + "ABCDEFGHIJ234567", "-----BEGIN RSA " + "PRIVATE KEY-----", "ghp_" + "a1" * 18,
               "glpat-" + "x1" * 10, "xoxb-" + "1234567890ab", "aws_secret_access_key = " + "'wJal7rXUtnFEMI/K7MDENG'"]
    assert [len(key_like(text)) for text in planted] == [1] * len(planted)
    assert key_like("AWS_SECRET_ACCESS_KEY=change-me\nsecret_key = secrets.token_urlsafe(30)\n"
                    "client(secret_key=s3_server.secret_key)\n") == []


def test_no_tracked_file_holds_a_key():
    found = {}
    for path in tracked():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (images, archives): no keys are written there by hand
        if hits := key_like(text):
            found[str(path.relative_to(REPO))] = hits
    assert found == {}
