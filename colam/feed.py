"""Where the trainer's batches come from.

Two paths give batches of (images, labels, positions in the split):

- `LoaderFeed`: a DataLoader over the data set, any size (ImageNet): transforms per sample in
  `data.num_workers` processes, pinned memory and non-blocking copies when training on a GPU.
- `ResidentFeed` (`train.data_on_device`): the whole split held as one tensor on the device,
  batches cut and augmented there (random crop from the zero-padded image, horizontal flip,
  normalisation), with no DataLoader and no host-to-device copy per step. For data sets with a
  tensor form (`colam.datasets.ImageTensors`: CIFAR, digits); CIFAR-100's training set is
  150 MB of uint8.

Both follow the run's seed: an epoch's order comes from (seed, epoch) and so does its
augmentation, so the same config gives the same numbers again on the same path. The two paths
draw their random numbers differently, so they give different (equally valid) runs. Under
torchrun both deal every global batch out over the ranks (`colam.distributed.ShardedBatches`).
"""

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
    """The seed of torch's global generator in an epoch (loader-path augmentation, dropout, method
    draws): rank 0 has the single-process stream, every other rank one of its own."""
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

    def train(self, epoch: int):
        t, workers = self.config.train, self.config.data.num_workers
        seed = epoch_seed(self.config.seed, epoch, stream=1)
        if not self.world.distributed:
            return loader(self.data.train, t.batch_size, shuffle=True, num_workers=workers, seed=seed,
                          pin_memory=self.pin)
        return DataLoader(self.data.train, batch_sampler=ShardedBatches(len(self.data.train), t.batch_size, seed,
                                                                        self.world),
                          num_workers=workers, pin_memory=self.pin)

    def evaluation(self, name: str):
        """The val or test split in order (None when there is no such split)."""
        split = getattr(self.data, name)
        if split is None:
            return None
        return loader(split, self.config.train.eval_batch_size, shuffle=False,
                      num_workers=self.config.data.num_workers, pin_memory=self.pin)

    def estimation(self):
        """The training set without augmentation; under torchrun, this rank's share of it."""
        size = self.config.train.eval_batch_size
        if not self.world.distributed:
            return loader(self.data.train_eval, size, shuffle=False, num_workers=self.config.data.num_workers,
                          pin_memory=self.pin)
        sampler = ShardedBatches(len(self.data.train_eval), size * self.world.size, 0, self.world, shuffle=False)
        return DataLoader(self.data.train_eval, batch_sampler=sampler, num_workers=self.config.data.num_workers,
                          pin_memory=self.pin)


class ResidentFeed:
    def __init__(self, data: TrainingData, config: Config, device: torch.device, world: World):
        tensors = data.tensors
        self.config, self.world, self.device = config, world, device
        self.pad, self.flip = tensors.pad, tensors.flip
        self.scale = 1 / 255 if tensors.train.dtype == torch.uint8 else None
        self.mean = torch.tensor(tensors.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(tensors.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

        def hold(images: torch.Tensor, index, targets) -> tuple[torch.Tensor, torch.Tensor]:
            chosen = images[torch.as_tensor(index, dtype=torch.long)] if index is not None else images
            return chosen.to(device).contiguous(), torch.as_tensor(targets, dtype=torch.long).to(device)

        self.splits = {"train": hold(tensors.train, data.train.indices, data.train.targets),
                       "test": hold(tensors.test, data.test.indices, data.test.targets)}
        if data.val is not None:
            self.splits["val"] = hold(tensors.train, data.val.indices, data.val.targets)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the model's input: to float in [0, 1], then normalised (ToTensor + Normalize)."""
        x = images.float()
        if self.scale is not None:
            x = x.div(255)
        return x.sub(self.mean).div(self.std)

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random crop of each image's size out of the image zero-padded by `pad` on every side,
        mirrored left-right with probability 1/2 (`flip`): one gather for the whole batch."""
        n, channels, height, width = images.shape
        if self.pad:
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

    def _batches(self, split: str, sampler: ShardedBatches, generator: torch.Generator | None) -> Iterator:
        images, targets = self.splits[split]
        parts = sampler.index_batches()
        if not parts:
            return
        order = torch.cat(parts).to(self.device, non_blocking=True)
        for index in order.split([len(p) for p in parts]):
            chosen = images[index]
            if generator is not None:
                chosen = self.augment(chosen, generator)
            yield self._inputs(chosen), targets[index], index

    def train(self, epoch: int):
        seed, t = self.config.seed, self.config.train
        generator = torch.Generator(device=self.device)
        generator.manual_seed(epoch_seed(seed, epoch, stream=2 * self.world.rank + 3))
        sampler = ShardedBatches(len(self.splits["train"][1]), t.batch_size, epoch_seed(seed, epoch, stream=1),
                                 self.world)
        return self._batches("train", sampler, generator)

    def evaluation(self, name: str):
        if name not in self.splits:
            return None
        size = len(self.splits[name][1])
        return self._batches(name, ShardedBatches(size, self.config.train.eval_batch_size, 0, World(), shuffle=False),
                             None)

    def estimation(self):
        size = len(self.splits["train"][1])
        sampler = ShardedBatches(size, self.config.train.eval_batch_size * self.world.size, 0, self.world,
                                 shuffle=False)
        return self._batches("train", sampler, None)


def make_feed(data: TrainingData, config: Config, device: torch.device, world: World) -> LoaderFeed | ResidentFeed:
    cls = ResidentFeed if wants_resident(config, data, device) else LoaderFeed
    return cls(data, config, device, world)
