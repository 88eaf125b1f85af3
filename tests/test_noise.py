"""Label noise: exactly round(rate * N) training labels flipped, each to another class, fixed by split_seed."""

import json

import numpy as np
import pytest
import torch

from colam.config import DataConfig, load_config
from colam.data import NOISE, NOISE_TYPES, asymmetric_noise, build_data, save_split, symmetric_noise
from colam.datasets import build_raw_data
from colam.errors import ColamError


def uneven_labels():
    return np.repeat(np.arange(7), [50, 41, 33, 20, 9, 5, 2])  # 160 samples, classes of very different size


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.13, 0.2, 0.5, 0.77, 0.99])
def test_exactly_round_rate_n_labels_flip_each_to_another_class(noise_type, rate):
    labels = uneven_labels()
    noisy = NOISE[noise_type](labels, 7, rate, np.random.default_rng(3))
    flipped = noisy != labels
    assert flipped.sum() == round(rate * len(labels))  # a chosen label always changes, so the count is exact
    assert noisy.dtype == labels.dtype and ((noisy >= 0) & (noisy < 7)).all()


def test_asymmetric_noise_flips_class_c_to_c_plus_1_mod_c_a_rate_share_of_every_class():
    labels = uneven_labels()
    noisy = asymmetric_noise(labels, 7, 0.3, np.random.default_rng(0))
    flipped = noisy != labels
    assert np.array_equal(noisy[flipped], (labels[flipped] + 1) % 7)  # the pair flip, 6 -> 0 included
    assert (noisy[flipped & (labels == 6)] == 0).all() and (flipped & (labels == 6)).any()
    per_class = np.bincount(labels[flipped], minlength=7)
    sizes = np.bincount(labels)
    assert (np.abs(per_class - 0.3 * sizes) < 1).all()  # each class loses its share, to the nearest integer


def test_symmetric_noise_spreads_flips_over_all_other_classes():
    labels = np.repeat(np.arange(4), 500)
    noisy = symmetric_noise(labels, 4, 0.6, np.random.default_rng(0))
    for c in range(4):
        to = np.bincount(noisy[(labels == c) & (noisy != labels)], minlength=4)
        assert to[c] == 0 and (to[np.arange(4) != c] > 50).all()  # not a pair flip: every other class gets some


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_noise_repeats_with_the_seed_and_differs_with_another(noise_type):
    labels = uneven_labels()
    draw = lambda seed: NOISE[noise_type](labels, 7, 0.4, np.random.default_rng(seed))  # noqa: E731
    assert np.array_equal(draw(5), draw(5))
    assert not np.array_equal(draw(5) != labels, draw(6) != labels)  # other samples flipped


def digits(noise_type="symmetric", label_noise=0.3, split_seed=0):
    return DataConfig(name="digits", train_subset=300, val_fraction=0.2, label_noise=label_noise,
                      noise_type=noise_type, split_seed=split_seed)


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_only_the_training_split_is_noisy(noise_type):
    clean, noisy = build_data(digits(label_noise=0.0)), build_data(digits(noise_type))
    # the same samples everywhere: the noise is drawn after the subset and the validation split
    assert np.array_equal(clean.train.indices, noisy.train.indices)
    assert np.array_equal(clean.val.indices, noisy.val.indices)
    assert np.array_equal(clean.val.targets, noisy.val.targets)
    assert np.array_equal(clean.test.targets, noisy.test.targets)
    raw = build_raw_data("digits", "data")
    assert np.array_equal(noisy.val.targets, np.asarray(raw.train_targets)[noisy.val.indices])  # the data set's own
    assert np.array_equal(noisy.test.targets, np.asarray(raw.test_targets))
    assert torch.equal(noisy.clean_train_targets, clean.train_targets)
    flipped = noisy.train_targets != noisy.clean_train_targets
    assert flipped.sum().item() == round(0.3 * 240)
    assert np.array_equal(noisy.train.targets, noisy.train_targets.numpy())  # what the loader serves
    assert np.array_equal(noisy.train_eval.targets, noisy.train_targets.numpy())
    if noise_type == "asymmetric":
        assert torch.equal(noisy.train_targets[flipped], (noisy.clean_train_targets[flipped] + 1) % 10)


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_split_noise_depends_on_the_split_seed_alone(noise_type):
    def flipped(split_seed):  # every training sample, so only the noise depends on the seed
        data = build_data(DataConfig(name="digits", label_noise=0.2, noise_type=noise_type, split_seed=split_seed))
        assert np.array_equal(data.train.indices, np.arange(1198))  # digits: 1198 training, 599 test images
        return data.train_targets, set(np.flatnonzero(data.train_targets != data.clean_train_targets).tolist())

    (targets, a), (again, b), (_, other) = flipped(4), flipped(4), flipped(5)
    assert torch.equal(targets, again) and a == b and len(a) == round(0.2 * 1198)
    assert a != other and len(other) == len(a)


def test_the_two_types_flip_the_same_number_of_the_same_samples_differently():
    sym, asym = build_data(digits("symmetric")), build_data(digits("asymmetric"))
    assert np.array_equal(sym.train.indices, asym.train.indices)
    assert (sym.train_targets != sym.clean_train_targets).sum() == (asym.train_targets != asym.clean_train_targets).sum()
    assert not torch.equal(sym.train_targets, asym.train_targets)


def test_saved_split_records_the_noise_type_and_refuses_another(tmp_path):
    summary = save_split(digits("asymmetric"), tmp_path)
    assert summary["data"]["noise_type"] == "asymmetric" and summary["noisy_labels"] == 72
    assert json.loads((tmp_path / "split.json").read_text())["data"]["noise_type"] == "asymmetric"
    loaded = build_data(digits("asymmetric"), tmp_path)
    assert torch.equal(loaded.train_targets, build_data(digits("asymmetric")).train_targets)
    with pytest.raises(ColamError, match=r"^--split: .* data\.noise_type='asymmetric', the config has 'symmetric'"):
        build_data(digits("symmetric"), tmp_path)


def test_a_split_saved_before_noise_types_reads_as_symmetric(tmp_path):
    save_split(digits("symmetric"), tmp_path)
    summary = json.loads((tmp_path / "split.json").read_text())
    del summary["data"]["noise_type"]  # what earlier versions wrote
    (tmp_path / "split.json").write_text(json.dumps(summary))
    assert torch.equal(build_data(digits("symmetric"), tmp_path).train_targets,
                       build_data(digits("symmetric")).train_targets)
    with pytest.raises(ColamError, match=r"data\.noise_type='symmetric', the config has 'asymmetric'"):
        build_data(digits("asymmetric"), tmp_path)


def test_config_accepts_the_noise_types_and_refuses_others():
    for noise_type in NOISE_TYPES:
        assert load_config(None, [f"data.noise_type={noise_type}"]).data.noise_type == noise_type
    assert load_config().data.noise_type == "symmetric"
    with pytest.raises(ColamError, match=r"^data\.noise_type: must be symmetric or asymmetric, got 'x'$"):
        load_config(None, ["data.noise_type=x"])
    with pytest.raises(ColamError, match=r"^data\.noise_type: expected str, got 3$"):
        load_config(None, ["data.noise_type=3"])
    with pytest.raises(ColamError, match=r"^data\.noise_type: must be symmetric or asymmetric, got 'pair'$"):
        build_data(DataConfig(name="digits", train_subset=100, noise_type="pair"))  # built without load_config
