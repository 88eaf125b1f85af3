"""Knowledge distillation (kd): Hinton et al.'s loss from a finished run or a soft-label matrix, a frozen
teacher, refusals naming method.kd.teacher, and exact resuming."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from colam.config import load_config
from colam.data import loader
from colam.engine import fit, prepare
from colam.errors import ColamError
from colam.methods.kd import Distillation
from colam.models import build_model
from tests.conftest import TINY
from tests.test_engine import Interrupt, read_history


def config(*overrides):
    return load_config(None, TINY + ["method.name=kd", *overrides])


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finished COLAM run of a wider small CNN (width 16): a network teacher and a soft_labels.npy."""
    out = tmp_path_factory.mktemp("teacher")
    fit(load_config(None, TINY + ["model.options={width: 16}"]), out, progress=False)
    return out


def teacher_network(run, stage_file="model.pt"):
    """The teacher rebuilt by hand, independently of colam.methods.kd."""
    model = build_model("small_cnn", 10, in_channels=1, width=16)
    model.load_state_dict(torch.load(run / "stage_2" / stage_file, weights_only=True))
    return model.eval()


def first_batch(p):
    images, targets, indices = next(iter(loader(p.data.train, 16, shuffle=True, num_workers=0, seed=0)))
    return images, targets, indices


def hand_loss(logits, targets, teacher_probs, alpha, T):
    """(1 - alpha) CE + alpha T^2 KL(p_t || softmax(z/T)), written out term by term."""
    n = len(targets)
    ce = -sum(torch.log(torch.exp(logits[i]) / torch.exp(logits[i]).sum())[targets[i]] for i in range(n)) / n
    student = torch.exp(logits / T) / torch.exp(logits / T).sum(1, keepdim=True)
    kl = sum(sum(teacher_probs[i, j] * (torch.log(teacher_probs[i, j]) - torch.log(student[i, j]))
                 for j in range(logits.shape[1]) if teacher_probs[i, j] > 0) for i in range(n)) / n
    return (1 - alpha) * ce + alpha * T**2 * kl


def test_loss_is_hintons_formula_with_a_run_teacher_of_another_width(teacher_run):
    p = prepare(config(f"method.kd.teacher={teacher_run}", "method.kd.temperature=3", "method.kd.alpha=0.7"))
    assert isinstance(p.method, Distillation) and p.model.fc.in_features == 32  # student width 8, teacher 16
    images, targets, indices = first_batch(p)
    p.model.train()
    loss, logits = p.method.forward_loss(p.model, images, targets, indices, 1)
    with torch.no_grad():
        probs = (teacher_network(teacher_run)(images) / 3).softmax(1)  # the teacher softened at T = 3
    expected = hand_loss(logits.double(), targets, probs.double(), 0.7, 3.0)
    assert torch.allclose(loss.double(), expected, atol=1e-5)
    assert torch.allclose(p.method.teacher_probs(images, targets), probs, atol=1e-6)
    loss.backward()  # the student gets a gradient, the teacher none
    assert p.model.fc.weight.grad is not None
    assert all(not q.requires_grad and q.grad is None for q in p.method.teacher.parameters())


def test_loss_with_a_soft_label_file_uses_row_y_without_resoftening(teacher_run):
    labels = np.load(teacher_run / "stage_2" / "soft_labels.npy")
    p = prepare(config(f"method.kd.teacher={teacher_run / 'stage_2' / 'soft_labels.npy'}", "method.kd.temperature=2",
                       "method.kd.alpha=0.5"))
    assert p.method.teacher is None
    images, targets, indices = first_batch(p)
    p.model.train()
    loss, logits = p.method.forward_loss(p.model, images, targets, indices, 1)
    probs = torch.from_numpy(labels)[targets]  # row y as it is, not softmax(log(row) / T)
    assert torch.equal(p.method.teacher_probs(images, targets), probs)
    assert torch.allclose(loss.double(), hand_loss(logits.double(), targets, probs.double(), 0.5, 2.0), atol=1e-5)


@pytest.mark.parametrize("kind", ["run", "labels"])
def test_alpha_zero_is_cross_entropy(teacher_run, kind):
    teacher = teacher_run if kind == "run" else teacher_run / "stage_2" / "soft_labels.npy"
    p = prepare(config(f"method.kd.teacher={teacher}", "method.kd.alpha=0"))
    images, targets, indices = first_batch(p)
    loss, logits = p.method.forward_loss(p.model, images, targets, indices, 1)
    assert torch.equal(loss, F.cross_entropy(logits, targets))


def test_alpha_one_and_a_one_hot_matrix_is_t_squared_times_cross_entropy_of_the_softened_student(tmp_path):
    np.save(tmp_path / "one_hot.npy", np.eye(10, dtype=np.float32))
    p = prepare(config(f"method.kd.teacher={tmp_path / 'one_hot.npy'}", "method.kd.alpha=1",
                       "method.kd.temperature=2"))
    images, targets, indices = first_batch(p)
    loss, logits = p.method.forward_loss(p.model, images, targets, indices, 1)
    assert torch.allclose(loss, 4 * F.cross_entropy(logits / 2, targets), atol=1e-6)  # KL(onehot || q) = -log q_y


def test_the_teacher_never_changes_during_training(teacher_run, tmp_path, monkeypatch):
    """A fit of a width-8 student from the width-16 teacher: the teacher's weights and BatchNorm
    statistics are those of its file after training, and none of them is in the optimizer."""
    seen = {}
    original_stage_start, original_forward = Distillation.stage_start, Distillation.forward_loss

    def stage_start(self, stage, model, optimizer):
        seen.update(method=self, optimizer=optimizer)
        return original_stage_start(self, stage, model, optimizer)

    def forward_loss(self, *args):
        assert not self.teacher.training
        return original_forward(self, *args)

    monkeypatch.setattr(Distillation, "stage_start", stage_start)
    monkeypatch.setattr(Distillation, "forward_loss", forward_loss)
    weights = (teacher_run / "stage_2" / "model.pt").read_bytes()
    metrics = fit(config(f"method.kd.teacher={teacher_run}"), tmp_path, progress=False)
    assert metrics["method"] == "kd" and metrics["method_params"]["teacher"] == str(teacher_run)
    assert (teacher_run / "stage_2" / "model.pt").read_bytes() == weights
    saved = torch.load(teacher_run / "stage_2" / "model.pt", weights_only=True)
    after = seen["method"].teacher.state_dict()
    assert saved.keys() == after.keys() and all(torch.equal(saved[k], after[k]) for k in saved)
    in_optimizer = {id(q) for group in seen["optimizer"].param_groups for q in group["params"]}
    assert not in_optimizer & {id(q) for q in seen["method"].teacher.parameters()}
    student = torch.load(tmp_path / "stage_1" / "model.pt", weights_only=True)
    assert student["fc.weight"].shape == (10, 32)  # model.pt is the student alone
    assert not (tmp_path / "stage_1" / "soft_labels.npy").exists()


def test_an_exported_network_is_preferred_to_model_pt(teacher_run, tmp_path):
    run = tmp_path / "teacher"
    shutil.copytree(teacher_run, run)
    torch.save(teacher_network(teacher_run).state_dict(), run / "stage_2" / "export.pt")
    wrong = build_model("small_cnn", 10, in_channels=1, width=16)
    torch.save(wrong.state_dict(), run / "stage_2" / "model.pt")  # other weights: must not be used
    p = prepare(config(f"method.kd.teacher={run}"))
    images, targets, _ = first_batch(p)
    with torch.no_grad():
        expected = (teacher_network(teacher_run)(images) / 4).softmax(1)
    assert torch.allclose(p.method.teacher_probs(images, targets), expected, atol=1e-6)


def test_the_teacher_follows_the_students_device(teacher_run):
    p = prepare(config(f"method.kd.teacher={teacher_run}"))
    p.method.to(torch.device("meta"))  # any device: the teacher moves with the method
    assert all(q.device.type == "meta" for q in p.method.teacher.parameters())
    q = prepare(config(f"method.kd.teacher={teacher_run / 'stage_2' / 'soft_labels.npy'}"))
    assert q.method.to(torch.device("meta")).teacher_labels.device.type == "meta"


def unfinished(run, tmp_path):
    copy = tmp_path / "unfinished"
    shutil.copytree(run, copy)
    (copy / "stage_2" / "model.pt").unlink()  # interrupted in its last stage
    return copy


def other_classes(run, tmp_path):
    copy = tmp_path / "five_classes"
    (copy / "stage_2").mkdir(parents=True)
    shutil.copy(run / "config.yaml", copy / "config.yaml")
    torch.save(build_model("small_cnn", 5, in_channels=1, width=16).state_dict(), copy / "stage_2" / "model.pt")
    return copy


def other_model(run, tmp_path):
    copy = tmp_path / "other_model"
    shutil.copytree(run, copy)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["options"] = {"width": 4}  # the config does not describe the weights
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    return copy


def matrix(array):
    def write(run, tmp_path):
        np.save(tmp_path / "labels.npy", array)
        return tmp_path / "labels.npy"
    return write


NAN = np.full((10, 10), 0.1)
NAN[3, 4] = np.nan


@pytest.mark.parametrize("make, message", [
    (lambda run, tmp: tmp / "missing", "does not exist"),
    (lambda run, tmp: tmp, "is not a finished run folder \\(it holds no config.yaml\\)"),
    (unfinished, "is not a finished run: its last stage .*stage_2' holds no model.pt"),
    (lambda run, tmp: run / "stage_2" / "model.pt", "is a file but not a .npy soft-label matrix"),
    (other_classes, "classifies 5 classes, this data has 10"),
    (other_model, "does not fit a small_cnn \\{'width': 4\\} for 10 classes and 1 input channel"),
    (matrix(np.full((3, 3), 1 / 3)), "has shape \\(3, 3\\), this data's 10 classes need \\(10, 10\\)"),
    (matrix(np.full((10, 9), 1 / 9)), "has shape \\(10, 9\\)"),
    (matrix(NAN), "contains NaN or infinite values"),
    (matrix(np.full((10, 10), 0.2)), "rows must sum to 1"),
    (matrix(np.eye(10) * 2 - 0.1), "contains negative probabilities"),  # rows sum to 1
    (matrix(np.array(["a"] * 100).reshape(10, 10)), "values, not probabilities"),
], ids=["missing", "not-a-run", "unfinished", "other-file", "other-classes", "other-model", "3x3", "10x9", "nan",
        "row-sums", "negative", "strings"])
def test_bad_teachers_are_refused_in_one_line_naming_the_key(teacher_run, tmp_path, make, message):
    teacher = make(teacher_run, tmp_path)
    with pytest.raises(ColamError, match="^method\\.kd\\.teacher: .*" + message) as error:
        fit(config(f"method.kd.teacher={teacher}"), tmp_path / "out", progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("overrides, message", [
    ([], "^method\\.kd\\.teacher: required: a finished run folder or a C x C soft_labels.npy to distil from, got ''$"),
    (["method.kd.teacher=x", "method.kd.temperature=0"], "^method\\.kd\\.temperature: must be > 0"),
    (["method.kd.teacher=x", "method.kd.alpha=1.5"], "^method\\.kd\\.alpha: must be in \\[0, 1\\]"),
])
def test_invalid_settings_name_the_key(overrides, message):
    with pytest.raises(ColamError, match=message):
        config(*overrides)


def test_interrupted_run_resumes_to_the_same_result(teacher_run, tmp_path):
    run = config(f"method.kd.teacher={teacher_run}")
    reference = fit(run, tmp_path / "reference", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(run, tmp_path / "resumed", run_log=Interrupt(3), progress=False)
    resumed = fit(run, tmp_path / "resumed", progress=False)
    assert read_history(tmp_path / "resumed") == read_history(tmp_path / "reference")
    assert resumed["test_acc"] == reference["test_acc"]
    final = torch.load(tmp_path / "resumed" / "stage_1" / "model.pt", weights_only=True)
    expected = torch.load(tmp_path / "reference" / "stage_1" / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_resuming_refuses_a_teacher_that_changed(teacher_run, tmp_path):
    labels = tmp_path / "soft_labels.npy"
    shutil.copy(teacher_run / "stage_2" / "soft_labels.npy", labels)
    run = config(f"method.kd.teacher={labels}")
    with pytest.raises(KeyboardInterrupt):
        fit(run, tmp_path / "out", run_log=Interrupt(1), progress=False)
    np.save(labels, np.full((10, 10), 0.1, dtype=np.float32))
    with pytest.raises(ColamError, match="^method\\.kd\\.teacher: .* changed since this run was checkpointed"):
        fit(run, tmp_path / "out", progress=False)
