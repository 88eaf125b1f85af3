"""From a raw data set to what training needs: the training subset, a validation split, label
noise, and datasets that also return each sample's index (per-sample soft labels need it).

Subset, split and noise depend only on `data.split_seed`, never on the training seed, so runs
over several seeds see the same data and the same noisy labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from colam.config import DataConfig
from colam.datasets import build_raw_data
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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.train_targets, minlength=self.num_classes).tolist()


def build_data(cfg: DataConfig) -> TrainingData:
    raw = build_raw_data(cfg.name, cfg.root, download=cfg.download)
    num_classes = len(raw.classes)
    if num_classes < 2:
        raise ColamError(f"data: '{cfg.name}' under '{cfg.root}' has {num_classes} class(es); classification needs 2 or more")
    rng = np.random.default_rng(cfg.split_seed)
    labels = np.asarray(raw.train_targets, dtype=np.int64)
    kept = np.arange(len(labels))
    if cfg.train_subset is not None:
        if cfg.train_subset > len(labels):
            raise ColamError(f"data.train_subset: {cfg.train_subset} exceeds the {len(labels)} training samples of "
                             f"'{cfg.name}'")
        kept = stratified_sample(labels, cfg.train_subset, rng)
    val_idx = np.array([], dtype=np.int64)
    if cfg.val_fraction > 0:
        chosen = stratified_sample(labels[kept], round(cfg.val_fraction * len(kept)), rng)
        val_idx = kept[chosen]
        kept = np.delete(kept, chosen)
    clean = labels[kept]
    noisy = symmetric_noise(clean, num_classes, cfg.label_noise, rng)
    missing = sorted(set(range(num_classes)) - set(noisy.tolist()))
    if missing:
        raise ColamError(f"data: class(es) {missing} of '{cfg.name}' have no training samples after "
                         f"train_subset/val_fraction; use more training samples")
    test_labels = np.asarray(raw.test_targets, dtype=np.int64)
    return TrainingData(
        train=Indexed(raw.train, kept, noisy),
        train_eval=Indexed(raw.train_eval, kept, noisy),
        val=Indexed(raw.train_eval, val_idx, labels[val_idx]) if len(val_idx) else None,
        test=Indexed(raw.test, np.arange(len(test_labels)), test_labels),
        train_targets=torch.from_numpy(noisy),
        clean_train_targets=torch.from_numpy(clean),
        classes=list(raw.classes),
        in_channels=raw.in_channels,
        image_size=raw.image_size,
    )


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` positions of `labels`, sorted, with class proportions kept (largest remainders)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: size - take.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def symmetric_noise(labels: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Flip round(rate * N) labels, chosen at random, to a different class chosen uniformly."""
    noisy = labels.copy()
    flipped = rng.choice(len(labels), round(rate * len(labels)), replace=False)
    shift = rng.integers(1, num_classes, size=len(flipped))  # never 0: the label always changes
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool, num_workers: int, seed: int | None = None,
           pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose order and worker seeds follow `seed` (so an epoch can be replayed)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=generator, pin_memory=pin_memory, drop_last=False,
                      persistent_workers=False)
