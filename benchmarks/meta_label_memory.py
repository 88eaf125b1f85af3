"""Host memory of the `meta` method's instance-wise labels at ImageNet scale.

Allocates the top-k label store (`colam.methods.meta.TopKLabelStore`) for N = 1,281,167 images, C = 1000 classes and
k = method.meta.top_k, prints its bytes against a dense N x C float32 matrix (computed, not allocated), and times one
batch's gather -> scatter round trip on the host."""

from __future__ import annotations

import argparse
import time
import timeit

import torch

from colam.methods.meta import MetaSettings, TopKLabelStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_281_167, help="N (default: ImageNet-1k's training images)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=MetaSettings().top_k)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    n, c, k = args.samples, args.classes, min(args.top_k, args.classes)

    targets = torch.randint(c, (n,), generator=torch.Generator().manual_seed(0))
    began = time.perf_counter()
    store = TopKLabelStore.from_targets(targets, c, k)
    built = time.perf_counter() - began
    per_entry = store.values.element_size() + store.indices.element_size()
    dense = n * c * 4
    print(f"N={n:,} C={c:,} k={k}: values {tuple(store.values.shape)} {store.values.dtype}, "
          f"indices {tuple(store.indices.shape)} {store.indices.dtype}")
    print(f"top-k store: {store.nbytes:,} bytes ({store.nbytes / 1e6:.1f} MB) = N * k * {per_entry} B"
          f"{'  (matches)' if store.nbytes == n * k * per_entry else '  (MISMATCH)'}; built in {built:.2f} s")
    print(f"dense N x C float32: {dense:,} bytes ({dense / 1e9:.2f} GB); "
          f"the store is {dense / store.nbytes:.0f}x smaller")

    rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: args.batch]
    seconds = timeit.timeit(lambda: store.scatter(rows, store.gather(rows)), number=20) / 20
    print(f"gather + scatter of a batch of {args.batch} rows: {seconds * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
