"""Data-parallel training under `torchrun`: one process per device, gradients averaged by
DistributedDataParallel, NCCL on GPUs and gloo on CPUs.

    torchrun --standalone --nproc-per-node 4 -m pipelines.cli train --config FILE --out DIR

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `init` reads them. Without them (or with
WORLD_SIZE=1) everything here is a no-op and a run is the single-process run, bit for bit.

What a distributed run shares, and how:
- train.batch_size is the global batch: every global batch of the epoch's permutation (the same
  on every rank) is dealt out, sample i of it to rank i mod WORLD_SIZE (`shard`);
- the soft-label sums and counts (and, with a peer count, the training-set outputs) are
  all-reduced, so every rank holds the identical soft-label matrix (`all_reduce_sum`), and
  before each stage end `check_same_model` proves the ranks estimate from one model;
- rank 0 alone evaluates, writes files and reports to the run log; `out_dir` must be a folder
  every rank can read (one node, or a shared volume), since a resumed run reads its checkpoint
  on every rank.
"""

from __future__ import annotations

import os
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
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(key)
        if text is None:
            values[key] = None
            continue
        try:
            values[key] = int(text)
        except ValueError:
            raise ColamError(f"{key}: expected an integer in the environment, got {text!r}") from None
    size = values["WORLD_SIZE"] if values["WORLD_SIZE"] is not None else 1
    rank = values["RANK"] if values["RANK"] is not None else 0
    local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ColamError(f"RANK/WORLD_SIZE: rank {rank} of world size {size} in the environment is not a valid place")
    return World(rank, size, local)


def init(device_name: str) -> tuple[World, str]:
    """Join the job the environment describes; returns the world and the device this rank uses
    (cuda:LOCAL_RANK when `device_name` asks for CUDA, else what it names)."""
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
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=_timeout_minutes()))
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise ColamError(f"WORLD_SIZE/RANK: the process group ({dist.get_rank()} of {dist.get_world_size()}) "
                         f"differs from the environment ({world.rank} of {world.size})")
    return world, device_name


def _timeout_minutes() -> float:
    """How long a collective may wait for the other ranks (COLAM_DIST_TIMEOUT_MIN, default 30)."""
    text = os.environ.get("COLAM_DIST_TIMEOUT_MIN", "30")
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0:
        raise ColamError(f"COLAM_DIST_TIMEOUT_MIN: expected a positive number of minutes, got {text!r}")
    return minutes


def current() -> World:
    """The world of an initialised process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), env_world().local_rank)
    return SINGLE


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (a no-op for one process); returns it."""
    if current().distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def check_identical(tensor: torch.Tensor, what: str) -> None:
    """Raise unless every rank holds exactly rank 0's `tensor`."""
    if not current().distributed:
        return
    reference = tensor.clone()
    dist.broadcast(reference, src=0)
    differs = torch.tensor([float(not torch.equal(reference, tensor))], device=tensor.device)
    dist.all_reduce(differs, op=dist.ReduceOp.SUM)
    if differs.item():
        raise ColamError(f"distributed training: {what} differ between ranks ({int(differs.item())} of "
                         f"{current().size} differ from rank 0)")


def check_same_model(model: torch.nn.Module, what: str) -> None:
    """Raise unless every rank's model equals rank 0's: a fingerprint (sum and sum of squares of
    every floating tensor of the state) compared exactly, so the ranks' stage-end passes, whose
    sums are all-reduced, are passes of one model."""
    if not current().distributed:
        return
    state = [t.detach().double() for t in model.state_dict().values() if t.is_floating_point()]
    fingerprint = torch.stack([torch.stack([t.sum(), t.square().sum()]) for t in state]).flatten()
    check_identical(fingerprint, what)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DistributedDataParallel
    broadcasts them at the start of each forward, so after an epoch's last step each rank holds
    its own: without this the ranks' stage-end passes would run different models."""
    if current().distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def shutdown() -> None:
    """Leave the process group at the end of a command (a no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def shard(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's share of a global batch of indices: positions rank, rank + size, ..."""
    return batch[world.rank::world.size]


class ShardedBatches(torch.utils.data.Sampler):
    """Batches of dataset positions for one rank: a permutation of range(n) drawn from `seed` (the
    same on every rank), cut into global batches of `batch_size`, each dealt out over the ranks.

    The last global batch is dropped when it has fewer samples than ranks (a rank would get none).
    """

    def __init__(self, n: int, batch_size: int, seed: int, world: World, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.world, self.shuffle = n, batch_size, seed, world, shuffle

    def index_batches(self) -> list[torch.Tensor]:
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)) if self.shuffle
                 else torch.arange(self.n))
        batches = []
        for start in range(0, self.n, self.batch_size):
            whole = order[start:start + self.batch_size]
            if self.shuffle and len(whole) < self.world.size:
                continue  # training steps in lockstep: every rank needs a share of every batch
            mine = shard(whole, self.world)
            if len(mine):
                batches.append(mine)
        return batches

    def __iter__(self):
        return (b.tolist() for b in self.index_batches())

    def __len__(self) -> int:
        return len(self.index_batches())
