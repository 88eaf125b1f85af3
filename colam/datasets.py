"""Data set builders: a data set name and a root folder become a `RawData` (docs/datasets.md), its labels read
from the data set's own label list, never by decoding images; bad input is a one-line `ColamError`."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from colam import io as cio
from colam.errors import ColamError, flat_message
from colam.idx_datasets import IDX_SETS, copy_idx_files, read_idx_set, torchvision_class


@dataclass
class ImageTensors:
    """A data set held whole as tensors and its training transform (per sample or, colam.feed, per batch): a random
    crop of the image zero-padded by `pad`, a flip with probability 1/2 when `flip`, normalisation."""

    train: torch.Tensor  # N x C x H x W in the order of RawData.train_targets: uint8 (0..255) or float in [0, 1]
    test: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    flip: bool


@dataclass
class RawData:
    train: Dataset  # augmented training samples: item -> (CxHxW float tensor, int label)
    train_eval: Dataset  # the same samples, same order, evaluation transform
    test: Dataset  # test split, evaluation transform
    train_targets: np.ndarray  # int64 labels of `train`, in order
    test_targets: np.ndarray
    classes: list[str]  # class names, index = label
    in_channels: int
    image_size: int
    tensors: ImageTensors | None = None  # the same data as tensors, when it fits in (GPU) memory


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    builder: Callable[..., RawData]  # builder(root: Path, download: bool) -> RawData
    needs_files: bool  # False only for the bundled 'digits'
    description: str


CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IDX_PAD = 2  # pixels of zero padding before the random crop (CIFAR: 4 of 32; MNIST digits keep a 4-pixel margin)


def _imagenet_transforms() -> tuple[Callable, Callable]:
    from torchvision import transforms as T

    normalize = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return train, T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])


class TensorImageDataset(Dataset):
    """In-memory images (N x C x H x W tensor) and labels, with a tensor transform."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, transform: Callable):
        assert len(images) == len(labels)
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def _targets(labels: Sequence[int]) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64)


class TensorTransform:
    """ImageTensors' transform of one image (crop and flip with `augment`), then [0, 1] floats (uint8 / 255): the same
    random draws and values as torchvision's RandomCrop(size, padding), RandomHorizontalFlip, ConvertImageDtype and
    Normalize (tests/test_datasets.py) without importing torchvision, which costs every step process about a second."""

    def __init__(self, x: ImageTensors, augment: bool):
        self.pad, self.flip, self.augment = x.pad, x.flip, augment
        self.mean, self.std = (torch.as_tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (x.mean, x.std))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.augment:
            image = self._crop(image)
            if self.flip and torch.rand(1) < 0.5:
                image = image.flip(-1)
        image = image.to(torch.float32) / 255.0 if image.dtype == torch.uint8 else image.to(torch.float32)
        return (image - self.mean) / self.std

    def _crop(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-1]
        padded = torch.nn.functional.pad(image, [self.pad] * 4, mode="constant", value=0.0)
        if self.pad == 0:  # the crop is the image: no draw, as torchvision's
            return padded
        top, left = (torch.randint(0, padded.shape[axis] - size + 1, size=(1,)).item() for axis in (-2, -1))
        return padded[..., top:top + size, left:left + size]


def _tensor_data(x: ImageTensors, train_labels: np.ndarray, test_labels: np.ndarray, classes: list[str]) -> RawData:
    """RawData of images held whole (TensorTransform): [0, 1] floats come after the crop, so the padding is black."""
    augment, evaluate = TensorTransform(x, augment=True), TensorTransform(x, augment=False)
    train, train_eval = (TensorImageDataset(x.train, train_labels, t) for t in (augment, evaluate))
    return RawData(train, train_eval, TensorImageDataset(x.test, test_labels, evaluate), train_labels, test_labels,
                   classes, in_channels=x.train.shape[1], image_size=x.train.shape[-1], tensors=x)


def digits_arrays() -> dict[str, np.ndarray]:
    """scikit-learn's 1797 8x8 digits in [0, 1] (N x 1 x 8 x 8 float32) and labels, in a fixed train/test split
    (random_state=0, not the run seed) so every run sees the same test set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = _targets(bunch.target)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=1 / 3, stratify=labels, random_state=0)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return {"train_images": images[train_idx], "test_images": images[test_idx], "train_targets": labels[train_idx],
            "test_targets": labels[test_idx]}


def array_digests(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {key: hashlib.md5(np.asarray(value).tobytes()).hexdigest() for key, value in arrays.items()}


def _saved_digits(root: Path) -> dict[str, np.ndarray] | None:
    """The arrays `colam data get` saved in `root` (digits.npz), when colam wrote them and they have the digests
    of digits.json: read in milliseconds, where importing scikit-learn costs every process about a second."""
    record, saved = root / "digits.json", root / "digits.npz"
    if not (cio.wrote(record) and cio.wrote(saved)):
        return None
    try:
        with np.load(saved, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        digests = json.loads(record.read_text()).get("md5")
    except (OSError, ValueError, AttributeError, zipfile.BadZipFile):
        return None  # scikit-learn's arrays are the reference: an unreadable copy is not used
    return arrays if digests == array_digests(arrays) else None


def _build_digits(root: Path, download: bool) -> RawData:
    """scikit-learn's digits, bundled with the library; from `root` where `colam data get` saved them."""
    arrays = _saved_digits(root) or digits_arrays()
    train, test = (torch.from_numpy(arrays[f"{split}_images"]) for split in ("train", "test"))
    # Shift by up to 1 pixel before normalising, so the padding is 0 = background. No flips: digits are not symmetric.
    tensors = ImageTensors(train, test, (train.mean().item(),), (train.std().item(),), pad=1, flip=False)
    return _tensor_data(tensors, arrays["train_targets"], arrays["test_targets"], [str(c) for c in range(10)])


def _build_cifar(name: str, root: Path, download: bool) -> RawData:
    cls = torchvision_class(name.upper())
    train, test = cls(root, train=True, download=download), cls(root, train=False, download=False)
    # torchvision holds CIFAR in memory as N x H x W x C uint8: the same pixels, channels first
    train_x, test_x = (torch.from_numpy(np.ascontiguousarray(d.data)).permute(0, 3, 1, 2) for d in (train, test))
    return _tensor_data(ImageTensors(train_x, test_x, *CIFAR_STATS[name], pad=4, flip=True), _targets(train.targets),
                        _targets(test.targets), list(train.classes))


def _build_idx(name: str, root: Path, download: bool) -> RawData:
    """The MNIST family (colam.idx_datasets), held whole as uint8, flipped only where that keeps the class."""
    spec, (train, train_labels, test, test_labels) = IDX_SETS[name], read_idx_set(name, root, download)
    tensors = ImageTensors(train, test, (spec.mean,), (spec.std,), pad=IDX_PAD, flip=spec.flip)
    return _tensor_data(tensors, train_labels, test_labels, list(spec.classes))


def load_image(path: str) -> Image.Image:
    """An RGB image file (torchvision's default loader), or a ColamError naming the file: a corrupt or truncated
    image is met while training reads it, possibly in a DataLoader worker."""
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ColamError(f"data.root: image '{path}' cannot be read ({flat_message(err)[:160]})") from None


def _image_folder(path: Path, transform: Callable):
    if not path.is_dir():
        raise ColamError(f"data.root: '{path}' does not exist (expected <root>/train/<class>/<image> and "
                         f"<root>/val/<class>/<image>)")
    try:
        return torchvision_class("ImageFolder")(path, transform=transform, loader=load_image)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise ColamError(f"data.root: bad image folder '{path}': {flat_message(err)}") from err


def _build_imagefolder(root: Path, download: bool) -> RawData:
    if download:
        raise ColamError("data.download: the imagefolder data set cannot be downloaded; set it to false")
    train_t, eval_t = _imagenet_transforms()
    train, test = _image_folder(root / "train", train_t), _image_folder(root / "val", eval_t)
    _check_same_classes(root, {"train": train.classes, "val": test.classes})
    return RawData(train, _image_folder(root / "train", eval_t), test, _targets(train.targets),
                   _targets(test.targets), train.classes, in_channels=3, image_size=224)


def _build_split(class_name: str, train_splits: Sequence[str], test_split: str, root: Path, download: bool,
                 **kwargs) -> RawData:
    """torchvision's split-based fine-grained sets (Flowers102, DTD, FGVCAircraft)."""
    train_t, eval_t = _imagenet_transforms()
    make = partial(torchvision_class(class_name), root, download=download, **kwargs)
    train_parts = [make(split=s, transform=train_t) for s in train_splits]
    test = make(split=test_split, transform=eval_t)
    _check_same_classes(root, {**{s: p.classes for s, p in zip(train_splits, train_parts)}, test_split: test.classes})
    train_eval = ConcatDataset([make(split=s, transform=eval_t) for s in train_splits])
    # torchvision keeps these labels in the private `_labels` list: read it, not the images.
    return RawData(ConcatDataset(train_parts), train_eval, test, _targets([y for p in train_parts for y in p._labels]),
                   _targets(test._labels), list(test.classes), in_channels=3, image_size=224)


def _check_same_classes(root: Path, classes_by_split: dict[str, list[str]]) -> None:
    (first, reference), *others = classes_by_split.items()
    for split, classes in others:
        if list(classes) != list(reference):
            only_first, only_other = sorted(set(reference) - set(classes)), sorted(set(classes) - set(reference))
            raise ColamError(f"data.root: the '{first}' and '{split}' splits under '{root}' have different classes "
                             f"(only in {first}: {only_first[:5]}; only in {split}: {only_other[:5]})")


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    DatasetSpec("digits", _build_digits, False, "scikit-learn 8x8 handwritten digits (bundled, 10 classes)"),
    DatasetSpec("cifar10", partial(_build_cifar, "cifar10"), True, "CIFAR-10 (32x32, 10 classes)"),
    DatasetSpec("cifar100", partial(_build_cifar, "cifar100"), True, "CIFAR-100 (32x32, 100 classes)"),
    DatasetSpec("mnist", partial(_build_idx, "mnist"), True, "MNIST handwritten digits (28x28 grayscale, 10 classes)"),
    DatasetSpec("fashion_mnist", partial(_build_idx, "fashion_mnist"), True,
                "Fashion-MNIST, Zalando's article images (28x28 grayscale, 10 classes)"),
    DatasetSpec("kmnist", partial(_build_idx, "kmnist"), True,
                "Kuzushiji-MNIST, cursive Japanese (28x28 grayscale, 10 classes)"),
    DatasetSpec("imagefolder", _build_imagefolder, True,
                "ImageNet-style folders root/train/<class>, root/val/<class> (224x224)"),
    DatasetSpec("flowers102", partial(_build_split, "Flowers102", ["train", "val"], "test"), True,
                "Oxford Flowers-102 (train+val / test, 224x224)"),
    DatasetSpec("dtd", partial(_build_split, "DTD", ["train", "val"], "test", partition=1), True,
                "Describable Textures, partition 1 (train+val / test, 224x224)"),
    DatasetSpec("fgvc_aircraft", partial(_build_split, "FGVCAircraft", ["trainval"], "test",
                                         annotation_level="variant"),
                True, "FGVC-Aircraft, variant labels (trainval / test, 224x224)"),
]}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ColamError(f"data.name: unknown data set {name!r}; choose one of: {', '.join(list_datasets())}")
    return DATASETS[name]


def build_raw_data(name: str, root: str | os.PathLike, *, download: bool = False) -> RawData:
    """The data set from files under `root` (downloaded if `download`); torchvision's errors become ColamErrors."""
    spec, root = dataset_spec(name), Path(root).expanduser()
    if spec.needs_files and not download and not root.exists():  # with download, torchvision creates it
        raise ColamError(f"data.root: '{root}' does not exist")
    try:
        return spec.builder(root, download)
    # "Dataset not found or corrupted. You can use download=True ...", or an annotation file missing in a folder
    except (RuntimeError, FileNotFoundError) as err:
        if isinstance(err, RuntimeError) and "not found" not in str(err).lower():
            raise
        hint = "check the path" if download else "set data.download: true to download it, or check the path"
        raise ColamError(f"data.root: no {name} data set found under '{root}' ({hint})") from err
    except OSError as err:  # network errors (URLError) while downloading
        raise ColamError(f"data.download: could not download {name} into '{root}': {flat_message(err)}") from err


BUNDLED, DOWNLOAD = "bundled", "download"  # the sources of `colam data get` that are not folders


def get_data(name: str, source: str, out: str | os.PathLike) -> list[str]:
    """Write data set `name`'s checked files into `out`, the folder DVC versions as data.root (`colam data get`):
    for the bundled digits, the digests of scikit-learn's arrays. Returns the files, relative to `out`."""
    spec, out = dataset_spec(name), Path(out)
    cio.check_folder_path(out)
    if not spec.needs_files:
        if source != BUNDLED:
            raise ColamError(f"--from: {name} ships with scikit-learn, it has no other source; use --from {BUNDLED}")
        for written in (f"{name}.json", f"{name}.npz"):
            cio.refuse_overwrite(out / written, cio.written_here(out))
        cio.take_folder(out, "data set", shared=True)  # data.root: colam replaces and deletes only what it wrote
        arrays = digits_arrays()
        # no version: a scikit-learn release with the same digits leaves the files, and DVC, as they were
        cio.atomic_write_bytes(out / f"{name}.npz", cio.npz_bytes(arrays))  # what runs read (_saved_digits)
        cio.write_json(out / f"{name}.json", {"name": name, "source": "scikit-learn's load_digits",
                                              "md5": array_digests(arrays)})
        return [f"{name}.json", f"{name}.npz"]
    if source == BUNDLED:
        raise ColamError(f"--from: {name} is not bundled; give a folder holding its files or '{DOWNLOAD}'")
    if name not in IDX_SETS and source != DOWNLOAD:
        raise ColamError(f"--from: colam copies {name} from its download only; use --from {DOWNLOAD}")
    if source != DOWNLOAD and not Path(source).is_dir():
        raise ColamError(f"--from: '{source}' is not a folder (nor '{DOWNLOAD}')")
    cio.take_folder(out, "data set", shared=True)
    if name in IDX_SETS:
        written = copy_idx_files(name, Path(source), out, download=source == DOWNLOAD)
    else:
        build_raw_data(name, out, download=True)
        written = [p for p in out.rglob("*") if p.is_file()]
    return sorted(str(p.relative_to(out)) for p in written)
