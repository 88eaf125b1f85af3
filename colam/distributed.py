"""Data-parallel training under `torchrun` (docs/scale.md): one process per device, NCCL on GPUs, gloo on CPUs.
Without RANK, LOCAL_RANK and WORLD_SIZE (or with WORLD_SIZE=1) all here is a no-op: the single-process run."""

from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from colam.errors import ColamError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def env_world() -> World:
    """The process's place in the job as torchrun (or a PyTorchJob) describes it in the environment."""
    rank, size = _env_number("RANK", int, 0), _env_number("WORLD_SIZE", int, 1)
    local = _env_number("LOCAL_RANK", int, rank)
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ColamError(f"RANK/WORLD_SIZE: rank {rank} of world size {size} in the environment is not a valid place")
    return World(rank, size, local)


def init(device_name: str) -> tuple[World, str]:
    """Join the job the environment describes: the world and this rank's device (cuda:LOCAL_RANK for CUDA)."""
    world = env_world()
    if not world.distributed:
        return world, device_name
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if world.local_rank >= torch.cuda.device_count():
            raise ColamError(f"LOCAL_RANK: {world.local_rank} but this node has {torch.cuda.device_count()} CUDA "
                             f"device(s); start at most that many processes per node")
        device_name = f"cuda:{world.local_rank}"
        torch.cuda.set_device(world.local_rank)
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():  # the timeout: how long a collective may wait for the other ranks
        minutes = _env_number("COLAM_DIST_TIMEOUT_MIN", float, 30.0, "a positive number of minutes", lambda m: m > 0)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=minutes))
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise ColamError(f"WORLD_SIZE/RANK: the process group ({dist.get_rank()} of {dist.get_world_size()}) "
                         f"differs from the environment ({world.rank} of {world.size})")
    return world, device_name


def _env_number(key: str, kind: type, default, what: str = "an integer in the environment",
                valid=lambda value: True):
    text = os.environ.get(key)
    if text is None:
        return default
    with suppress(ValueError):
        if valid(value := kind(text)):
            return value
    raise ColamError(f"{key}: expected {what}, got {text!r}")


def current() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), env_world().local_rank)
    return SINGLE


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if current().distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def check_identical(tensor: torch.Tensor, what: str) -> None:
    """Raise unless every rank holds exactly rank 0's `tensor`."""
    if not current().distributed:
        return
    reference = tensor.clone()
    dist.broadcast(reference, src=0)
    differs = all_reduce_sum(torch.tensor([float(not torch.equal(reference, tensor))], device=tensor.device)).item()
    if differs:
        raise ColamError(f"distributed training: {what} differ between ranks ({int(differs)} of "
                         f"{current().size} differ from rank 0)")


def check_same_model(model: torch.nn.Module, what: str) -> None:
    """Raise unless every rank's model equals rank 0's (sum and sum of squares of every floating tensor of the
    state, compared exactly), so the ranks' stage-end passes, whose sums are all-reduced, are of one model."""
    if not current().distributed:
        return
    state = [t.detach().double() for t in model.state_dict().values() if t.is_floating_point()]
    check_identical(torch.stack([torch.stack([t.sum(), t.square().sum()]) for t in state]).flatten(), what)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics): DistributedDataParallel broadcasts them at the
    start of each forward, so after an epoch's last step each rank holds its own."""
    if current().distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().distributed:
        dist.barrier()


class ShardedBatches(torch.utils.data.Sampler):
    """One rank's batches of positions: global batches of `batch_size` cut from a permutation of range(n) drawn
    from `seed` (the same on every rank), sample i of each going to rank i mod size."""

    def __init__(self, n: int, batch_size: int, seed: int, world: World, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.world, self.shuffle = n, batch_size, seed, world, shuffle

    def index_batches(self) -> list[torch.Tensor]:
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)) if self.shuffle
                 else torch.arange(self.n))
        # a shuffled batch smaller than the world is dropped: in lockstep, every rank needs a share of each one
        mine = [whole[self.world.rank::self.world.size] for whole in order.split(self.batch_size)
                if not (self.shuffle and len(whole) < self.world.size)]
        return [batch for batch in mine if len(batch)]

    def __iter__(self):
        return (b.tolist() for b in self.index_batches())

    def __len__(self) -> int:
        return len(self.index_batches())
