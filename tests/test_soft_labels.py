"""The soft-label step against hand computations (COLAM Algorithm 1, lines 9-14; Eq. 6)."""

import math

import pytest
import torch

from colam.errors import ColamError
from colam.soft_labels import check_soft_labels, class_soft_labels, class_sums, normalise, peer_soft_labels


def hand_softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


OUTPUTS = torch.tensor([[2.0, 0.0, 1.0], [4.0, 2.0, -1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 5.0], [-1.0, 0.0, 3.0]])
TARGETS = torch.tensor([0, 0, 1, 2, 2])


def test_class_soft_labels_match_hand_computation():
    labels = class_soft_labels(OUTPUTS, TARGETS, 3, temperature=2.0)
    # class 0: mean of [2,0,1] and [4,2,-1] = [3,1,0]; class 1: [0,3,0]; class 2: mean of [1,1,5], [-1,0,3] = [0,.5,4]
    expected = [hand_softmax([3, 1, 0], 2), hand_softmax([0, 3, 0], 2), hand_softmax([0, 0.5, 4], 2)]
    assert labels.dtype == torch.float32 and labels.shape == (3, 3)
    assert torch.allclose(labels, torch.tensor(expected), atol=1e-6)
    assert labels[0].tolist() == pytest.approx([0.628532, 0.231224, 0.140244], abs=1e-6)


def test_mean_minimises_eq6_distance():
    """Line 13: argmin_y sum 1/2 ||y - f(x)||^2 over the peers is their mean; check by gradient descent."""
    peers = OUTPUTS[TARGETS == 2]
    y = torch.zeros(3, requires_grad=True)
    optimiser = torch.optim.SGD([y], lr=0.1)
    for _ in range(500):
        optimiser.zero_grad()
        (0.5 * ((y - peers) ** 2).sum()).backward()
        optimiser.step()
    sums, counts = class_sums(OUTPUTS, TARGETS, 3)
    assert torch.allclose(y.detach().double(), sums[2] / counts[2], atol=1e-5)


def test_probability_aggregation_tempers_the_log_of_the_mean_probability():
    labels = class_soft_labels(OUTPUTS, TARGETS, 3, temperature=0.5, aggregation="probs")
    p = [hand_softmax(row, 1.0) for row in ([2, 0, 1], [4, 2, -1])]
    mean = [(a + b) / 2 for a, b in zip(*p)]
    expected = hand_softmax([math.log(m) for m in mean], 0.5)
    assert labels[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_single_sample_probs_and_logits_agree():
    """softmax(log softmax(z) / T) == softmax(z / T): the two aggregations coincide for one peer."""
    z = torch.tensor([[0.3, -1.2, 2.0]])
    assert torch.allclose(normalise(z.softmax(1), 1.7, "probs"), normalise(z, 1.7, "logits"), atol=1e-6)


def test_temperature_softens_and_sharpens():
    low = class_soft_labels(OUTPUTS, TARGETS, 3, temperature=0.1)
    high = class_soft_labels(OUTPUTS, TARGETS, 3, temperature=100.0)
    assert low.argmax(1).tolist() == [0, 1, 2] and low.max(1).values.min() > 0.99
    assert torch.allclose(high, torch.full((3, 3), 1 / 3), atol=0.02)


def test_missing_class_is_refused():
    with pytest.raises(ColamError, match=r"class\(es\) \[3\]"):
        class_soft_labels(OUTPUTS, TARGETS, 4, temperature=1.0)


def test_peer_labels_average_the_chosen_peers():
    generator = torch.Generator().manual_seed(0)
    labels = peer_soft_labels(OUTPUTS, TARGETS, 3, peers=1, temperature=1.0, generator=generator)
    assert labels.shape == (5, 3)
    # with one peer, every sample's label is the tempered output of a sample of its own class
    for i, y in enumerate(TARGETS.tolist()):
        candidates = [normalise(OUTPUTS[j : j + 1], 1.0)[0] for j in (TARGETS == y).nonzero().flatten().tolist()]
        assert any(torch.allclose(labels[i], c, atol=1e-6) for c in candidates)


def test_peer_labels_with_all_members_equal_class_labels():
    outputs = torch.randn(40, 4)
    targets = torch.arange(40) % 4  # 10 per class
    per_sample = peer_soft_labels(outputs, targets, 4, peers=10, temperature=1.5, chunk=3)
    per_class = class_soft_labels(outputs, targets, 4, temperature=1.5)
    assert torch.allclose(per_sample, per_class[targets], atol=1e-5)


def test_peer_sampling_is_without_replacement_and_seeded():
    outputs = torch.eye(6) * 10  # each sample's output is distinct
    targets = torch.zeros(6, dtype=torch.long)
    a = peer_soft_labels(outputs, targets, 6, peers=3, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = peer_soft_labels(outputs, targets, 6, peers=3, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # a mean of 3 distinct one-hot*10 rows has exactly 3 entries equal to 10/3
    mean_logits = torch.log(a) - torch.log(a).min(dim=1, keepdim=True).values
    assert ((mean_logits - 10 / 3).abs() < 1e-3).sum(dim=1).tolist() == [3] * 6


def test_too_many_peers_is_refused():
    with pytest.raises(ColamError, match="method.colam.peers"):
        peer_soft_labels(OUTPUTS, TARGETS, 3, peers=2, temperature=1.0)


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.full((3, 4), 0.25), "shape"),
        (torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [float("nan"), 0.5, 0.5]]), "NaN"),
        (torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.6, 0.0], [0.0, 0.0, 1.0]]), "sum to 1"),
        (torch.tensor([[1.5, -0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]), "negative"),
    ],
)
def test_check_soft_labels_refuses_bad_matrices(labels, message):
    with pytest.raises(ColamError, match=message):
        check_soft_labels(labels, 3)
    check_soft_labels(class_soft_labels(OUTPUTS, TARGETS, 3, 1.0), 3)
