"""Data set builders: turn a data set name and a root folder into a `RawData`.

Every builder returns three views: `train` (with augmentation), `train_eval` (the same
samples in the same order, evaluation transform: used to score the training set, e.g.
to build soft labels) and `test`. Labels are read from each data set's own label list,
never by decoding images, so building is cheap.

`build_raw_data` is the only entry point that validates input: missing files and bad
names become a one-line `ColamError` naming the config key, never a traceback.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T

from colam.errors import ColamError


@dataclass
class ImageTensors:
    """A data set small enough to hold whole, as tensors, with its training transform in batch
    form: what `train.data_on_device` (colam.feed.ResidentFeed) needs. The transform is a random
    crop of the image's size from the image zero-padded by `pad` pixels, a horizontal flip with
    probability 1/2 when `flip`, then (x - mean) / std per channel."""

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


# ---------------------------------------------------------------------------- transforms

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _cifar_transforms(name: str) -> tuple[Callable, Callable]:
    normalize = T.Normalize(*CIFAR_STATS[name])
    train = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return train, T.Compose([T.ToTensor(), normalize])


def _imagenet_transforms() -> tuple[Callable, Callable]:
    normalize = T.Normalize(*IMAGENET_STATS)
    train = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    evaluate = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    return train, evaluate


class RandomShift:
    """Translate a CxHxW tensor by up to `max_shift` pixels in each direction.

    Pads with `fill` and takes a random HxW crop; uses torch's RNG, so it is
    reproducible under `torch.manual_seed`.
    """

    def __init__(self, max_shift: int = 1, fill: float = 0.0):
        self.max_shift, self.fill = max_shift, fill

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.max_shift
        h, w = x.shape[-2:]
        padded = F.pad(x, (m, m, m, m), value=self.fill)
        i, j = torch.randint(0, 2 * m + 1, (2,)).tolist()
        return padded[..., i : i + h, j : j + w]


class TensorImageDataset(Dataset):
    """In-memory images (N x C x H x W tensor) and labels, with an optional tensor transform."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, transform: Callable | None = None):
        assert len(images) == len(labels)
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


# ---------------------------------------------------------------------------- builders


def _targets(labels: Sequence[int]) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64)


def _build_digits(root: Path, download: bool) -> RawData:
    """scikit-learn's 1797 8x8 digits, bundled with the library: `root` and `download` are unused."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)  # N x 1 x 8 x 8 in [0, 1]
    labels = _targets(bunch.target)
    # A fixed split (random_state=0, not the run seed) so every run sees the same test set.
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=1 / 3, stratify=labels, random_state=0
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train_images = images[train_idx]
    mean, std = train_images.mean().item(), train_images.std().item()
    normalize = T.Normalize([mean], [std])
    # Shift before normalising so the padding is 0 = background. No flips: digits are not symmetric.
    augment = T.Compose([RandomShift(1, fill=0.0), normalize])
    return RawData(
        train=TensorImageDataset(train_images, labels[train_idx], augment),
        train_eval=TensorImageDataset(train_images, labels[train_idx], normalize),
        test=TensorImageDataset(images[test_idx], labels[test_idx], normalize),
        train_targets=labels[train_idx],
        test_targets=labels[test_idx],
        classes=[str(c) for c in bunch.target_names],
        in_channels=1,
        image_size=8,
        tensors=ImageTensors(train_images, images[test_idx], (mean,), (std,), pad=1, flip=False),
    )


def _cifar_builder(name: str, cls: type) -> Callable[[Path, bool], RawData]:
    def build(root: Path, download: bool) -> RawData:
        train_t, eval_t = _cifar_transforms(name)
        train = cls(root, train=True, transform=train_t, download=download)
        train_eval = cls(root, train=True, transform=eval_t, download=False)
        test = cls(root, train=False, transform=eval_t, download=False)
        raw = _from_labelled(train, train_eval, test, image_size=32)
        # torchvision holds CIFAR in memory as N x H x W x C uint8: the same pixels, channels first
        raw.tensors = ImageTensors(_channels_first(train.data), _channels_first(test.data), *CIFAR_STATS[name],
                                   pad=4, flip=True)
        return raw

    return build


def _idx_builder(name: str) -> Callable[[Path, bool], RawData]:
    """MNIST, Fashion-MNIST or KMNIST (colam.idx_datasets): 28x28 grayscale, held whole as uint8.
    Augmentation as for CIFAR, scaled to the family: a random 28x28 crop of the image zero-padded by
    2 pixels, and a left-right flip only where it keeps the class (Fashion-MNIST)."""

    def build(root: Path, download: bool) -> RawData:
        from colam.idx_datasets import IDX_SETS, read_idx_set

        spec, arrays = IDX_SETS[name], read_idx_set(name, root, download)
        to_float, normalize = T.ConvertImageDtype(torch.float32), T.Normalize([spec.mean], [spec.std])
        flips = [T.RandomHorizontalFlip()] if spec.flip else []
        augment = T.Compose([T.RandomCrop(28, padding=IDX_PAD), *flips, to_float, normalize])
        evaluate = T.Compose([to_float, normalize])
        train, test = arrays.train_images, arrays.test_images
        return RawData(
            train=TensorImageDataset(train, arrays.train_labels, augment),
            train_eval=TensorImageDataset(train, arrays.train_labels, evaluate),
            test=TensorImageDataset(test, arrays.test_labels, evaluate),
            train_targets=arrays.train_labels,
            test_targets=arrays.test_labels,
            classes=arrays.classes,
            in_channels=1,
            image_size=28,
            tensors=ImageTensors(train, test, (spec.mean,), (spec.std,), pad=IDX_PAD, flip=spec.flip),
        )

    return build


IDX_PAD = 2  # pixels of zero padding before the random crop (CIFAR: 4 of 32; MNIST digits keep a 4-pixel margin)


def _channels_first(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def load_image(path: str) -> Image.Image:
    """An RGB image file (torchvision's default loader), or a ColamError naming the file: a corrupt
    or truncated image is met while training reads it, possibly in a DataLoader worker."""
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ColamError(f"data.root: image '{path}' cannot be read ({_one_line(err)[:160]})") from None


def _image_folder(path: Path, transform: Callable) -> tvd.ImageFolder:
    if not path.is_dir():
        raise ColamError(
            f"data.root: '{path}' does not exist (expected <root>/train/<class>/<image> and <root>/val/<class>/<image>)"
        )
    try:
        return tvd.ImageFolder(path, transform=transform, loader=load_image)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise ColamError(f"data.root: bad image folder '{path}': {_one_line(err)}") from err


def _build_imagefolder(root: Path, download: bool) -> RawData:
    if download:
        raise ColamError("data.download: the imagefolder data set cannot be downloaded; set it to false")
    train_t, eval_t = _imagenet_transforms()
    train = _image_folder(root / "train", train_t)
    train_eval = _image_folder(root / "train", eval_t)
    test = _image_folder(root / "val", eval_t)
    _check_same_classes(root, {"train": train.classes, "val": test.classes})
    return _from_labelled(train, train_eval, test, image_size=224)


def _from_labelled(train, train_eval, test, image_size: int) -> RawData:
    """RawData from torchvision data sets that expose `.targets` and `.classes` (RGB images)."""
    return RawData(
        train=train,
        train_eval=train_eval,
        test=test,
        train_targets=_targets(train.targets),
        test_targets=_targets(test.targets),
        classes=list(train.classes),
        in_channels=3,
        image_size=image_size,
    )


def _split_builder(cls: type, train_splits: Sequence[str], test_split: str, **kwargs) -> Callable[..., RawData]:
    """Builder for torchvision's split-based fine-grained sets (Flowers102, DTD, FGVCAircraft)."""

    def build(root: Path, download: bool) -> RawData:
        train_t, eval_t = _imagenet_transforms()

        def make(split: str, transform: Callable):
            return cls(root, split=split, transform=transform, download=download, **kwargs)

        train_parts = [make(s, train_t) for s in train_splits]
        train_eval_parts = [make(s, eval_t) for s in train_splits]
        test = make(test_split, eval_t)
        # torchvision keeps these labels in the private `_labels` list: read it, not the images.
        parts = {**dict(zip(train_splits, train_parts)), test_split: test}
        n_classes = 1 + max(max(p._labels, default=-1) for p in parts.values())
        names = {split: _class_names(p, n_classes) for split, p in parts.items()}
        _check_same_classes(root, names)
        return RawData(
            train=ConcatDataset(train_parts),
            train_eval=ConcatDataset(train_eval_parts),
            test=test,
            train_targets=_targets([y for p in train_parts for y in p._labels]),
            test_targets=_targets(test._labels),
            classes=names[test_split],
            in_channels=3,
            image_size=224,
        )

    return build


def _class_names(ds: Dataset, n_classes: int) -> list[str]:
    names = getattr(ds, "classes", None)
    return list(names) if names else [f"class_{i:03d}" for i in range(n_classes)]


def _check_same_classes(root: Path, classes_by_split: dict[str, list[str]]) -> None:
    (first, reference), *others = classes_by_split.items()
    for split, classes in others:
        if list(classes) != list(reference):
            only_first = sorted(set(reference) - set(classes))
            only_other = sorted(set(classes) - set(reference))
            raise ColamError(
                f"data.root: the '{first}' and '{split}' splits under '{root}' have different classes "
                f"(only in {first}: {only_first[:5]}; only in {split}: {only_other[:5]})"
            )


# ---------------------------------------------------------------------------- registry

_SPECS = [
    DatasetSpec("digits", _build_digits, False, "scikit-learn 8x8 handwritten digits (bundled, 10 classes)"),
    DatasetSpec("cifar10", _cifar_builder("cifar10", tvd.CIFAR10), True, "CIFAR-10 (32x32, 10 classes)"),
    DatasetSpec("cifar100", _cifar_builder("cifar100", tvd.CIFAR100), True, "CIFAR-100 (32x32, 100 classes)"),
    DatasetSpec("mnist", _idx_builder("mnist"), True, "MNIST handwritten digits (28x28 grayscale, 10 classes)"),
    DatasetSpec("fashion_mnist", _idx_builder("fashion_mnist"), True,
                "Fashion-MNIST, Zalando's article images (28x28 grayscale, 10 classes)"),
    DatasetSpec("kmnist", _idx_builder("kmnist"), True, "Kuzushiji-MNIST, cursive Japanese (28x28 grayscale, 10 classes)"),
    DatasetSpec(
        "imagefolder", _build_imagefolder, True, "ImageNet-style folders root/train/<class>, root/val/<class> (224x224)"
    ),
    DatasetSpec(
        "flowers102",
        _split_builder(tvd.Flowers102, ["train", "val"], "test"),
        True,
        "Oxford Flowers-102 (train+val / test, 224x224)",
    ),
    DatasetSpec(
        "dtd",
        _split_builder(tvd.DTD, ["train", "val"], "test", partition=1),
        True,
        "Describable Textures, partition 1 (train+val / test, 224x224)",
    ),
    DatasetSpec(
        "fgvc_aircraft",
        _split_builder(tvd.FGVCAircraft, ["trainval"], "test", annotation_level="variant"),
        True,
        "FGVC-Aircraft, variant labels (trainval / test, 224x224)",
    ),
]
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def dataset_spec(name: str) -> DatasetSpec:
    """The registered data set `name`, or a ColamError naming data.name."""
    spec = DATASETS.get(name)
    if spec is None:
        raise ColamError(f"data.name: unknown data set {name!r}; choose one of: {', '.join(list_datasets())}")
    return spec


def build_raw_data(name: str, root: str | os.PathLike, *, download: bool = False) -> RawData:
    """Build the named data set from files under `root` (downloading them if `download`)."""
    spec = dataset_spec(name)
    root = Path(root).expanduser()
    # With download, torchvision creates the root itself.
    if spec.needs_files and not download and not root.exists():
        raise ColamError(f"data.root: '{root}' does not exist")
    with _torchvision_errors(name, root, download):
        return spec.builder(root, download)


@contextmanager
def _torchvision_errors(name: str, root: Path, download: bool) -> Iterator[None]:
    """Turn torchvision's missing-file and download errors into one-line ColamErrors."""
    try:
        yield
    except RuntimeError as err:  # "Dataset not found or corrupted. You can use download=True ..."
        if "not found" not in str(err).lower():
            raise
        raise _not_found(name, root, download) from err
    except FileNotFoundError as err:  # an annotation file missing inside an existing folder
        raise _not_found(name, root, download) from err
    except OSError as err:  # network errors (URLError) while downloading
        raise ColamError(f"data.download: could not download {name} into '{root}': {_one_line(err)}") from err


def _not_found(name: str, root: Path, download: bool) -> ColamError:
    hint = "check the path" if download else "set data.download: true to download it, or check the path"
    return ColamError(f"data.root: no {name} data set found under '{root}' ({hint})")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# ---------------------------------------------------------------------------- copies for DVC

BUNDLED, DOWNLOAD = "bundled", "download"  # the sources of `colam data get` that are not folders


def get_data(name: str, source: str, out: str | os.PathLike) -> list[str]:
    """Write data set `name`'s files, checked, into `out`, the folder DVC versions as data.root
    (`colam data get`); returns the files written, relative to `out`.

    The MNIST family comes from a folder of its original files or from torchvision's download,
    checked (colam.idx_datasets); other torchvision data sets from their download; the bundled digits
    have no files of their own, so `out` gets digits.json, the digests of scikit-learn's arrays, and
    a scikit-learn whose digits differ changes what DVC sees.
    """
    spec, out = dataset_spec(name), Path(out)
    if out.exists() and not out.is_dir():
        raise ColamError(f"--out: '{out}' exists and is not a folder")
    if not spec.needs_files:
        if source != BUNDLED:
            raise ColamError(f"--from: {name} ships with scikit-learn, it has no other source; use --from {BUNDLED}")
        return [_write_bundled_manifest(name, out)]
    if source == BUNDLED:
        raise ColamError(f"--from: {name} is not bundled; give a folder holding its files or '{DOWNLOAD}'")
    from colam.idx_datasets import IDX_SETS, copy_idx_files

    if name in IDX_SETS:
        if source != DOWNLOAD and not Path(source).is_dir():
            raise ColamError(f"--from: '{source}' is not a folder (nor '{DOWNLOAD}')")
        written = copy_idx_files(name, Path(source), out, download=source == DOWNLOAD)
        return sorted(str(p.relative_to(out)) for p in written)
    if source != DOWNLOAD:
        raise ColamError(f"--from: colam copies {name} from its download only; use --from {DOWNLOAD}")
    with _torchvision_errors(name, out, True):
        spec.builder(out, True)
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _write_bundled_manifest(name: str, out: Path) -> str:
    from colam import io as cio

    raw = DATASETS[name].builder(out, False)
    tensors = raw.tensors
    arrays = {"train_images": tensors.train, "test_images": tensors.test,
              "train_targets": raw.train_targets, "test_targets": raw.test_targets}
    digests = {key: hashlib.md5(np.ascontiguousarray(np.asarray(value)).tobytes()).hexdigest()
               for key, value in arrays.items()}
    # no version: a scikit-learn release with the same digits leaves the file, and DVC, as they were
    cio.write_json(out / f"{name}.json", {"name": name, "source": "scikit-learn's load_digits", "md5": digests})
    return f"{name}.json"
