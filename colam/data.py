"""From a raw data set to what training needs: training subset, validation split and label noise, drawn from
`data.split_seed` alone (docs/datasets.md), and datasets that return each sample's index (per-sample labels)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from colam import io as cio
from colam.config import DataConfig
from colam.datasets import ImageTensors, RawData, build_raw_data, dataset_spec
from colam.errors import ColamError


class Indexed(Dataset):
    """`base` restricted to `indices`, with labels replaced by `targets`; items are (x, y, i)."""

    def __init__(self, base: Dataset, indices: np.ndarray, targets: np.ndarray):
        self.base, self.indices, self.targets = base, indices, targets

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, _ = self.base[int(self.indices[i])]
        return image, int(self.targets[i]), i


@dataclass
class TrainingData:
    train: Indexed  # augmented training samples, labels possibly noisy
    train_eval: Indexed  # the same samples in the same order, no augmentation (soft-label estimation)
    val: Indexed | None  # held out from the training split
    test: Indexed
    train_targets: torch.Tensor  # the labels training sees (after noise)
    clean_train_targets: torch.Tensor  # the data set's own labels of the same samples
    classes: list[str]
    in_channels: int
    image_size: int
    tensors: ImageTensors | None = None  # the raw data set as tensors (train.data_on_device), indexed by the splits

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.train_targets, minlength=self.num_classes).tolist()


@dataclass
class Split:
    """Which samples training sees and with which labels: everything `data.*` decides but the images."""

    train_index: np.ndarray  # positions in the raw training set, sorted
    train_targets: np.ndarray  # the labels training sees (after noise)
    clean_train_targets: np.ndarray  # the raw data set's labels of the same samples
    val_index: np.ndarray  # held out from the raw training set


# The keys of `data` that decide the split; a saved split records them and must match the config.
SPLIT_KEYS = ("name", "train_subset", "val_fraction", "label_noise", "noise_type", "split_seed")
_SPLIT_KEY_DEFAULTS = {"noise_type": "symmetric"}  # what a split saved before a key existed was drawn with


def build_data(cfg: DataConfig, split_dir: str | Path | None = None) -> TrainingData:
    """The training data of `cfg`; with `split_dir`, the split saved there by `save_split`."""
    raw = _raw_data(cfg)
    split = draw_split(cfg, raw) if split_dir is None else load_split(split_dir, cfg, raw)
    val = Indexed(raw.train_eval, split.val_index, raw.train_targets[split.val_index]) if len(split.val_index) else None
    return TrainingData(
        train=Indexed(raw.train, split.train_index, split.train_targets),
        train_eval=Indexed(raw.train_eval, split.train_index, split.train_targets), val=val,
        test=Indexed(raw.test, np.arange(len(raw.test_targets)), raw.test_targets),
        train_targets=torch.from_numpy(split.train_targets),
        clean_train_targets=torch.from_numpy(split.clean_train_targets),
        classes=list(raw.classes), in_channels=raw.in_channels, image_size=raw.image_size, tensors=raw.tensors)


def _raw_data(cfg: DataConfig) -> RawData:
    raw = build_raw_data(cfg.name, cfg.root, download=cfg.download)
    if len(raw.classes) < 2:
        where = f"data.root: '{cfg.root}'" if dataset_spec(cfg.name).needs_files else f"data.name: '{cfg.name}'"
        raise ColamError(f"{where} holds {len(raw.classes)} class(es) of {cfg.name}; classification needs 2 or more")
    return raw


def draw_split(cfg: DataConfig, raw: RawData) -> Split:
    """Subset, validation split and label noise, drawn from `data.split_seed` alone."""
    num_classes, labels, rng = len(raw.classes), raw.train_targets, np.random.default_rng(cfg.split_seed)
    kept = np.arange(len(labels))
    _require_every_class(labels, num_classes, "data.root", cfg.root, f"the training split of {cfg.name}")
    if cfg.train_subset is not None:
        if cfg.train_subset > len(labels):
            raise ColamError(f"data.train_subset: {cfg.train_subset} exceeds the {len(labels)} training samples of "
                             f"'{cfg.name}'")
        kept = stratified_sample(labels, cfg.train_subset, rng)
        _require_every_class(labels[kept], num_classes, "data.train_subset", cfg.train_subset,
                             f"keeping {len(kept)} of the {len(labels)} training samples")
    val_idx = np.array([], dtype=np.int64)
    if cfg.val_fraction > 0:
        chosen = stratified_sample(labels[kept], round(cfg.val_fraction * len(kept)), rng)
        val_idx = kept[chosen]
        kept = np.delete(kept, chosen)
        _require_every_class(labels[kept], num_classes, "data.val_fraction", cfg.val_fraction,
                             f"holding out {len(val_idx)} of {len(kept) + len(val_idx)} samples")
    clean = labels[kept]
    if cfg.noise_type not in NOISE:
        raise ColamError(f"data.noise_type: must be {' or '.join(NOISE_TYPES)}, got {cfg.noise_type!r}")
    noisy = NOISE[cfg.noise_type](clean, num_classes, cfg.label_noise, rng)
    _require_every_class(noisy, num_classes, "data.label_noise", cfg.label_noise, "flipping the labels")
    return Split(kept, noisy, clean, val_idx)


def _require_every_class(labels: np.ndarray, num_classes: int, key: str, value: object, what: str) -> None:
    """Every class keeps a training sample (soft labels, class-wise methods and accuracy need one)."""
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ColamError(f"{key}: {what} leaves {len(missing)} of the {num_classes} classes ({shown}) with no "
                         f"training samples, got {value!r}")


def save_split(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Draw the split of `cfg` and write it to `out_dir` (split.npz + split.json); returns the summary."""
    raw, out_dir = _raw_data(cfg), Path(out_dir)
    split = draw_split(cfg, raw)
    cio.take_folder(out_dir, "split")
    archive = cio.npz_bytes({name: getattr(split, name).astype(np.int64) for name in Split.__dataclass_fields__})
    cio.atomic_write_bytes(out_dir / "split.npz", archive)
    counts = np.bincount(split.train_targets, minlength=len(raw.classes)).tolist()
    summary = {"data": {k: getattr(cfg, k) for k in SPLIT_KEYS}, "classes": list(raw.classes),
               "raw_train_samples": len(raw.train_targets), "raw_test_samples": len(raw.test_targets),
               "train_samples": len(split.train_index), "val_samples": len(split.val_index),
               "test_samples": len(raw.test_targets), "train_samples_per_class": counts,
               "noisy_labels": int((split.train_targets != split.clean_train_targets).sum()),
               "npz_sha256": hashlib.sha256(archive).hexdigest()}  # split.npz is read back only if it matches
    cio.write_json(out_dir / "split.json", summary)
    return summary


def load_split(split_dir: str | Path, cfg: DataConfig, raw: RawData) -> Split:
    """The split saved in `split_dir`, after checking it belongs to `cfg` and to this raw data."""
    split_dir = Path(split_dir)
    for path in (split_dir / "split.json", split_dir / "split.npz"):
        if path.exists():
            cio.check_file(path, "--split")  # a FIFO or a folder: refused by type, not read
    try:
        summary = json.loads((split_dir / "split.json").read_text())
        with np.load(split_dir / "split.npz", allow_pickle=False) as arrays:
            split = Split(**{k: arrays[k] for k in Split.__dataclass_fields__})
        saved = {key: {**_SPLIT_KEY_DEFAULTS, **summary["data"]}[key] for key in SPLIT_KEYS}
    except FileNotFoundError as exc:
        raise ColamError(f"--split: '{split_dir}' holds no prepared split ({Path(exc.filename).name} is missing); "
                         f"run `colam prepare` first") from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise ColamError(f"--split: '{split_dir}' is not a readable prepared split ({type(exc).__name__})") from None
    recorded = summary.get("npz_sha256")  # absent from splits prepared before it was recorded
    if recorded is not None and cio.sha256_file(split_dir / "split.npz", "--split") != recorded:
        raise ColamError(f"--split: '{split_dir / 'split.npz'}' is not the split its split.json describes (another "
                         f"sha256); prepare the split again")
    for key in SPLIT_KEYS:
        if saved[key] != getattr(cfg, key):
            raise ColamError(f"--split: '{split_dir}' was prepared with data.{key}={saved[key]!r}, the config has "
                             f"{getattr(cfg, key)!r}; prepare the split again")
    if not _consistent(split, summary, raw):
        raise ColamError(f"--split: '{split_dir}' does not match the data set '{cfg.name}' under data.root "
                         f"'{cfg.root}' (other samples or labels); prepare the split again")
    return split


def _consistent(split: Split, summary: dict, raw: RawData) -> bool:
    """Integer indices into this raw data, train and validation disjoint, labels the raw data's own."""
    labels = raw.train_targets
    if any(a.ndim != 1 or a.dtype.kind not in "iu" for a in vars(split).values()):
        return False
    index = np.concatenate([split.train_index, split.val_index])
    return (summary.get("raw_train_samples") == len(labels) and summary.get("raw_test_samples") == len(raw.test_targets)
            and len(split.train_targets) == len(split.clean_train_targets) == len(split.train_index)
            and (not len(index) or (index.min() >= 0 and index.max() < len(labels)))
            and len(np.unique(index)) == len(index)
            and np.array_equal(labels[split.train_index], split.clean_train_targets)
            and bool(((split.train_targets >= 0) & (split.train_targets < len(raw.classes))).all()))


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` positions of `labels`, sorted, with class proportions kept (largest remainders)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: size - take.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def symmetric_noise(labels: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Flip round(rate * N) random labels, each to a uniformly drawn other class (Patrini 2017, Han 2018)."""
    noisy = labels.copy()
    flipped = rng.choice(len(labels), round(rate * len(labels)), replace=False)
    shift = rng.integers(1, num_classes, size=len(flipped))  # never 0: the label always changes
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy


def asymmetric_noise(labels: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Pair flip (Han et al. 2018, Co-teaching, Sec. 4): round(rate * N) labels go from class c to c + 1 mod C,
    drawn per class (`stratified_sample`) so each class loses as close to `rate` of its samples as integers allow."""
    noisy = labels.copy()
    flipped = stratified_sample(labels, round(rate * len(labels)), rng)
    noisy[flipped] = (labels[flipped] + 1) % num_classes
    return noisy


# data.noise_type -> the function drawing it: exactly round(rate * N) labels, each to another class.
NOISE = {"symmetric": symmetric_noise, "asymmetric": asymmetric_noise}
NOISE_TYPES = tuple(NOISE)


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool, num_workers: int, seed: int | None = None,
           pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose order and worker seeds follow `seed` (so an epoch can be replayed)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=generator,
                      pin_memory=pin_memory)
