"""COLAM's soft-label step (Li et al. 2022, Sec. 3.3, Algorithm 1 lines 9-14): a sample's soft label minimises
sum_{peers} 1/2 ||y - f(x_peer)||^2 (Eq. 6), so it is softmax(mean of the peers' outputs / T). All same-class samples
as peers give a C x C matrix; k random peers give each sample its own label (N x C, Sec. 5.3). `OutputSums` gathers
the outputs batch by batch, summed over the ranks of a torchrun job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from colam import distributed
from colam import io as cio
from colam.errors import ColamError, first_line

AGGREGATIONS = ("logits", "probs")
ESTIMATIONS = ("pass", "online")
PEER_LABELS = ("sample", "class")
GUARDS = ("none", "keep", "anchor")


def class_sums(outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sum of `outputs` (N x C) and sample counts: sums, not means, so partial results add up."""
    outputs = outputs.to(torch.float64)  # sums over 10^6 samples lose digits in float32
    sums = torch.zeros(num_classes, outputs.shape[1], dtype=torch.float64, device=outputs.device)
    sums.index_add_(0, targets, outputs)
    return sums, torch.bincount(targets, minlength=num_classes).to(torch.float64)


def _prepare(outputs: torch.Tensor, aggregation: str) -> torch.Tensor:
    if aggregation not in AGGREGATIONS:
        raise ColamError(f"method.colam.aggregation: must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    return outputs.softmax(dim=1) if aggregation == "probs" else outputs


def normalise(mean_outputs: torch.Tensor, temperature: float, aggregation: str = "logits") -> torch.Tensor:
    """softmax(mean / T), the last line of Algorithm 1; averaged probabilities are tempered through their log,
    softmax(log(p) / T), which equals softmax(z / T) when p = softmax(z) comes from a single sample."""
    if temperature <= 0:
        raise ColamError(f"method.colam.temperature: must be > 0, got {temperature!r}")
    scores = mean_outputs.clamp_min(1e-12).log() if aggregation == "probs" else mean_outputs
    return (scores / temperature).softmax(dim=1).to(torch.float32)


def class_soft_labels(outputs: torch.Tensor, targets: torch.Tensor, num_classes: int, temperature: float,
                      aggregation: str = "logits") -> torch.Tensor:
    """The C x C soft-label matrix from all peers: row c = softmax(mean_{i: y_i = c} f(x_i) / T)."""
    sums, counts = class_sums(_prepare(outputs, aggregation), targets, num_classes)
    return soft_labels_from_sums(sums, counts, temperature, aggregation)


def soft_labels_from_sums(sums: torch.Tensor, counts: torch.Tensor, temperature: float,
                          aggregation: str = "logits") -> torch.Tensor:
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ColamError(f"training data: class(es) {missing} have no training samples, so they have no soft label")
    return normalise(sums / counts[:, None], temperature, aggregation)


def peer_soft_labels(outputs: torch.Tensor, targets: torch.Tensor, num_classes: int, peers: int,
                     temperature: float, aggregation: str = "logits", generator: torch.Generator | None = None,
                     chunk: int = 1024) -> torch.Tensor:
    """An N x C matrix: sample i's label averages `peers` same-class samples drawn without replacement (itself
    included), the k largest of n_c uniform keys, in chunks of rows to bound memory at chunk x n_c."""
    prepared = _prepare(outputs, aggregation).to(torch.float32)
    result = torch.empty_like(prepared)
    for c in range(num_classes):
        members = (targets == c).nonzero().flatten()
        if len(members) == 0:
            continue  # no sample of this class needs a label
        members_cpu = _peer_pool(members, c, peers).cpu()  # the generator draws on the host
        for start in range(0, len(members), chunk):
            rows = members[start:start + chunk]
            keys = torch.rand(len(rows), len(members), generator=generator, device="cpu")
            chosen = members_cpu[keys.topk(peers, dim=1).indices].to(outputs.device)  # rows x peers
            result[rows] = prepared[chosen].mean(dim=1)
    return normalise(result, temperature, aggregation)


def class_peer_soft_labels(outputs: torch.Tensor, targets: torch.Tensor, num_classes: int, peers: int,
                           temperature: float, aggregation: str = "logits",
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """The C x C matrix from `peers` samples of each class drawn without replacement: the peer set of Sec. 3.3
    read as one draw per class rather than one per sample (`peer_soft_labels`)."""
    prepared = _prepare(outputs, aggregation).to(torch.float32)
    pools = [_peer_pool((targets == c).nonzero().flatten().cpu(), c, peers) for c in range(num_classes)]
    chosen = [pool[torch.randperm(len(pool), generator=generator)[:peers]].to(outputs.device) for pool in pools]
    return normalise(torch.stack([prepared[rows].mean(dim=0) for rows in chosen]), temperature, aggregation)


def _peer_pool(members: torch.Tensor, c: int, peers: int) -> torch.Tensor:
    if len(members) < peers:
        raise ColamError(f"method.colam.peers: {peers} peers requested but class {c} has only "
                         f"{len(members)} training samples")
    return members


def collapsed_rows(labels: torch.Tensor, row_classes: torch.Tensor) -> torch.Tensor:
    """Which rows no longer favour their own class (`row_classes`: 0..C-1 for a C x C matrix, the sample labels
    for N x C): a stage-end snapshot with such rows teaches the next stage the wrong class."""
    own = labels.gather(1, row_classes.view(-1, 1).to(labels.device)).squeeze(1)
    return own < labels.max(dim=1).values


def guard_labels(labels: torch.Tensor, row_classes: torch.Tensor, previous: torch.Tensor | None,
                 guard: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels with every collapsed row replaced as `guard` says, and the mask of those rows: none keeps them
    (Algorithm 1); keep takes the row of `previous`, the labels the stage trained on (None: the hard labels);
    anchor averages the row with the hard label, so the own class keeps at least half the mass."""
    if guard not in GUARDS:
        raise ColamError(f"method.colam.guard: must be one of {', '.join(GUARDS)}, got {guard!r}")
    collapsed = collapsed_rows(labels, row_classes)
    if guard == "none" or not collapsed.any():
        return labels, collapsed
    hard = torch.nn.functional.one_hot(row_classes.to(labels.device), labels.shape[1]).to(labels.dtype)
    if guard == "anchor":
        repaired = (labels + hard) / 2
    else:
        repaired = hard if previous is None else previous.to(hard)
    return torch.where(collapsed[:, None], repaired, labels), collapsed


def check_soft_labels(labels: torch.Tensor, num_classes: int, name: str = "soft labels") -> None:
    """Refuse a soft-label matrix of the wrong shape, with non-finite entries or rows not summing to 1."""
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise ColamError(f"{name}: expected shape (rows, {num_classes}), got {tuple(labels.shape)}")
    if not torch.isfinite(labels).all():
        raise ColamError(f"{name}: contains NaN or infinite values")
    if (labels < 0).any():
        raise ColamError(f"{name}: contains negative probabilities")
    worst = (labels.sum(dim=1) - 1).abs().max().item()
    if worst > 1e-4:
        raise ColamError(f"{name}: rows must sum to 1 (largest deviation {worst:.3g})")


NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file


def load_soft_labels(file: str | Path, key: str, num_classes: int | None = None) -> np.ndarray:
    """The C x C soft-label matrix in .npy `file` (C: `num_classes`, else its row count), never pickled objects,
    refused in one line unless numeric, finite, non-negative with rows summing to 1; errors name the config `key` that
    gave the file."""
    if Path(file).exists():
        cio.check_file(file, key)  # a FIFO or a folder: refused by type, not read
    try:
        with open(file, "rb") as handle:
            header = handle.read(len(NPY_MAGIC))
        array = np.load(file, allow_pickle=False) if header == NPY_MAGIC else None
    except (OSError, ValueError, EOFError) as exc:
        raise ColamError(f"{key}: '{file}' is not a readable .npy array ({first_line(exc)[:160]})") from None
    if array is None:  # numpy would call it pickled data
        raise ColamError(f"{key}: '{file}' is not a readable .npy array (no NumPy header; write it with numpy.save)")
    if array.dtype.kind not in "fiu":
        raise ColamError(f"{key}: '{file}' holds {array.dtype} values, not probabilities")
    size = num_classes or (len(array) if array.ndim else 0)
    if array.shape != (size, size):
        need = (f"this data's {size} classes need ({size}, {size}) (row c = the soft label of class c)"
                if num_classes else "not a C x C soft-label matrix")
        raise ColamError(f"{key}: '{file}' has shape {array.shape}, {need}")
    check_soft_labels(torch.from_numpy(array.astype(np.float64)), size, f"{key}: '{file}'")
    return array


class OutputSums:
    """Class-wise sums and counts of a model's outputs, added batch by batch; with `num_samples`, also every
    sample's outputs by index (per-sample peer labels need them). `reduce` sums the ranks' partial results."""

    def __init__(self, num_classes: int, aggregation: str, num_samples: int | None = None,
                 device: torch.device | str = "cpu"):
        _prepare(torch.zeros(1, 1), aggregation)  # refuses an unknown aggregation
        self.num_classes, self.aggregation, self.num_samples = num_classes, aggregation, num_samples
        self.sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.reduced = False  # summed over the ranks already (a second reduce would double it)
        self.outputs = None if num_samples is None else torch.zeros(num_samples, num_classes, dtype=torch.float32,
                                                                    device=device)
        self.seen = None if num_samples is None else torch.zeros(num_samples, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add(self, outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        outputs = outputs.detach().float()
        targets = targets.to(self.sums.device)
        self.sums.index_add_(0, targets, _prepare(outputs, self.aggregation).to(self.sums))
        self.counts.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float64))
        if self.outputs is not None:
            if indices is None:
                raise ValueError("OutputSums.add: indices are required when per-sample outputs are kept")
            indices = indices.to(self.outputs.device)
            self.outputs.index_copy_(0, indices, outputs.to(self.outputs))
            self.seen.index_fill_(0, indices, 1.0)

    def reduce(self) -> None:
        """Sum the ranks' partial results, once (a no-op in a single process): each sample is seen by one rank."""
        for tensor in (self.sums, self.counts, self.outputs, self.seen):
            if tensor is not None and not self.reduced:
                distributed.all_reduce_sum(tensor)
        self.reduced = True

    def class_labels(self, temperature: float) -> torch.Tensor:
        """The C x C matrix: row c = softmax(mean of class c's outputs / T)."""
        return soft_labels_from_sums(self.sums, self.counts, temperature, self.aggregation)

    def sample_outputs(self) -> torch.Tensor:
        """Every training sample's outputs (N x C); refuses a set in which a sample was never seen."""
        missing = int((self.seen == 0).sum())
        if missing:
            raise ColamError(f"method.colam.peers: per-sample soft labels need the outputs of every training sample, "
                             f"{missing} of {self.num_samples} were not seen")
        return self.outputs

    def state_dict(self) -> dict:
        return {"sums": self.sums, "counts": self.counts, "outputs": self.outputs, "seen": self.seen,
                "reduced": self.reduced}

    def load_state_dict(self, state: dict) -> None:
        device = self.sums.device
        self.sums, self.counts = state["sums"].to(device), state["counts"].to(device)
        self.outputs, self.seen = (None if state.get(k) is None else state[k].to(device) for k in ("outputs", "seen"))
        self.reduced = bool(state.get("reduced", False))
