"""Cases run by tests/test_distributed.py in each process of a 2-process torchrun job (gloo):

    torchrun --nproc-per-node 2 tests/distributed_cases.py CASE OUT

Each rank writes what it ended up with to OUT/rank_K.pt for the test to compare.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.conftest

from colam import distributed  # noqa: E402
from colam.errors import ColamError  # noqa: E402
from colam.soft_labels import OutputSums  # noqa: E402


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


def model(out: Path, world) -> dict:
    """check_same_model must refuse replicas whose weights differ on one rank."""
    torch.manual_seed(0)  # the same weights on every rank
    net = torch.nn.Linear(3, 2)
    distributed.check_same_model(net, "stage 1 model")  # the same everywhere: no error
    with torch.no_grad():
        net.bias.fill_(float(world.rank))
    try:
        distributed.check_same_model(net, "stage 1 model")
    except ColamError as exc:
        return {"error": str(exc)}
    return {"error": None}


def steps(out: Path, world) -> dict:
    """A pipeline step under torchrun with online estimation: the state it saves holds the sums of
    every rank's samples, and the estimate step reads them back."""
    from colam.config import load_config
    from colam.steps import estimate_step, step_config, train_step
    from tests.conftest import TINY

    config = step_config(load_config(None, TINY + ["method.colam.estimation=online", "method.colam.peers=3"]).to_dict(),
                         steps=2)
    train_step(config, 1, 2, out / "train_1")
    summary = estimate_step(config, 1, 2, out / "train_1", out / "estimate_1")
    state = torch.load(out / "train_1" / "state.pt", weights_only=True)
    sums = state["method"]["online_sums"]
    return {"counts": sums["counts"].sum().item(), "seen": sums["seen"].sum().item(), "artifacts": summary["artifacts"]}


if __name__ == "__main__":
    case, out = sys.argv[1], Path(sys.argv[2])
    world, _ = distributed.init("cpu")
    result = {"sums": sums, "differ": differ, "model": model, "steps": steps}[case](out, world)
    torch.save({**result, "world": (world.rank, world.size)}, out / f"rank_{world.rank}.pt")
    distributed.shutdown()
