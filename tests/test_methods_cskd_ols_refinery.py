"""CS-KD, online label smoothing and label refinery: each against its paper's rule, and resumed runs."""

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from colam.config import from_dict, load_config
from colam.engine import fit, fit_stage, prepare
from colam.errors import ColamError
from colam.methods import METHODS
from colam.methods.cskd import same_class_partners
from tests.conftest import TINY
from tests.test_engine import Interrupt, read_history

C = 4


def make(name, epochs=4, **section):
    config = from_dict({"method": {"name": name, name: section}, "train": {"epochs": epochs}})
    METHODS[name].validate(config)
    return config


# ----------------------------------------------------------------------------- CS-KD


def test_cskd_partners_share_the_class_and_are_never_the_sample_itself():
    targets = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 0])  # class 3 has a single sample
    indices = torch.arange(len(targets)).repeat(200)
    partners = same_class_partners(indices, targets, torch.Generator().manual_seed(0))
    assert partners.shape == indices.shape and partners.dtype == torch.long
    assert torch.equal(targets[partners], targets[indices])
    alone = targets[indices] == 3
    assert (partners[~alone] != indices[~alone]).all()
    assert (partners[alone] == 6).all()  # the only sample of its class is its own partner
    # uniform over the other samples of the class: sample 0 (class 0: 0, 2, 5, 8) meets 2, 5 and 8
    counts = torch.bincount(partners[indices == 0], minlength=len(targets))
    assert counts[[2, 5, 8]].min() > 40 and counts.sum() == 200
    again = same_class_partners(indices, targets, torch.Generator().manual_seed(0))
    other = same_class_partners(indices, targets, torch.Generator().manual_seed(1))
    assert torch.equal(partners, again) and not torch.equal(partners, other)
    torch.manual_seed(3)  # without a generator: torch's global one, which the engine reseeds every epoch
    first = same_class_partners(indices, targets)
    torch.manual_seed(3)
    assert torch.equal(first, same_class_partners(indices, targets))


class Images(torch.utils.data.Dataset):
    """A fixed 'training set' of 1x2x2 images; items are (image, label, index) like `colam.data.Indexed`."""

    def __init__(self, targets):
        self.targets = targets
        self.images = torch.randn(len(targets), 1, 2, 2, generator=torch.Generator().manual_seed(7))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i]), i


def cskd_setup(**section):
    targets = torch.arange(12) % C
    method = METHODS["cskd"](make("cskd", **section), C, targets)
    data = Images(targets)
    method.attach_data(SimpleNamespace(train=data))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, C))  # no BatchNorm: logits do not depend on the batch
    return method, model, data, targets


def test_cskd_loss_is_ce_plus_lam_t2_kl_towards_the_partner():
    method, model, data, targets = cskd_setup(temperature=3.0, lam=0.7)
    indices = torch.tensor([5, 0, 7, 2, 9])
    torch.manual_seed(11)
    loss, logits = method.forward_loss(model, data.images[indices], targets[indices], indices, 1)
    torch.manual_seed(11)  # the same draw: the method takes the partners from torch's generator
    partners = same_class_partners(indices, targets)
    assert torch.equal(targets[partners], targets[indices]) and (partners != indices).all()

    z, z_partner, y, T = model(data.images[indices]), model(data.images[partners]).detach(), targets[indices], 3.0
    assert torch.allclose(logits, z)  # the logits training accuracy counts are those of x, not x'
    ce = -F.log_softmax(z, 1)[torch.arange(5), y].mean()
    p_partner, log_q = F.softmax(z_partner / T, 1), F.log_softmax(z / T, 1)
    kl = (p_partner * (p_partner.log() - log_q)).sum(1).mean()
    expected = ce + 0.7 * T**2 * kl
    assert torch.allclose(loss, expected, atol=1e-6) and kl > 0
    # no gradient through the partner's prediction: the same gradients as with z' a constant
    grads = torch.autograd.grad(loss, list(model.parameters()))
    hand = torch.autograd.grad(expected, list(model.parameters()))
    assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(grads, hand))


def test_cskd_with_lam_zero_is_cross_entropy():
    method, model, data, targets = cskd_setup(lam=0.0)
    indices = torch.tensor([3, 1, 4, 10])
    loss, _ = method.forward_loss(model, data.images[indices], targets[indices], indices, 1)
    assert torch.allclose(loss, F.cross_entropy(model(data.images[indices]), targets[indices]))


# ----------------------------------------------------------------------------- OLS


def probs(logits):
    return F.softmax(logits, 1)


def test_ols_rows_are_the_normalised_mean_of_correct_predictions_and_supervise_the_next_epoch():
    method = METHODS["ols"](make("ols", alpha=0.3), C, torch.arange(8) % C)
    # epoch 1, two batches: class 0 twice correct (once per batch, once twice in a batch), class 1 once
    # correct and once wrong, class 2 only wrong, class 3 absent
    a = torch.tensor([[3.0, 1.0, 0.0, 0.5], [0.2, 2.0, 0.1, 0.0], [1.0, 0.0, 0.5, 0.0]])
    b = torch.tensor([[2.0, 0.0, 1.5, 0.1], [0.0, 0.3, 0.2, 1.0], [4.0, 0.0, 0.0, 1.0]])
    ya, yb = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0])
    first = method.loss(a, ya, torch.arange(3), 1)
    assert torch.allclose(first, 0.3 * F.cross_entropy(a, ya))  # S starts at zero: the hard-label term alone
    method.loss(b, yb, torch.arange(3), 1)
    method.epoch_end(1, 1)
    s = method.soft_labels
    mean0 = (probs(a)[0] + probs(b)[0] + probs(b)[2]) / 3
    assert torch.allclose(s[0], mean0 / mean0.sum(), atol=1e-6)
    assert torch.allclose(s[1], probs(a)[1], atol=1e-6)
    assert torch.equal(s[2], torch.zeros(C)) and torch.equal(s[3], torch.zeros(C))  # no correct sample
    assert method.counts.sum() == 0 and method.sums.abs().sum() == 0  # the next epoch accumulates afresh

    # epoch 2 is supervised by S: alpha * CE + (1 - alpha) * H(S[y], softmax(z))
    c = torch.tensor([[0.0, 1.0, 2.0, 0.0], [1.0, 0.0, 0.0, 2.0], [0.0, 0.5, 0.0, 0.0]])
    yc = torch.tensor([2, 0, 1])
    loss = method.loss(c, yc, torch.arange(3), 2)
    soft = -sum((s[yc[i]] * F.log_softmax(c[i], 0)).sum() for i in range(3)) / 3
    assert torch.allclose(loss, 0.3 * F.cross_entropy(c, yc) + 0.7 * soft, atol=1e-6)
    method.epoch_end(2, 1)
    assert torch.allclose(method.soft_labels[2], probs(c)[0], atol=1e-6)  # class 2 was right this time
    assert torch.allclose(method.soft_labels[1], probs(c)[2], atol=1e-6)
    assert torch.equal(method.soft_labels[0], s[0])  # class 0 was wrong: keeps the previous row


def test_ols_alpha_one_is_cross_entropy():
    method = METHODS["ols"](make("ols", alpha=1.0), C, torch.arange(8) % C)
    logits, targets = torch.randn(6, C, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 0, 1])
    method.loss(logits, targets, torch.arange(6), 1)
    method.epoch_end(1, 1)
    assert method.soft_labels.abs().sum() > 0
    assert torch.equal(method.loss(logits, targets, torch.arange(6), 1), F.cross_entropy(logits, targets))


def test_ols_state_round_trips_mid_epoch():
    config = make("ols", alpha=0.5)
    method = METHODS["ols"](config, C, torch.arange(8) % C)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, C, generator=generator) * 3, torch.randint(C, (8,), generator=generator))
               for _ in range(3)]
    method.loss(*batches[0], None, 1)
    method.epoch_end(1, 1)
    method.loss(*batches[1], None, 1)  # accumulated, not yet applied
    restored = METHODS["ols"](config, C, torch.arange(8) % C)
    restored.load_state_dict(copy.deepcopy(method.state_dict()))
    for m in (method, restored):
        m.loss(*batches[2], None, 1)
        m.epoch_end(2, 1)
    assert torch.equal(method.soft_labels, restored.soft_labels)
    assert torch.equal(method.loss(*batches[0], None, 1), restored.loss(*batches[0], None, 1))


# ----------------------------------------------------------------------------- Label Refinery

REFINERY = [o for o in TINY if not o.startswith("method.")] + ["method.name=refinery"]


def refinery_prepared(*extra):
    return prepare(load_config(None, REFINERY + list(extra)))


def train_one_step(p):
    """One SGD step of generation 1, so that the weights are trained and the optimizer has momentum."""
    from colam.data import loader

    optimizer = torch.optim.SGD(p.model.parameters(), lr=0.05, momentum=0.9)
    p.method.stage_start(1, p.model, optimizer)
    images, targets, indices = next(iter(loader(p.data.train, 32, shuffle=True, num_workers=0, seed=0)))
    p.model.train()
    loss, logits = p.method.forward_loss(p.model, images, targets, indices, 1)
    assert torch.allclose(loss, F.cross_entropy(logits, targets))  # generation 1: hard labels
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return optimizer, (images, targets, indices)


def test_refinery_next_generation_freezes_the_trained_model_and_starts_a_fresh_one():
    runs = []
    for _ in range(2):
        p = refinery_prepared()
        optimizer, _ = train_one_step(p)
        trained = copy.deepcopy(p.model.state_dict())
        assert optimizer.state
        p.method.stage_start(2, p.model, optimizer)
        runs.append(p)
        assert not optimizer.state  # no momentum carried into the new generation
        refiner = p.method.refiner
        assert not refiner.training and not any(q.requires_grad for q in refiner.parameters())
        assert all(torch.equal(refiner.state_dict()[k], trained[k]) for k in trained)
        fresh = p.model.state_dict()
        assert all(not torch.equal(fresh[k], trained[k]) for k in trained)  # BatchNorm statistics included
        assert all(torch.equal(fresh[k], torch.zeros_like(fresh[k])) for k in fresh if k.endswith("running_mean"))
    a, b = (p.model.state_dict() for p in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed re-initialises to the same weights
    assert any(not torch.equal(a[k], refinery_prepared("seed=1").method.initial_weights(2)[k]) for k in a)


def test_refinery_later_generation_is_soft_ce_against_the_refiners_prediction():
    p = refinery_prepared()
    optimizer, (images, targets, indices) = train_one_step(p)
    teacher = copy.deepcopy(p.model).eval()  # the trained model, evaluated with its running statistics
    p.method.stage_start(2, p.model, optimizer)
    p.model.train()
    loss, logits = p.method.forward_loss(p.model, images, targets, indices, 2)
    with torch.no_grad():
        refined = F.softmax(teacher(images), 1)
    assert torch.allclose(logits, p.model(images))
    expected = -(refined * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(logits, targets))  # not the hard labels
    loss.backward()
    assert all(q.grad is None for q in p.method.refiner.parameters())


def test_refinery_generation_two_alone_repeats_the_whole_run(tmp_path):
    config = load_config(None, REFINERY)
    assert METHODS["refinery"].stage_epochs(config) == [2, 2]
    reference = fit(config, tmp_path / "reference")
    shutil.copytree(tmp_path / "reference" / "stage_1", tmp_path / "staged" / "stage_1")
    metrics = fit_stage(config, tmp_path / "staged", 2)  # a fresh Method: the refiner comes from stage_1
    expected = json.loads((tmp_path / "reference" / "stage_2" / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if "seconds" not in k} == \
        {k: v for k, v in expected.items() if "seconds" not in k}
    assert metrics["test_acc"] == reference["test_acc"]
    final = torch.load(tmp_path / "staged" / "stage_2" / "model.pt", weights_only=True)
    same = torch.load(tmp_path / "reference" / "stage_2" / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], same[k]) for k in same)


@pytest.mark.parametrize("epochs, section, stages", [
    (4, {}, [2, 2]),
    (6, {"generations": 3}, [2, 2, 2]),
    (4, {"generations": 1}, [4]),
    (4, {"generations": 2, "epochs_per_generation": 2}, [2, 2]),
])
def test_refinery_splits_the_epochs_into_generations(epochs, section, stages):
    assert METHODS["refinery"].stage_epochs(make("refinery", epochs, **section)) == stages


# ----------------------------------------------------------------------------- all three


@pytest.mark.parametrize("name, epochs, section, message", [
    ("cskd", 4, {"temperature": 0}, "method.cskd.temperature: must be > 0, got 0.0"),
    ("cskd", 4, {"lam": -0.5}, "method.cskd.lam: must be >= 0, got -0.5"),
    ("ols", 4, {"alpha": 1.5}, "method.ols.alpha: must be in [0, 1], got 1.5"),
    ("ols", 4, {"alpha": -0.1}, "method.ols.alpha: must be in [0, 1], got -0.1"),
    ("refinery", 4, {"generations": 0}, "method.refinery.generations: must be >= 1, got 0"),
    ("refinery", 4, {"generations": 3}, ("method.refinery.generations: must divide train.epochs (4) when "
                                         "method.refinery.epochs_per_generation is null, got 3")),
    ("refinery", 4, {"epochs_per_generation": 3}, ("method.refinery.generations: times method.refinery."
                                                   "epochs_per_generation (3) must equal train.epochs (4), got 2")),
    ("refinery", 4, {"epochs_per_generation": 0}, "method.refinery.epochs_per_generation: must be >= 1 or null, got 0"),
])
def test_invalid_settings_name_the_key(name, epochs, section, message):
    with pytest.raises(ColamError) as raised:
        make(name, epochs, **section)
    assert str(raised.value) == message


@pytest.mark.parametrize("name, interrupt_after", [
    ("cskd", 1),  # partner draws and augmentations must repeat
    ("ols", 2),  # S learned over two epochs, restored from the checkpoint
    ("refinery", 2),  # generation 2 starts in the resumed process, from the checkpoint's model
    ("refinery", 3),  # inside generation 2: the refiner comes from the checkpoint
])
def test_interrupted_run_resumes_to_the_same_result(tiny_config, tmp_path, name, interrupt_after):
    config = tiny_config(f"method.name={name}")
    reference = fit(config, tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "resumed", run_log=Interrupt(interrupt_after))
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = fit(config, tmp_path / "resumed")
    assert read_history(tmp_path / "resumed") == read_history(tmp_path / "reference")
    assert resumed["test_acc"] == reference["test_acc"]
    final = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    expected = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(final["model"][k], expected["model"][k]) for k in expected["model"])
    assert same(final["method"], expected["method"])


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def test_refinery_restarts_the_learning_rate_schedule_with_each_generation():
    """Each generation is a fresh model trained from scratch: its lr schedule starts again at train.lr."""
    from colam.engine import learning_rate

    config = load_config(None, TINY + ["method.name=refinery", "train.epochs=8", "train.lr=0.1"])
    assert [round(learning_rate(config, e), 6) for e in range(8)] == [0.1, 0.1, 0.01, 0.001] * 2
    colam = load_config(None, TINY + ["train.epochs=8", "method.colam.epochs_per_stage=4", "train.lr=0.1"])
    assert [round(learning_rate(colam, e), 6) for e in range(8)] == [0.1] * 4 + [0.01] * 2 + [0.001] * 2
