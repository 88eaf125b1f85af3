"""The trainer's batches of (images, labels, positions), from a DataLoader (`LoaderFeed`) or cut from the split held
on the device (`ResidentFeed`, `train.data_on_device`), in an order and augmentation drawn from (seed, epoch): each
path draws in its own way, so the two give different (equally valid) runs."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from colam.config import Config
from colam.data import TrainingData, loader
from colam.distributed import ShardedBatches, World
from colam.errors import ColamError
from colam.seeding import derive_seed


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A seed for one epoch; separate streams keep shuffling independent of augmentation draws."""
    return derive_seed(seed, epoch * 7919 + stream * 104_729)


def global_seed(seed: int, epoch: int, world: World) -> int:
    """torch's global seed in an epoch (loader augmentation, dropout): rank 0's is the single-process stream."""
    return epoch_seed(seed, epoch, stream=2 * world.rank)


def wants_resident(config: Config, data: TrainingData, device: torch.device) -> bool:
    """train.data_on_device resolved: auto holds data on a CUDA device when it has a tensor form."""
    setting = config.train.data_on_device
    if setting == "auto":
        return device.type == "cuda" and data.tensors is not None
    if setting and data.tensors is None:
        raise ColamError(f"train.data_on_device: data set '{config.data.name}' has no tensor form to hold on the "
                         f"device (it is read file by file); set it to auto or false")
    return bool(setting)


class LoaderFeed:
    def __init__(self, data: TrainingData, config: Config, device: torch.device, world: World):
        self.data, self.config, self.world = data, config, world
        self.pin = device.type == "cuda"

    def _load(self, dataset, batch_size: int, seed: int | None, sharded: bool) -> DataLoader:
        """`dataset` shuffled from `seed` (None: in order); `sharded`: this rank's share of every global batch."""
        workers = self.config.data.num_workers
        if not sharded:
            return loader(dataset, batch_size, shuffle=seed is not None, num_workers=workers, seed=seed,
                          pin_memory=self.pin)
        sampler = ShardedBatches(len(dataset), batch_size, seed or 0, self.world, shuffle=seed is not None)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=self.pin)

    def train(self, epoch: int):
        seed = epoch_seed(self.config.seed, epoch, stream=1)
        return self._load(self.data.train, self.config.train.batch_size, seed, self.world.distributed)

    def evaluation(self, name: str):
        """The val or test split in order (None when there is no such split)."""
        split = getattr(self.data, name)
        return None if split is None else self._load(split, self.config.train.eval_batch_size, None, False)

    def estimation(self):
        """The training set without augmentation; under torchrun, this rank's share of it."""
        size = self.config.train.eval_batch_size * self.world.size
        return self._load(self.data.train_eval, size, None, self.world.distributed)


class ResidentFeed:
    def __init__(self, data: TrainingData, config: Config, device: torch.device, world: World):
        tensors = data.tensors
        self.config, self.world, self.device = config, world, device
        self.pad, self.flip, self.bytes = tensors.pad, tensors.flip, tensors.train.dtype == torch.uint8
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                               for v in (tensors.mean, tensors.std))
        views = {"train": (tensors.train, data.train), "val": (tensors.train, data.val),
                 "test": (tensors.test, data.test)}
        self.splits = {name: (images[torch.as_tensor(split.indices, dtype=torch.long)].to(device).contiguous(),
                              torch.as_tensor(split.targets, dtype=torch.long).to(device))
                       for name, (images, split) in views.items() if split is not None}

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random crop of each image's size out of the image zero-padded by `pad` on every side,
        mirrored left-right with probability 1/2 (`flip`): one gather for the whole batch."""
        n, channels, height, width = images.shape
        images = F.pad(images, (self.pad,) * 4)
        offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=generator, device=images.device)
        rows = offsets[0, :, None] + torch.arange(height, device=images.device)
        cols = offsets[1, :, None] + torch.arange(width, device=images.device)
        if self.flip:
            mirrored = torch.rand(n, generator=generator, device=images.device) < 0.5
            cols = torch.where(mirrored[:, None], cols.flip(1), cols)
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        channel = torch.arange(channels, device=images.device)[None, :, None, None]
        return images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]

    def _batches(self, split: str, batch_size: int, world: World, seed: int | None = None,
                 generator: torch.Generator | None = None) -> Iterator:
        """`split` in batches shuffled from `seed` (None: in order), augmented from `generator` (None: not)."""
        images, targets = self.splits[split]
        parts = ShardedBatches(len(targets), batch_size, seed or 0, world, shuffle=seed is not None).index_batches()
        if not parts:
            return
        order = torch.cat(parts).to(self.device, non_blocking=True)
        for index in order.split([len(p) for p in parts]):
            chosen = images[index] if generator is None else self.augment(images[index], generator)
            x = chosen.float().div(255) if self.bytes else chosen.float()  # ToTensor + Normalize
            yield x.sub(self.mean).div(self.std), targets[index], index

    def train(self, epoch: int):
        seed = self.config.seed
        generator = torch.Generator(device=self.device).manual_seed(epoch_seed(seed, epoch, 2 * self.world.rank + 3))
        return self._batches("train", self.config.train.batch_size, self.world, epoch_seed(seed, epoch, stream=1),
                             generator)

    def evaluation(self, name: str):
        return self._batches(name, self.config.train.eval_batch_size, World()) if name in self.splits else None

    def estimation(self):
        return self._batches("train", self.config.train.eval_batch_size * self.world.size, self.world)


def make_feed(data: TrainingData, config: Config, device: torch.device, world: World) -> LoaderFeed | ResidentFeed:
    return (ResidentFeed if wants_resident(config, data, device) else LoaderFeed)(data, config, device, world)
