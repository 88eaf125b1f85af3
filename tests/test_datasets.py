"""Data set builders, loaded through the real torchvision loaders on tiny fake files."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F


from colam.datasets import CIFAR_STATS, DATASETS, RawData, build_raw_data, list_datasets
from colam.errors import ColamError
from tests.fakes import (
    make_fake_cifar,
    make_fake_dtd,
    make_fake_fgvc_aircraft,
    make_fake_flowers102,
    make_fake_imagefolder,
)


def _check_views(raw: RawData, shape: tuple[int, ...]) -> None:
    """Common contract: lengths match targets, items are (float tensor of `shape`, int)."""
    assert len(raw.train) == len(raw.train_eval) == len(raw.train_targets)
    assert len(raw.test) == len(raw.test_targets)
    assert raw.train_targets.dtype == raw.test_targets.dtype == np.int64
    assert (raw.in_channels, raw.image_size, raw.image_size) == shape
    views = [(raw.train, raw.train_targets), (raw.train_eval, raw.train_targets), (raw.test, raw.test_targets)]
    for view, targets in views:
        image, label = view[0]
        assert isinstance(label, int) and label == targets[0]
        assert image.dtype == torch.float32 and tuple(image.shape) == shape


# ---------------------------------------------------------------------------- CIFAR


def test_cifar10_real_format(tmp_path, monkeypatch):
    fake = make_fake_cifar(tmp_path, "cifar10", n_train=23, n_test=11)
    fake.patch_md5(monkeypatch)
    raw = build_raw_data("cifar10", tmp_path)

    assert len(raw.train) == 23 and len(raw.test) == 11
    np.testing.assert_array_equal(raw.train_targets, fake.train_labels)
    np.testing.assert_array_equal(raw.test_targets, fake.test_labels)
    assert raw.classes == fake.classes
    _check_views(raw, (3, 32, 32))

    # Eval item = (pixel / 255 - mean) / std; pixel (c, y, x) sits at c*1024 + y*32 + x.
    mean, std = CIFAR_STATS["cifar10"]
    i, c, y, x = 5, 2, 7, 13
    expected = (fake.train_data[i, c * 1024 + y * 32 + x] / 255 - mean[c]) / std[c]
    assert raw.train_eval[i][0][c, y, x].item() == pytest.approx(expected, abs=1e-5)
    expected = (fake.test_data[3, 0] / 255 - mean[0]) / std[0]
    assert raw.test[3][0][0, 0, 0].item() == pytest.approx(expected, abs=1e-5)

    # Evaluation views are deterministic; training views are augmented but keep the shape.
    assert torch.equal(raw.train_eval[i][0], raw.train_eval[i][0])
    augmented = []
    for seed in range(4):
        torch.manual_seed(seed)
        augmented.append(raw.train[i][0])
    assert all(a.shape == (3, 32, 32) for a in augmented)
    assert any(not torch.equal(a, raw.train_eval[i][0]) for a in augmented)
    torch.manual_seed(3)
    assert torch.equal(raw.train[i][0], augmented[3])


def test_cifar100_real_format(tmp_path, monkeypatch):
    fake = make_fake_cifar(tmp_path, "cifar100", n_train=12, n_test=6, num_classes=6)
    fake.patch_md5(monkeypatch)
    raw = build_raw_data("cifar100", tmp_path)
    np.testing.assert_array_equal(raw.train_targets, fake.train_labels)
    np.testing.assert_array_equal(raw.test_targets, fake.test_labels)
    assert raw.classes == fake.classes
    _check_views(raw, (3, 32, 32))
    mean, std = CIFAR_STATS["cifar100"]
    assert raw.test[0][0][1, 0, 0].item() == pytest.approx((fake.test_data[0, 1024] / 255 - mean[1]) / std[1], abs=1e-5)


def test_cifar_corrupted_files_are_refused(tmp_path):
    make_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=5)  # md5s do not match torchvision's: "corrupted"
    with pytest.raises(ColamError, match=r"^data\.root: no cifar10 data set found under .*data\.download: true"):
        build_raw_data("cifar10", tmp_path)


# ---------------------------------------------------------------------------- image folders and fine-grained sets


def test_imagefolder(tmp_path):
    make_fake_imagefolder(tmp_path, ("cat", "dog"), n_per_class=2)
    raw = build_raw_data("imagefolder", tmp_path)
    assert raw.classes == ["cat", "dog"]
    assert raw.train_targets.tolist() == [0, 0, 1, 1] and raw.test_targets.tolist() == [0, 0, 1, 1]
    _check_views(raw, (3, 224, 224))


def test_imagefolder_class_mismatch_is_refused(tmp_path):
    make_fake_imagefolder(tmp_path, ("cat", "dog"), n_per_class=1, val_classes=("cat", "emu"))
    with pytest.raises(ColamError, match=r"^data\.root: .*different classes.*dog.*emu"):
        build_raw_data("imagefolder", tmp_path)


def test_imagefolder_without_val_is_refused(tmp_path):
    make_fake_imagefolder(tmp_path, ("cat",), n_per_class=1)
    for image in (tmp_path / "val" / "cat").iterdir():
        image.unlink()
    with pytest.raises(ColamError, match=r"^data\.root: bad image folder"):
        build_raw_data("imagefolder", tmp_path)


def test_dtd(tmp_path):
    fake = make_fake_dtd(tmp_path)
    raw = build_raw_data("dtd", tmp_path)
    assert raw.train_targets.tolist() == fake.labels["train"] + fake.labels["val"]
    assert raw.test_targets.tolist() == fake.labels["test"]
    assert raw.classes == fake.classes
    _check_views(raw, (3, 224, 224))


def test_fgvc_aircraft(tmp_path):
    fake = make_fake_fgvc_aircraft(tmp_path)
    raw = build_raw_data("fgvc_aircraft", tmp_path)
    assert raw.train_targets.tolist() == fake.labels["trainval"]
    assert raw.test_targets.tolist() == fake.labels["test"]
    assert raw.classes == fake.classes
    _check_views(raw, (3, 224, 224))


def test_flowers102(tmp_path, monkeypatch):
    fake = make_fake_flowers102(tmp_path)
    fake.patch_md5(monkeypatch)
    raw = build_raw_data("flowers102", tmp_path)
    assert raw.train_targets.tolist() == fake.labels["train"] + fake.labels["val"]
    assert raw.test_targets.tolist() == fake.labels["test"]
    assert len(raw.classes) == 102 and raw.classes[0] == "pink primrose"
    _check_views(raw, (3, 224, 224))


# ---------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> RawData:
    return build_raw_data("digits", "/nonexistent/root/is/ignored")


def test_digits_split(digits):
    assert (len(digits.train), len(digits.test)) == (1198, 599)
    assert digits.classes == [str(d) for d in range(10)]
    _check_views(digits, (1, 8, 8))
    train_counts = np.bincount(digits.train_targets, minlength=10)
    test_counts = np.bincount(digits.test_targets, minlength=10)
    assert (train_counts > 0).all() and (test_counts > 0).all()
    # Stratified: each class keeps its 2:1 ratio up to rounding.
    assert np.abs(test_counts - (train_counts + test_counts) / 3).max() <= 1


def test_digits_split_is_fixed(digits):
    again = build_raw_data("digits", ".")
    np.testing.assert_array_equal(again.train_targets, digits.train_targets)
    assert torch.equal(again.test[42][0], digits.test[42][0])
    assert torch.equal(again.train_eval[7][0], digits.train_eval[7][0])


def test_digits_normalised_by_train_split(digits):
    images = torch.stack([digits.train_eval[i][0] for i in range(len(digits.train_eval))])
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_digits_augmentation_is_a_reproducible_small_shift(digits):
    def augment_all(seed):
        torch.manual_seed(seed)
        return [digits.train[i][0] for i in range(30)]

    first, second = augment_all(0), augment_all(0)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    moved = 0
    for i, augmented in enumerate(first):
        clean = digits.train_eval[i][0]
        background = clean.min().item()  # the normalised value of a 0 pixel (every digit has some)
        padded = F.pad(clean, (1, 1, 1, 1), value=background)
        shifts = [(dy, dx) for dy in range(3) for dx in range(3)
                  if torch.allclose(padded[:, dy : dy + 8, dx : dx + 8], augmented, atol=1e-6)]
        assert shifts, f"training item {i} is not a <=1 pixel shift of its clean image"
        moved += (1, 1) not in shifts
    assert moved > 0  # some images did move


# ---------------------------------------------------------------------------- registry and bad input


def test_registry():
    names = ["cifar10", "cifar100", "digits", "dtd", "fashion_mnist", "fgvc_aircraft", "flowers102", "imagefolder",
             "kmnist", "mnist"]
    assert list_datasets() == names
    assert [n for n, spec in DATASETS.items() if not spec.needs_files] == ["digits"]
    assert all(spec.name == name and spec.description for name, spec in DATASETS.items())


def test_unknown_name():
    with pytest.raises(ColamError, match=r"^data\.name: unknown data set 'emnist'; choose one of: cifar10, "):
        build_raw_data("emnist", ".")


def test_missing_root(tmp_path):
    with pytest.raises(ColamError, match=r"^data\.root: '.*nowhere' does not exist$"):
        build_raw_data("cifar10", tmp_path / "nowhere")


@pytest.mark.parametrize("name", [n for n, spec in DATASETS.items() if spec.needs_files])
def test_empty_root_names_data_root(tmp_path, name):
    with pytest.raises(ColamError, match=r"^data\.root: ") as info:
        build_raw_data(name, tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype, pad, flip, channels", [(torch.uint8, 4, True, 3), (torch.uint8, 2, False, 1),
                                                         (torch.float32, 1, False, 1), (torch.uint8, 0, True, 3)])
def test_the_tensor_transform_draws_and_computes_what_torchvisions_does(dtype, pad, flip, channels):
    """colam's TensorTransform against torchvision's RandomCrop(padding), RandomHorizontalFlip, ConvertImageDtype
    and Normalize: the same values, bit for bit, and the same random stream after each image."""
    from torchvision import transforms as T

    from colam.datasets import ImageTensors, TensorTransform

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, channels, 12, 12), generator=generator).to(torch.uint8)
    images = images if dtype == torch.uint8 else images.float() / 255
    x = ImageTensors(images, images, (0.4,) * channels, (0.25,) * channels, pad=pad, flip=flip)
    normalize, to_float = T.Normalize(x.mean, x.std), T.ConvertImageDtype(torch.float32)
    theirs = {True: T.Compose([T.RandomCrop(12, padding=pad), *([T.RandomHorizontalFlip()] if flip else []),
                               to_float, normalize]),
              False: T.Compose([to_float, normalize])}
    for augment in (True, False):
        ours = TensorTransform(x, augment)
        torch.manual_seed(1)
        mine = [ours(image) for image in images] + [torch.rand(1)]
        torch.manual_seed(1)
        reference = [theirs[augment](image) for image in images] + [torch.rand(1)]
        assert all(torch.equal(a, b) for a, b in zip(mine, reference)), (augment, dtype, pad, flip)
