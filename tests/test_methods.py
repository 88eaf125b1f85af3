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
    if name == "colam":  # Algorithm 1 as written unless a test asks for the guard (its own tests below)
        section = {"stages": 2, "epochs_per_stage": 2, "guard": "none", **section}
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


def test_colam_tempered_stage_one_is_algorithm_1_line_5(batch):
    """stage1_loss: tempered trains stage 1 on H(y, softmax(z / T)); the default, ce, on H(y, softmax(z))."""
    logits, targets, indices = batch
    tempered, _ = make("colam", temperature=2.0, stage1_loss="tempered")
    assert torch.allclose(tempered.loss(logits, targets, indices, 1), F.cross_entropy(logits / 2.0, targets))
    plain, _ = make("colam", temperature=2.0)
    assert not torch.allclose(plain.loss(logits, targets, indices, 1), tempered.loss(logits, targets, indices, 1))


def test_colam_k_peers_per_class_draw_one_label_per_class():
    """peer_labels: class gives a C x C matrix, row c from k samples of class c drawn without
    replacement; the draw follows (seed, stage), and with k = the class size it is every peer."""
    method, train_targets = make("colam", temperature=2.0, peers=3, peer_labels="class")
    outputs = torch.randn(20, C, generator=torch.Generator().manual_seed(4))
    artifacts = end_stage(method, outputs)
    assert set(artifacts) == {"soft_labels"} and artifacts["soft_labels"].shape == (C, C)
    members = [set((train_targets == c).nonzero().flatten().tolist()) for c in range(C)]
    for c in range(C):  # each row is the softmax of the mean of some 3 of its class's 4 samples
        rows = [(outputs[list(m)].mean(0) / 2.0).softmax(0) for m in _subsets(sorted(members[c]), 3)]
        assert any(torch.allclose(artifacts["soft_labels"][c], row, atol=1e-6) for row in rows)
    again, _ = make("colam", temperature=2.0, peers=3, peer_labels="class")
    assert torch.equal(end_stage(again, outputs)["soft_labels"], artifacts["soft_labels"])
    everyone, _ = make("colam", temperature=2.0, peers=4, peer_labels="class")
    all_peers, _ = make("colam", temperature=2.0)
    assert torch.allclose(end_stage(everyone, outputs)["soft_labels"], end_stage(all_peers, outputs)["soft_labels"],
                          atol=1e-6)


def _subsets(items, k):
    from itertools import combinations

    return combinations(items, k)


def collapsing_outputs() -> torch.Tensor:
    """Outputs whose class-1 mean favours class 3, every other class its own."""
    outputs = 4.0 * torch.eye(C)[torch.arange(20) % C]
    outputs[torch.arange(20) % C == 1] = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0])
    return outputs


@pytest.mark.parametrize("guard", ["none", "keep", "anchor"])
def test_colam_guard_counts_collapsed_rows_and_repairs_only_them(guard):
    method, _ = make("colam", temperature=1.0, guard=guard)
    labels = end_stage(method, collapsing_outputs())["soft_labels"]
    estimated = (torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0])).softmax(0)
    healthy = (4.0 * torch.eye(C)).softmax(1)
    assert method.stage_report(1) == {"collapsed_rows": 1, "collapsed_classes": [1], "guard": guard}
    others = [0, 2, 3, 4]
    assert torch.allclose(labels[others], healthy[others], atol=1e-6)  # rows that favour their class: untouched
    expected = {"none": estimated, "keep": torch.eye(C)[1],  # after stage 1, the labels before are the hard ones
                "anchor": (estimated + torch.eye(C)[1]) / 2}[guard]
    assert torch.allclose(labels[1], expected, atol=1e-6)
    assert labels[1].argmax() == (3 if guard == "none" else 1)


def test_colam_guard_keep_takes_the_previous_stage_row_and_is_a_no_op_without_collapse():
    method, _ = make("colam", temperature=1.0, guard="keep")
    healthy = 4.0 * torch.eye(C)[torch.arange(20) % C]
    first = end_stage(method, healthy)["soft_labels"].clone()
    assert method.stage_report(1)["collapsed_rows"] == 0
    method.observe(collapsing_outputs(), method.train_targets, torch.arange(20))
    second = method.end_stage(2)["soft_labels"]
    assert torch.allclose(second[1], first[1]) and method.stage_report(2)["collapsed_classes"] == [1]
    unguarded, _ = make("colam", temperature=1.0)
    assert torch.equal(end_stage(unguarded, healthy)["soft_labels"], first)  # no collapse: the identity


def test_colam_guard_applies_to_per_sample_labels():
    method, train_targets = make("colam", temperature=1.0, peers=4, guard="anchor")
    artifacts = end_stage(method, collapsing_outputs())
    per_sample = artifacts["sample_soft_labels"]
    assert method.stage_report(1)["collapsed_rows"] == 4  # the four samples of class 1 (k = the class: its mean)
    assert (per_sample.argmax(1) == train_targets).all()


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
        ("colam", {"stage1_loss": "soft"}, "method.colam.stage1_loss"),
        ("colam", {"peer_labels": "batch"}, "method.colam.peer_labels"),
        ("colam", {"guard": "repair"}, "method.colam.guard"),
    ],
)
def test_invalid_method_settings_name_the_key(name, section, key):
    with pytest.raises(ColamError, match="^" + key.replace(".", r"\.")):
        make(name, **section)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_owns_its_settings_and_names_its_headline(name):
    """Each method file declares its section (`settings`) and the settings runs are compared at (`headline`):
    the temperature T of the paper's comparison for every method that has one."""
    import dataclasses

    method = METHODS[name]
    config = from_dict({"method": {"name": name}})
    assert dataclasses.is_dataclass(method.settings) and isinstance(getattr(config.method, name), method.settings)
    fields = {f.name for f in dataclasses.fields(method.settings)}
    assert method.headline == (("temperature",) if "temperature" in fields else ())
    values = method.headline_values(config)
    assert values == {key: getattr(getattr(config.method, name), key) for key in method.headline}
    assert values.items() <= method.hyperparameters(config).items()  # what runs are logged and compared by


def test_headline_values_follow_the_config():
    config = from_dict({"method": {"name": "kd", "kd": {"temperature": 8.0}, "colam": {"temperature": 0.5}}})
    assert METHODS["kd"].headline_values(config) == {"temperature": 8.0}
    assert METHODS["colam"].headline_values(config) == {"temperature": 0.5}
    assert METHODS["hl"].headline_values(config) == {}
    assert sorted(name for name, method in METHODS.items() if method.headline) == [
        "colam", "collaborative", "cskd", "fixed", "kd"]


def test_only_colam_online_per_sample_labels_refuse_a_dropped_last_batch():
    """Under torchrun the engine asks the method (`needs_every_sample`), not COLAM's section, whether a
    last batch smaller than the ranks may be dropped."""
    from colam.distributed import World
    from colam.engine import _check_shards

    online = {"estimation": "online", "peers": 3}
    needs = [name for name, method in METHODS.items()
             if method.needs_every_sample(from_dict({"method": {"name": name, "colam": online}}))]
    assert needs == ["colam"]
    assert not METHODS["colam"].needs_every_sample(from_dict({"method": {"colam": {"estimation": "online"}}}))
    for name in METHODS:
        config = from_dict({"method": {"name": name, "colam": online}, "train": {"batch_size": 32}})
        if name == "colam":
            with pytest.raises(ColamError, match="^train.batch_size: 32 leaves a last batch of 1 sample"):
                _check_shards(config, 193, World(0, 2))
        else:
            _check_shards(config, 193, World(0, 2))  # a warning: the last sample is not trained on
