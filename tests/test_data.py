"""Training subset, validation split and label noise: exact, stratified, and fixed by split_seed."""

import numpy as np
import pytest
import torch

from colam.config import DataConfig
from colam.data import build_data, loader, stratified_sample, symmetric_noise


def test_stratified_sample_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    chosen = stratified_sample(labels, 50, np.random.default_rng(0))
    assert len(chosen) == 50 and len(set(chosen.tolist())) == 50
    assert np.bincount(labels[chosen]).tolist() == [20, 15, 10, 5]


def test_symmetric_noise_flips_exactly_rate_n_labels_to_other_classes():
    labels = np.repeat(np.arange(10), 50)
    noisy = symmetric_noise(labels, 10, 0.2, np.random.default_rng(0))
    flipped = noisy != labels
    assert flipped.sum() == 100  # round(0.2 * 500), and a flipped label is never its own class
    assert set(np.unique(noisy[flipped]).tolist()) == set(range(10))


def test_subset_split_and_noise_do_not_depend_on_the_training_seed():
    cfg = DataConfig(name="digits", train_subset=300, val_fraction=0.2, label_noise=0.3, split_seed=7)
    a, b = build_data(cfg), build_data(cfg)
    assert torch.equal(a.train_targets, b.train_targets) and np.array_equal(a.train.indices, b.train.indices)
    assert len(a.train) == 240 and len(a.val) == 60 and len(a.test) == 599
    assert not set(a.train.indices.tolist()) & set(a.val.indices.tolist())
    assert (a.train_targets != a.clean_train_targets).sum().item() == 72  # round(0.3 * 240)
    assert a.class_counts() == torch.bincount(a.train_targets, minlength=10).tolist()
    other = build_data(DataConfig(name="digits", train_subset=300, val_fraction=0.2, label_noise=0.3, split_seed=8))
    assert not np.array_equal(a.train.indices, other.train.indices)


def test_items_carry_their_position_and_the_training_label():
    data = build_data(DataConfig(name="digits", train_subset=100, label_noise=0.5))
    for position in (0, 17, 99):
        image, label, index = data.train_eval[position]
        assert index == position and label == data.train_targets[position].item()
        base_image, _ = data.train_eval.base[int(data.train.indices[position])]
        assert torch.equal(image, base_image)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_order_and_augmentation_follow_the_seed(workers):
    data = build_data(DataConfig(name="digits", train_subset=64))

    def first_batch(seed):
        torch.manual_seed(seed)
        images, labels, indices = next(iter(loader(data.train, 16, shuffle=True, num_workers=workers, seed=seed)))
        return images, indices

    (x1, i1), (x2, i2), (_, i3) = first_batch(1), first_batch(1), first_batch(2)
    assert torch.equal(i1, i2) and torch.equal(x1, x2)
    assert not torch.equal(i1, i3)
