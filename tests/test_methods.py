"""Every registered method, and each method's loss against its paper's formula."""

import pytest
import torch
import torch.nn.functional as F

from colam.config import from_dict
from colam.errors import ColamError
from colam.methods import METHODS, soft_cross_entropy
from colam.methods.disturblabel import disturb
from colam.methods.ls import smoothed_targets

C = 5


def make(name, **section):
    if name == "colam":
        section = {"stages": 2, "epochs_per_stage": 2, **section}
    raw = {"method": {"name": name, **({name: section} if section else {})}, "train": {"epochs": 4}}
    config = from_dict(raw)
    METHODS[name].validate(config)
    targets = torch.arange(20) % C
    return METHODS[name](config, C, targets), targets


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, C, generator=generator, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    return logits, targets, torch.arange(8)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_gives_a_finite_differentiable_loss(name, tmp_path):
    """Each stage of every method on a real tiny batch, through the hooks the engine calls."""
    from colam.config import load_config
    from colam.data import loader
    from colam.engine import prepare, stream_outputs
    from tests.conftest import TINY

    p = prepare(load_config(None, TINY + [f"method.name={name}", *method_extras(name, tmp_path)]))
    optimizer = torch.optim.SGD(p.model.parameters(), lr=0.01)
    images, targets, indices = next(iter(loader(p.data.train, 16, shuffle=True, num_workers=0, seed=0)))
    for stage in range(1, len(p.stage_epochs) + 1):
        if stage > 1 and p.method.needs_outputs(stage - 1):  # what the engine does at a stage end
            stream_outputs(p)
            p.method.end_stage(stage - 1)
        p.method.stage_start(stage, p.model, optimizer)
        p.model.train()
        loss, logits = p.method.forward_loss(p.model, images, targets, indices, stage)
        assert loss.ndim == 0 and torch.isfinite(loss), stage
        assert logits.shape == (len(targets), p.data.num_classes)
        grads = torch.autograd.grad(loss, [q for q in p.model.parameters() if q.requires_grad], allow_unused=True)
        assert any(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), stage
    assert sum(p.stage_epochs) == p.config.train.epochs
    assert METHODS[name].paper and METHODS[name].summary


def method_extras(name: str, folder) -> list[str]:
    """Settings a method needs beyond the tiny config: kd a teacher to distil from (a uniform C x C
    soft-label file; the network teacher is tested in test_kd.py), fixed a soft-label file to train on."""
    if name not in ("kd", "fixed"):
        return []
    import numpy as np

    labels = np.full((10, 10), 0.05, dtype=np.float32) + 0.5 * np.eye(10, dtype=np.float32)
    np.save(folder / "labels.npy", labels)
    return [f"method.kd.teacher={folder / 'labels.npy'}" if name == "kd" else f"method.fixed.labels={folder / 'labels.npy'}"]


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_torch_and_eq1(eps, batch):
    method, _ = make("ls", eps=eps)
    logits, targets, indices = batch
    ours = method.loss(logits, targets, indices, 1)
    assert torch.allclose(ours, F.cross_entropy(logits, targets, label_smoothing=eps), atol=1e-6)
    eq1 = (1 - eps) * F.one_hot(targets, C) + eps / C  # COLAM paper Eq. 1 with eps/n
    assert torch.allclose(ours, soft_cross_entropy(logits, eq1), atol=1e-6)


def test_label_smoothing_c_minus_1_convention(batch):
    method, _ = make("ls", eps=0.2, convention="C-1")
    logits, targets, indices = batch
    target = smoothed_targets(targets, C, 0.2)
    assert torch.allclose(target.sum(1), torch.ones(8))
    assert torch.allclose(target[0], torch.tensor([0.8, 0.05, 0.05, 0.05, 0.05]))
    expected = -sum(
        sum(target[i, j] * F.log_softmax(logits[i], 0)[j] for j in range(C)) for i in range(8)
    ) / 8
    assert torch.allclose(method.loss(logits, targets, indices, 1), expected, atol=1e-6)


def test_confidence_penalty_is_ce_minus_beta_entropy(batch):
    method, _ = make("cp", beta=0.5)
    logits, targets, indices = batch
    p = logits.softmax(1)
    entropy = -(p * p.log()).sum(1).mean()
    expected = F.cross_entropy(logits, targets) - 0.5 * entropy
    assert torch.allclose(method.loss(logits, targets, indices, 1), expected, atol=1e-6)


def test_disturblabel_redraws_at_rate_alpha():
    torch.manual_seed(0)
    targets = torch.zeros(200_000, dtype=torch.long)
    disturbed = disturb(targets, 10, 0.3)
    # the label changes with probability alpha * (C - 1) / C, uniformly over the other classes
    assert (disturbed != 0).float().mean().item() == pytest.approx(0.3 * 9 / 10, abs=0.005)
    counts = torch.bincount(disturbed, minlength=10)[1:].float()
    assert (counts / counts.sum() - 1 / 9).abs().max() < 0.01
    assert torch.equal(disturb(targets[:100], 10, 0.0), targets[:100])


def test_disturblabel_alpha_zero_is_hard_labels(batch):
    method, _ = make("disturblabel", alpha=0.0)
    logits, targets, indices = batch
    assert torch.allclose(method.loss(logits, targets, indices, 1), F.cross_entropy(logits, targets))


def end_stage(method, outputs):
    """A stage-1 end fed the whole training set's `outputs` in one batch, as the engine's pass does."""
    method.observe(outputs, method.train_targets, torch.arange(len(outputs)))
    return method.end_stage(1)


def test_colam_stage_one_is_hard_labels_then_eq4_with_soft_labels(batch):
    method, train_targets = make("colam", temperature=2.0)
    logits, targets, indices = batch
    assert torch.allclose(method.loss(logits, targets, indices, 1), F.cross_entropy(logits, targets))
    outputs = torch.randn(20, C, generator=torch.Generator().manual_seed(1))
    artifacts = end_stage(method, outputs)
    soft = artifacts["soft_labels"]
    assert soft.shape == (C, C) and torch.allclose(soft.sum(1), torch.ones(C))
    mean_c0 = outputs[train_targets == 0].mean(0)
    assert torch.allclose(soft[0], (mean_c0 / 2.0).softmax(0), atol=1e-6)
    # Eq. 4: -sum_j y_soft^j log softmax^j(f(x) / T)
    expected = -(soft[targets] * F.log_softmax(logits / 2.0, 1)).sum(1).mean()
    assert torch.allclose(method.loss(logits, targets, indices, 2), expected, atol=1e-6)


def test_colam_random_peers_give_per_sample_labels(batch):
    method, train_targets = make("colam", temperature=2.0, peers=2)
    outputs = torch.randn(20, C)
    artifacts = end_stage(method, outputs)
    per_sample = artifacts["sample_soft_labels"]
    assert per_sample.shape == (20, C)
    assert not torch.allclose(per_sample, artifacts["soft_labels"][train_targets])  # labels differ within a class
    logits, _, _ = batch
    indices = torch.randperm(20, generator=torch.Generator().manual_seed(3))[:8]  # a shuffled batch
    expected = soft_cross_entropy(logits / 2.0, per_sample[indices])
    # the loss uses each sample's own label, looked up by its index in the training set, and Eq. 4's T
    assert torch.allclose(method.loss(logits, train_targets[indices], indices, 2), expected, atol=1e-6)


def test_colam_state_round_trips(batch):
    method, _ = make("colam", peers=2)
    end_stage(method, torch.randn(20, C))
    restored, _ = make("colam", peers=2)
    restored.load_state_dict(method.state_dict())
    logits, targets, indices = batch
    assert torch.equal(method.loss(logits, targets, indices, 2), restored.loss(logits, targets, indices, 2))


@pytest.mark.parametrize(
    "name, section, key",
    [
        ("ls", {"eps": 1.0}, "method.ls.eps"),
        ("ls", {"convention": "n"}, "method.ls.convention"),
        ("cp", {"beta": -0.1}, "method.cp.beta"),
        ("disturblabel", {"alpha": 1.5}, "method.disturblabel.alpha"),
        ("colam", {"temperature": 0.0}, "method.colam.temperature"),
        ("colam", {"temperature": -1.0}, "method.colam.temperature"),
        ("colam", {"peers": 0}, "method.colam.peers"),
        ("colam", {"peers": "some"}, "method.colam.peers"),
        ("colam", {"aggregation": "median"}, "method.colam.aggregation"),
        ("colam", {"stages": 3}, "method.colam.stages"),
    ],
)
def test_invalid_method_settings_name_the_key(name, section, key):
    with pytest.raises(ColamError, match="^" + key.replace(".", r"\.")):
        make(name, **section)
