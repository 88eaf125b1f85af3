"""Meta-learned soft labels (Vyas et al. 2020): the meta step against an independent computation,
the lookahead's hygiene, the instance-wise top-k store, the noise report, resuming, settings."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from colam.config import from_dict, load_config
from colam.engine import fit
from colam.errors import ColamError
from colam.methods import soft_cross_entropy
from colam.methods.meta import MetaLabels, TopKLabelStore, lookahead_meta_gradient, project_to_simplex
from colam.models import build_model
from tests.conftest import TINY
from tests.test_engine import Interrupt, read_history


def make(num_classes, train_targets, batch_size=8, lr=0.1, **section):
    config = from_dict({"method": {"name": "meta", "meta": section}, "train": {"batch_size": batch_size, "lr": lr}})
    MetaLabels.validate(config)
    return MetaLabels(config, num_classes, train_targets)


def held_out_loss_of_lookahead(weight, bias, labels, x_train, rows, x_held, y_held, lr):
    """The meta objective of a linear softmax model with the inner gradient written out by hand:
    d/dz H(t, softmax(z)) = softmax(z) * sum(t) - t, so theta' is an explicit function of the labels."""
    targets = labels[rows]
    probs = (x_train @ weight.T + bias).softmax(dim=1)
    dz = (probs * targets.sum(dim=1, keepdim=True) - targets) / len(x_train)
    weight_prime, bias_prime = weight - lr * dz.T @ x_train, bias - lr * dz.sum(dim=0)
    return F.cross_entropy(x_held @ weight_prime.T + bias_prime, y_held)


def test_meta_step_follows_the_meta_gradient_and_lowers_the_held_out_loss():
    C, D, lr, meta_lr = 4, 6, 0.5, 0.05
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, D, generator=generator)
    targets = torch.tensor([0, 1, 2, 0, 1, 3, 2, 0])  # training part [0, 1, 2, 0]: no class 3
    method = make(C, targets, init_smoothing=0.3, meta_lr=meta_lr, lookahead_lr=lr)  # smoothed: no row hits 0
    torch.manual_seed(1)
    model = nn.Linear(D, C)
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    before = method.class_labels.clone()

    # the meta-gradient from the hand-written lookahead, differentiated by torch.autograd
    labels = before.clone().requires_grad_(True)
    args = (images[:4], targets[:4], images[4:], targets[4:], lr)
    meta_loss = held_out_loss_of_lookahead(weight, bias, labels, *args)
    (expected_grad,) = torch.autograd.grad(meta_loss, labels)
    grad, loss = lookahead_meta_gradient(model, before, targets[:4], images[:4], images[4:], targets[4:], lr)
    assert torch.allclose(grad, expected_grad, atol=1e-6) and torch.allclose(loss, meta_loss.detach())
    assert expected_grad[3].abs().max() == 0 and expected_grad[:3].abs().min() > 0

    held_loss = method.meta_step(model, images, targets, torch.arange(8))
    after = method.class_labels
    assert torch.allclose(held_loss, meta_loss.detach())
    # a projected gradient step: -meta_lr times the meta-gradient's component along the simplex
    step = -meta_lr * (expected_grad - expected_grad.mean(dim=1, keepdim=True))
    assert torch.allclose(after - before, step, atol=1e-7) and (after - before).abs().max() > 1e-4
    assert torch.equal(after[3], before[3])  # a class absent from the training part keeps its label, bit for bit
    assert torch.allclose(after.sum(dim=1), torch.ones(C)) and (after >= 0).all()
    # the new labels make the lookahead model better on the held-out part
    assert held_out_loss_of_lookahead(weight, bias, after, *args) < meta_loss - 1e-6

    # step (3): the model's loss is on the updated labels
    method.class_labels = before.clone()
    loss, logits = method.forward_loss(model, images, targets, torch.arange(8), stage=1)
    assert torch.allclose(loss, soft_cross_entropy(images @ weight.T + bias, method.class_labels[targets]))
    assert not torch.equal(method.class_labels, before)


@pytest.mark.parametrize("labels", ["class", "instance"])
def test_lookahead_leaves_the_model_and_its_batchnorm_statistics_alone(labels):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=1, width=4).train()
    images, targets = torch.randn(12, 1, 8, 8), torch.arange(12) % 10
    for module in model.modules():  # running statistics that a stray update would visibly change
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.fill_(0.5)
    method = make(10, torch.arange(40) % 10, batch_size=12, labels=labels, meta_lr=50.0)
    indices = torch.arange(12) * 3
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    labels_before = method.batch_labels(targets, indices).clone()

    method.meta_step(model, images, targets, indices)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(param.grad is None for param in model.parameters())
    assert not torch.equal(method.batch_labels(targets, indices), labels_before)  # the labels did move

    # the whole training step updates the running statistics exactly as one plain forward does
    plain = copy.deepcopy(model)
    plain(images)
    method.forward_loss(model, images, targets, indices, stage=1)
    assert all(torch.equal(plain.state_dict()[name], tensor) for name, tensor in model.state_dict().items())


def test_simplex_projection():
    rows = torch.tensor([[0.5, 0.5, 0.0], [2.0, 0.0, -1.0], [0.2, 0.1, 0.1]])
    projected = project_to_simplex(rows)
    assert torch.allclose(projected, torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2 + 0.6 / 3, 0.1 + 0.2, 0.3]]))


def test_topk_store_rows_memory_and_round_trip():
    N, C, k = 7, 6, 3
    targets = torch.tensor([0, 5, 2, 3, 1, 4, 2])
    store = TopKLabelStore.from_targets(targets, C, k)
    assert store.values.shape == store.indices.shape == (N, k) and store.indices.dtype == torch.int16
    assert store.nbytes == N * k * (4 + 2)
    assert all(len(set(row.tolist())) == k for row in store.indices)  # exactly k distinct entries per row
    assert torch.allclose(store.values.sum(dim=1), torch.ones(N))
    assert torch.equal(store.gather(torch.arange(N)), F.one_hot(targets, C).float())
    assert torch.equal(store.argmax(), targets)

    smoothed = TopKLabelStore.from_targets(targets, C, C, smoothing=0.3)
    assert torch.allclose(smoothed.dense(), F.one_hot(targets, C) * 0.7 + 0.3 / C)

    rows = torch.tensor([4, 1])
    dense = torch.randn(2, C, generator=torch.Generator().manual_seed(0)).softmax(dim=1)
    untouched = store.gather(torch.tensor([0, 2, 3, 5, 6]))
    store.scatter(rows, dense)
    top, where = dense.topk(k, dim=1)
    expected = torch.zeros(2, C).scatter_(1, where, top / top.sum(dim=1, keepdim=True))
    assert torch.allclose(store.gather(rows), expected)
    assert torch.allclose(store.values.sum(dim=1), torch.ones(N))
    assert torch.equal(store.gather(torch.tensor([0, 2, 3, 5, 6])), untouched)
    everything = store.gather(torch.arange(N))
    store.scatter(torch.arange(N), everything)  # gather -> scatter: the same rows
    assert torch.equal(store.gather(torch.arange(N)), everything)

    wide = TopKLabelStore.from_targets(torch.tensor([40_000, 1]), 40_001, 4)  # C > 32768 needs int32 indices
    assert wide.indices.dtype == torch.int32 and wide.nbytes == 2 * 4 * (4 + 4)
    assert torch.equal(wide.argmax(), torch.tensor([40_000, 1]))


def test_noise_report_counts_corrected_labels():
    given, clean = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 2, 1, 2, 0])  # samples 3, 4, 5 noisy
    instance = make(3, given, labels="instance", top_k=3)
    instance.clean_train_targets = clean
    instance.store.scatter(torch.tensor([1, 3, 4, 5]), torch.tensor(
        [[0.1, 0.2, 0.7],    # clean sample 1 moved off its label
         [0.2, 0.7, 0.1],    # noisy 3: argmax is the clean class 1
         [0.1, 0.6, 0.3],    # noisy 4: still its noisy label 1
         [0.6, 0.1, 0.3]]))  # noisy 5: argmax is the clean class 0
    assert instance.stage_report(1) == {
        "noisy_labels": 3, "noisy_labels_corrected": 2, "noisy_labels_corrected_fraction": 2 / 3,
        "clean_labels": 3, "clean_labels_kept": 2, "clean_labels_kept_fraction": 2 / 3}

    classwise = make(3, given)  # a sample's learned label is the row of its given label
    classwise.clean_train_targets = clean
    classwise.class_labels = torch.tensor([[0.4, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    report = classwise.stage_report(1)
    assert (report["noisy_labels_corrected"], report["clean_labels_kept"]) == (1, 2)  # sample 3; samples 1, 2

    classwise.clean_train_targets = given
    assert classwise.stage_report(1)["noisy_labels_corrected_fraction"] is None
    del classwise.clean_train_targets
    assert classwise.stage_report(1) == {}


@pytest.mark.parametrize("labels", ["class", "instance"])
def test_interrupted_run_resumes_to_the_same_labels_and_numbers(tmp_path, labels):
    # epoch 3 trains with a decayed lr (milestones), so the lookahead's lr must resume too
    config = load_config(None, TINY + ["method.name=meta", f"method.meta.labels={labels}", "method.meta.meta_lr=20",
                                       "data.label_noise=0.2"])
    fit(config, tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "resumed", run_log=Interrupt(2))
    fit(config, tmp_path / "resumed")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert read_history(resumed) == read_history(reference)
    a, b = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (reference, resumed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for key, value in a["method"].items():
        assert (value is None and b["method"][key] is None) or (
            value == b["method"][key] if isinstance(value, int) else torch.equal(value, b["method"][key])), key
    names = ["learned_labels.npy"] + (["learned_sample_labels.npy"] if labels == "instance" else [])
    for name in names:
        assert (resumed / "stage_1" / name).read_bytes() == (reference / "stage_1" / name).read_bytes()
    learned = np.load(reference / "stage_1" / names[-1])
    assert learned.shape == ((160, 10) if labels == "instance" else (10, 10)) and not np.allclose(learned.max(1), 1)
    reports = [{k: v for k, v in json.loads((run / "stage_1" / "metrics.json").read_text()).items() if "labels" in k}
               for run in (reference, resumed)]
    assert reports[0] == reports[1] and reports[0]["noisy_labels"] == 32  # round(0.2 * 160)


def test_meta_lr_defaults_to_the_label_kind():
    for labels, beta in (("class", 0.1), ("instance", 100.0)):
        config = load_config(None, TINY + ["method.name=meta", f"method.meta.labels={labels}"])
        assert MetaLabels.hyperparameters(config)["meta_lr"] == beta
    config = load_config(None, TINY + ["method.name=meta", "method.meta.labels=instance", "method.meta.meta_lr=3"])
    assert MetaLabels.hyperparameters(config)["meta_lr"] == 3.0


@pytest.mark.parametrize(
    "setting, key",
    [
        ("labels=row", "labels"),
        ("meta_lr=0", "meta_lr"),
        ("meta_lr=-1", "meta_lr"),
        ("top_k=0", "top_k"),
        ("held_out=0", "held_out"),
        ("held_out=1", "held_out"),
        ("held_out=0.01", "held_out"),  # rounds to no held-out sample in a batch of 32
        ("held_out=0.99", "held_out"),  # ... and to no training sample
        ("init_smoothing=1", "init_smoothing"),
        ("init_smoothing=-0.1", "init_smoothing"),
        ("lookahead_lr=0", "lookahead_lr"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(setting, key):
    with pytest.raises(ColamError, match=rf"^method\.meta\.{key}: "):
        load_config(None, TINY + ["method.name=meta", f"method.meta.{setting}"])
