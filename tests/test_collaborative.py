"""Collaborative learning (Song & Chai 2018): the split network, backpropagation rescaling, the
consensus loss, the exported single head, and runs through the engine."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from colam.config import load_config
from colam.data import loader
from colam.engine import evaluate, fit, prepare
from colam.errors import ColamError
from colam.methods import METHODS
from colam.methods.collaborative import (
    CollaborativeNet,
    collaborative_loss,
    consensus_log_targets,
    scale_grad,
)
from colam.models import build_model, count_parameters
from colam.models.split import Splitter
from tests.conftest import TINY
from tests.test_engine import Interrupt, read_history

Collaborative = METHODS["collaborative"]
# TINY's network: small_cnn of width 8 on 1-channel 8x8 digits, 10 classes.
PLAIN = dict(name="small_cnn", num_classes=10, in_channels=1, width=8)


def config(*extra):
    return load_config(None, TINY + ["method.name=collaborative", *extra])


def plain(seed=0):
    torch.manual_seed(seed)
    return build_model(**PLAIN)


def wrapped(heads=4, *extra):
    cfg = config(f"method.collaborative.heads={heads}", *extra)
    return cfg, Collaborative.wrap_model(plain(cfg.seed), cfg, 10)


def digits(n=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=generator), torch.arange(n) % 10


def train_step(cfg, model):
    images, targets = digits(16)
    method = Collaborative(cfg, 10, targets)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss, _ = method.forward_loss(model, images, targets, torch.arange(16), 1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return method


# ----------------------------------------------------------------------------- the exported head


def test_export_is_the_plain_network_with_head_0s_outputs():
    cfg, model = wrapped(4)
    reference = plain(cfg.seed)
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), reference.state_dict().values()))
    method = train_step(cfg, model)  # weights and BN statistics move away from the initialisation
    exported = method.export(model)
    assert type(exported) is type(reference) and exported is not model.net
    assert count_parameters(exported) == count_parameters(reference) == 6_274
    assert count_parameters(model) > 3 * count_parameters(reference)
    deployed = build_model(**PLAIN)
    deployed.load_state_dict(exported.state_dict(), strict=True)
    assert not torch.equal(deployed.fc.weight, reference.fc.weight)  # it was trained
    x, _ = digits(5, seed=3)
    model.eval(), deployed.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(deployed(x), expected)
        every = model.forward_all(x)
        assert torch.allclose(every[0], expected, atol=1e-6)
        assert all(not torch.allclose(z, expected, atol=1e-3) for z in every[1:])  # other heads differ


def test_fit_writes_an_export_that_loads_strictly_into_the_plain_network(tmp_path):
    cfg = config()
    metrics = fit(cfg, tmp_path)
    assert metrics["method"] == "collaborative"
    assert metrics["method_params"] == {"heads": 4, "temperature": 2.0, "beta": 0.5, "split": "auto"}
    stages = sorted(p.name for p in tmp_path.glob("stage_*"))
    assert stages == ["stage_1"]
    export = torch.load(tmp_path / "stage_1" / "export.pt", weights_only=True)
    model = torch.load(tmp_path / "stage_1" / "model.pt", weights_only=True)
    deployed = build_model(**PLAIN)
    deployed.load_state_dict(export, strict=True)
    assert count_parameters(deployed) == count_parameters(plain())
    assert all(torch.equal(export[k], model[f"net.{k}"]) for k in export)
    assert any(k.startswith("copies.level2_copy3.") for k in model)
    # the accuracy the run reports is the deployed network's
    p = prepare(cfg)
    assert evaluate(deployed, loader(p.data.test, 256, shuffle=False, num_workers=0), p.device) == metrics["test_acc"]


# ----------------------------------------------------------------------------- the tree


def test_two_heads_one_split_four_heads_a_binary_tree():
    _, two = wrapped(2)
    assert two.heads == 2 and two.split == ["features.6"] and list(two.copies) == ["level1_copy1"]
    _, four = wrapped(4)
    assert four.heads == 4 and four.split == ["features.3", "features.6"]
    assert list(four.copies) == ["level1_copy1", "level2_copy1", "level2_copy2", "level2_copy3"]
    assert [four.head_path(h) for h in range(4)] == [[(0, 0), (1, h // 2), (2, h)] for h in range(4)]
    net_ids = {id(q) for q in four.net.parameters()}
    sizes = {}
    for level, copies in ((0, 1), (1, 2), (2, 4)):
        segments = [four.segment(level, j) for j in range(copies)]
        owned = [{id(q) for q in s.parameters()} for s in segments]
        assert all(owned) and len(set().union(*owned)) == sum(map(len, owned))  # distinct copies
        assert owned[0] <= net_ids and not any(o & net_ids for o in owned[1:])  # copy 0 is the plain network
        first = list(segments[0].state_dict().items())
        for other in segments[1:]:
            state = list(other.state_dict().items())
            assert [(k, v.shape) for k, v in state] == [(k, v.shape) for k, v in first]
            weights = [(a, b) for (k, a), (_, b) in zip(first, state) if k.endswith("weight") and a.ndim > 1]
            assert weights and all(not torch.equal(a, b) for a, b in weights)  # initialised independently
        sizes[level] = sum(q.numel() for q in segments[0].parameters())
    assert sizes[0] + sizes[1] + sizes[2] == count_parameters(four.net)
    assert count_parameters(four) == sizes[0] + 2 * sizes[1] + 4 * sizes[2]
    assert count_parameters(two) == sizes[0] + sizes[1] + 2 * sizes[2]  # two splits at features.6 only


def test_copies_are_deterministic_from_the_seed():
    _, a = wrapped(4)
    _, b = wrapped(4)
    _, c = wrapped(4, "seed=1")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.copies["level2_copy1"].state_dict()["features.7.weight"],
                           c.copies["level2_copy1"].state_dict()["features.7.weight"])


def test_a_named_split_is_used_and_bad_names_are_refused():
    _, model = wrapped(4, "method.collaborative.split=[features.3, features.7]")
    assert model.split == ["features.3", "features.7"]
    for split, message in [("[features.6, features.3]", "order"), ("[nope, features.6]", "'nope' is not a module"),
                           ("[features.0, features.6]", "no layer with parameters")]:
        with pytest.raises(ColamError, match=f"method.collaborative.split: .*{message}"):
            wrapped(4, f"method.collaborative.split={split}")


@pytest.mark.parametrize("name, options, split", [
    ("resnet56", {}, ["layers.9", "layers.18"]),
    ("wide_resnet", {"depth": 10, "widen_factor": 1}, ["layers.1", "layers.2"]),
])
def test_residual_networks_split_between_blocks_at_the_last_stages(name, options, split):
    cfg = load_config(None, ["method.name=collaborative", f"model.name={name}", f"model.options={options}"])
    torch.manual_seed(0)
    net = build_model(name, 10, **options)
    size = count_parameters(net)
    model = Collaborative.wrap_model(net, cfg, 10)
    assert model.split == split
    assert count_parameters(Collaborative(cfg, 10, torch.zeros(1)).export(model)) == size
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.forward_all(x)[0], model(x), atol=1e-5)


def test_the_splitter_cuts_a_network_into_segments_that_run_as_the_network():
    net = plain()
    splitter = Splitter(net, "small_cnn", 8)
    positions = splitter.automatic(2)
    assert [splitter.describe(p) for p in positions] == ["features.3", "features.6"]
    assert len(splitter.automatic(3)) < 3  # as many as the network has, no more
    segments = splitter.segments(net, positions)
    assert len(segments) == 3
    x = torch.randn(4, 1, 8, 8)
    net.eval()
    with torch.no_grad():
        y = x
        for segment in segments:
            y = segment(y)
        assert torch.equal(y, net(x))


def test_a_network_that_cannot_be_split_is_refused_naming_the_model():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not traceable
                x = -x
            return self.fc(self.conv(x).mean((2, 3)))

    with pytest.raises(ColamError, match="model.name: 'small_cnn' cannot be split .*traced"):
        Collaborative.wrap_model(Branchy(), config(), 10)
    with pytest.raises(ColamError, match=r"model.name: 'small_cnn' cannot be split .*8 heads need 3 split points"):
        wrapped(8)


# ----------------------------------------------------------------------------- backpropagation rescaling


def test_scale_grad_is_identity_forward_and_scaled_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = scale_grad(x, 0.5)
    assert torch.equal(y, x)
    y.relu_()  # a child's in-place op leaves the shared tensor alone
    assert (x < 0).any()
    (y * 3).sum().backward()
    assert torch.equal(x.grad, 1.5 * (x > 0).float())


def test_shared_layers_receive_the_mean_of_the_heads_gradients():
    _, model = wrapped(4)
    model.train()
    x, _ = digits(6)
    weights = [torch.randn(6, 10, generator=torch.Generator().manual_seed(h)) for h in range(4)]
    params = list(model.parameters())
    total = sum((z * w).sum() for z, w in zip(model.forward_all(x), weights))
    got = torch.autograd.grad(total, params)

    def alone(h):  # head h on its own path, nothing rescaled
        out = x
        for level, j in model.head_path(h):
            out = model.segment(level, j)(out)
        grads = torch.autograd.grad((out * weights[h]).sum(), params, allow_unused=True)
        return [torch.zeros_like(q) if g is None else g for q, g in zip(params, grads)]

    per_head = [alone(h) for h in range(4)]
    sharing = {}  # how many heads use each parameter
    for h in range(4):
        for level, j in model.head_path(h):
            for q in model.segment(level, j).parameters():
                sharing[id(q)] = sharing.get(id(q), 0) + 1
    assert sorted(set(sharing.values())) == [1, 2, 4]
    for i, q in enumerate(params):
        summed = sum(g[i] for g in per_head)
        assert torch.allclose(got[i], summed / sharing[id(q)], atol=1e-5, rtol=1e-4)
    trunk = [i for i, q in enumerate(params) if sharing[id(q)] == 4]
    assert any(not torch.allclose(got[i], sum(g[i] for g in per_head), atol=1e-5) for i in trunk)  # not the sum


# ----------------------------------------------------------------------------- the loss


def head_logits(heads=4, batch=5, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(batch, classes, generator=generator)).requires_grad_() for _ in range(heads)]


def test_the_consensus_is_the_other_heads_and_carries_no_gradient():
    logits, T = head_logits(), 2.0
    log_q = consensus_log_targets(logits, T)
    for h in range(4):
        others = torch.stack([z for j, z in enumerate(logits) if j != h]).mean(0)
        assert torch.allclose(log_q[h], F.log_softmax(others / T, dim=1), atol=1e-6)
        assert not log_q[h].requires_grad
    moved = [logits[0].detach() + 5 * torch.randn(5, 4)] + logits[1:]
    after = consensus_log_targets(moved, T)
    assert torch.equal(after[0], log_q[0])  # head 0's target ignores head 0
    assert all(not torch.allclose(after[h], log_q[h]) for h in (1, 2, 3))


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_the_gradient_of_each_head_comes_through_its_own_logits_only(beta):
    logits, T = head_logits(), 3.0
    targets = torch.tensor([0, 1, 2, 3, 0])
    grads = torch.autograd.grad(collaborative_loss(logits, targets, T, beta), logits)
    log_q = consensus_log_targets(logits, T)
    for h, z in enumerate(logits):
        z = z.detach()
        hard = (F.softmax(z, 1) - F.one_hot(targets, 4)) / len(z)
        soft = T * (F.softmax(z / T, 1) - log_q[h].exp()) / len(z)  # d/dz of T^2 KL(q || softmax(z / T))
        assert torch.allclose(grads[h], beta * hard + (1 - beta) * soft, atol=1e-6)


@pytest.mark.parametrize("heads", [2, 4])
def test_the_loss_equals_the_papers_formula_by_hand(heads):
    logits, T, beta = head_logits(heads, batch=3), 2.0, 0.25
    targets = [2, 0, 3]
    rows = [[[float(v) for v in row] for row in z.detach()] for z in logits]

    def softmax(values, t=1.0):
        exps = [math.exp(v / t) for v in values]
        return [e / sum(exps) for e in exps]

    expected = 0.0
    for h in range(heads):
        hard = soft = 0.0
        for b, y in enumerate(targets):
            hard -= math.log(softmax(rows[h][b])[y])
            mean_others = [sum(rows[j][b][c] for j in range(heads) if j != h) / (heads - 1) for c in range(4)]
            q, p = softmax(mean_others, T), softmax(rows[h][b], T)
            soft += sum(qc * math.log(qc / pc) for qc, pc in zip(q, p))
        expected += beta * hard / 3 + (1 - beta) * T**2 * soft / 3
    ours = collaborative_loss(logits, torch.tensor(targets), T, beta)
    assert ours.item() == pytest.approx(expected, rel=1e-5)


def test_forward_loss_sums_the_heads_and_counts_accuracy_on_head_0():
    cfg, model = wrapped(2)
    images, targets = digits(8)
    model.train()
    torch.manual_seed(0)
    loss, logits = Collaborative(cfg, 10, targets).forward_loss(model, images, targets, torch.arange(8), 1)
    torch.manual_seed(0)
    every = model.forward_all(images)
    assert torch.allclose(logits, every[0])
    assert torch.allclose(loss, collaborative_loss(every, targets, 2.0, 0.5))


# ----------------------------------------------------------------------------- runs and settings


def test_an_interrupted_run_resumes_to_the_same_numbers(tmp_path):
    cfg = config()
    reference = fit(cfg, tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "resumed", run_log=Interrupt(2))
    resumed = fit(cfg, tmp_path / "resumed")
    assert read_history(tmp_path / "resumed") == read_history(tmp_path / "reference")
    assert resumed["test_acc"] == reference["test_acc"]
    for name in ("model.pt", "export.pt"):
        final = torch.load(tmp_path / "resumed" / "stage_1" / name, weights_only=True)
        expected = torch.load(tmp_path / "reference" / "stage_1" / name, weights_only=True)
        assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.parametrize("setting, key", [
    ("method.collaborative.heads=3", "method.collaborative.heads"),
    ("method.collaborative.heads=1", "method.collaborative.heads"),
    ("method.collaborative.heads=0", "method.collaborative.heads"),
    ("method.collaborative.beta=-0.1", "method.collaborative.beta"),
    ("method.collaborative.beta=1.5", "method.collaborative.beta"),
    ("method.collaborative.temperature=0", "method.collaborative.temperature"),
    ("method.collaborative.temperature=-1", "method.collaborative.temperature"),
    ("method.collaborative.split=[features.6]", "method.collaborative.split"),
])
def test_bad_settings_are_refused_naming_the_key(setting, key):
    with pytest.raises(ColamError, match=f"^{key}: "):
        config(setting)


def test_collaborative_model_is_required():
    cfg = config()
    with pytest.raises(TypeError, match="wrap_model"):
        Collaborative(cfg, 10, torch.zeros(1)).forward_loss(plain(), *digits(4), torch.arange(4), 1)
    assert isinstance(Collaborative.wrap_model(plain(), cfg, 10), CollaborativeNet)
