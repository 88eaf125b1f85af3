"""Cases run by tests/test_distributed.py in each process of a 2-process torchrun job (gloo):

    torchrun --nproc-per-node 2 tests/distributed_cases.py CASE OUT

Each rank writes what it ended up with to OUT/rank_K.pt for the test to compare.
"""

import sys
from pathlib import Path

import torch

from colam import distributed
from colam.errors import ColamError
from colam.soft_labels import OutputSums


def sums(out: Path, world) -> dict:
    """Each rank adds its share of the same outputs; after reduce, every rank has the whole."""
    g = torch.Generator().manual_seed(0)
    outputs, targets = torch.randn(57, 5, generator=g), torch.randint(0, 5, (57,), generator=g)
    acc = OutputSums(5, "logits", num_samples=57)
    for index in distributed.ShardedBatches(57, 8, 0, world, shuffle=False).index_batches():
        acc.add(outputs[index], targets[index], index)
    acc.reduce()
    return {"labels": acc.class_labels(2.0), "outputs": acc.sample_outputs(), "counts": acc.counts}


def differ(out: Path, world) -> dict:
    """check_identical must refuse a tensor that differs on one rank, on every rank."""
    try:
        distributed.check_identical(torch.tensor([1.0, float(world.rank)]), "stage 1 soft_labels")
    except ColamError as exc:
        return {"error": str(exc)}
    return {"error": None}


if __name__ == "__main__":
    case, out = sys.argv[1], Path(sys.argv[2])
    world, _ = distributed.init("cpu")
    result = {"sums": sums, "differ": differ}[case](out, world)
    torch.save({**result, "world": (world.rank, world.size)}, out / f"rank_{world.rank}.pt")
    distributed.shutdown()
