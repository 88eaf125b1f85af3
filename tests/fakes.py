"""Tiny on-disk data sets in the real file formats, for tests (no download needed).

Each `make_fake_*` writes under `root` the layout the torchvision loader expects and
returns what it wrote, so tests can compare. The torchvision loaders that check md5
sums (CIFAR, Flowers102) need their class attributes pointed at our files: call the
returned object's `patch_md5(monkeypatch)` before loading.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """`n` labels, every class present as soon as n >= num_classes, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _write_image(path: Path, rng: np.random.Generator, size: int = 16, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8).squeeze()
    Image.fromarray(pixels, mode=mode).save(path)


# ---------------------------------------------------------------------------- CIFAR


@dataclass
class FakeCifar:
    variant: str  # "cifar10" or "cifar100"
    root: Path
    train_data: np.ndarray  # N x 3072 uint8: 1024 red, 1024 green, 1024 blue, rows of 32
    train_labels: np.ndarray
    test_data: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    md5: dict[str, str] = field(default_factory=dict)  # file name -> md5 of what we wrote

    def patch_md5(self, monkeypatch) -> None:
        """Point torchvision's CIFAR10/CIFAR100 md5 attributes at the generated files."""
        import torchvision.datasets as tvd

        cls = tvd.CIFAR10 if self.variant == "cifar10" else tvd.CIFAR100
        monkeypatch.setattr(cls, "train_list", [[f, self.md5[f]] for f, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[f, self.md5[f]] for f, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": self.md5[cls.meta["filename"]]})


def make_fake_cifar(
    root,
    variant: str = "cifar10",
    *,
    n_train: int = 40,
    n_test: int = 20,
    num_classes: int | None = None,
    seed: int = 0,
) -> FakeCifar:
    """Write a tiny CIFAR-10 (`cifar-10-batches-py/`) or CIFAR-100 (`cifar-100-python/`) data set.

    Files, pickles and keys are those of the real archives (CIFAR-10: data_batch_1..5,
    test_batch, batches.meta; CIFAR-100: train, test, meta with fine/coarse labels). The
    keys are str, as the real Python-2 pickles read with encoding="latin1" give.
    `num_classes` defaults to 10 / 100; labels cycle over the classes, shuffled.
    """
    assert variant in ("cifar10", "cifar100")
    num_classes = num_classes or (10 if variant == "cifar10" else 100)
    rng = np.random.default_rng(seed)
    data = {s: rng.integers(0, 256, (n, 3072), dtype=np.uint8) for s, n in [("train", n_train), ("test", n_test)]}
    labels = {s: _balanced_labels(len(d), num_classes, rng) for s, d in data.items()}
    classes = [f"class{i}" for i in range(num_classes)]
    folder = Path(root) / ("cifar-10-batches-py" if variant == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict) -> None:
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))

    if variant == "cifar10":
        for i, rows in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            dump(f"data_batch_{i}", {"batch_label": f"training batch {i} of 5",
                                     "data": data["train"][rows], "labels": labels["train"][rows].tolist()})
        dump("test_batch", {"batch_label": "testing batch 1 of 1",
                            "data": data["test"], "labels": labels["test"].tolist()})
        dump("batches.meta", {"label_names": classes, "num_cases_per_batch": 10000, "num_vis": 3072})
    else:
        for split in ("train", "test"):
            fine = labels[split].tolist()
            dump(split, {"data": data[split], "fine_labels": fine, "coarse_labels": [y % 20 for y in fine]})
        dump("meta", {"fine_label_names": classes, "coarse_label_names": [f"super{i}" for i in range(20)]})
    md5 = {p.name: md5_of(p) for p in folder.iterdir()}
    return FakeCifar(variant, Path(root), data["train"], labels["train"], data["test"], labels["test"], classes, md5)


# ---------------------------------------------------------------------------- image folders


def make_fake_imagefolder(
    root, classes=("cat", "dog"), *, n_per_class: int = 3, val_classes=None, size: int = 16, seed: int = 0
) -> Path:
    """Write `root/train/<class>/<i>.png` and `root/val/<class>/<i>.png` (random RGB, `size` px).

    `val_classes` (default: `classes`) lets a test make the two splits disagree. Returns root.
    """
    rng = np.random.default_rng(seed)
    for split, names in [("train", classes), ("val", val_classes or classes)]:
        for name in names:
            for i in range(n_per_class):
                _write_image(Path(root) / split / name / f"{i}.png", rng, size)
    return Path(root)


@dataclass
class FakeSplits:
    """What a split-based fake wrote: labels per split, in the loader's order."""

    root: Path
    labels: dict[str, list[int]]
    classes: list[str]
    md5: dict[str, str] = field(default_factory=dict)

    def patch_md5(self, monkeypatch) -> None:
        """Flowers102 only: point its md5 table at the generated .mat files."""
        import torchvision.datasets as tvd

        table = {k: (name, self.md5.get(name, md5)) for k, (name, md5) in tvd.Flowers102._file_dict.items()}
        monkeypatch.setattr(tvd.Flowers102, "_file_dict", table)


def make_fake_dtd(root, classes=("banded", "dotted"), *, n_per_split: int = 4, seed: int = 0) -> FakeSplits:
    """Write a DTD partition 1 (`dtd/dtd/labels/{train,val,test}1.txt`, `dtd/dtd/images/<class>/*.jpg`).

    Every split holds every class (n_per_split >= len(classes)); classes are sorted as DTD's are.
    """
    rng = np.random.default_rng(seed)
    classes = sorted(classes)
    base = Path(root) / "dtd" / "dtd"
    (base / "labels").mkdir(parents=True, exist_ok=True)
    labels = {}
    for split in ("train", "val", "test"):
        labels[split] = _balanced_labels(n_per_split, len(classes), rng).tolist()
        lines = [f"{classes[y]}/{classes[y]}_{split}_{i:04d}.jpg" for i, y in enumerate(labels[split])]
        for line in lines:
            _write_image(base / "images" / line, rng)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return FakeSplits(Path(root), labels, classes)


def make_fake_fgvc_aircraft(
    root, classes=("707-320", "A300B4", "Cessna 172"), *, n_per_split: int = 4, seed: int = 0
) -> FakeSplits:
    """Write `fgvc-aircraft-2013b/data/`: variants.txt, images_variant_{trainval,test}.txt, images/*.jpg."""
    rng = np.random.default_rng(seed)
    data = Path(root) / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("\n".join(classes) + "\n")
    labels = {}
    for split in ("trainval", "test"):
        labels[split] = _balanced_labels(n_per_split, len(classes), rng).tolist()
        names = [f"{split}{i:05d}" for i in range(n_per_split)]
        for name in names:
            _write_image(data / "images" / f"{name}.jpg", rng)
        (data / f"images_variant_{split}.txt").write_text(
            "".join(f"{n} {classes[y]}\n" for n, y in zip(names, labels[split]))
        )
    return FakeSplits(Path(root), labels, list(classes))


def make_fake_flowers102(root, *, num_classes: int = 3, n_per_split: int = 4, seed: int = 0) -> FakeSplits:
    """Write `flowers-102/`: jpg/image_%05d.jpg, imagelabels.mat (1-based labels), setid.mat.

    Labels in the result are 0-based, as torchvision returns them; call `patch_md5` before loading.
    """
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    base = Path(root) / "flowers-102"
    splits = {"train": "trnid", "val": "valid", "test": "tstid"}
    n = n_per_split * len(splits)
    all_labels = _balanced_labels(n, num_classes, rng)
    ids = rng.permutation(np.arange(1, n + 1)).reshape(len(splits), n_per_split)  # image ids are 1-based
    for image_id in range(1, n + 1):
        _write_image(base / "jpg" / f"image_{image_id:05d}.jpg", rng)
    savemat(base / "imagelabels.mat", {"labels": (all_labels + 1)[None, :]})
    savemat(base / "setid.mat", {key: ids[k][None, :] for k, key in enumerate(splits.values())})
    labels = {split: all_labels[ids[k] - 1].tolist() for k, split in enumerate(splits)}
    md5 = {name: md5_of(base / name) for name in ("imagelabels.mat", "setid.mat")}
    return FakeSplits(Path(root), labels, [], md5)
