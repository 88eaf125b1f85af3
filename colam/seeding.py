"""Derived seeds: one run seed, separate reproducible streams for each epoch and stage."""


def derive_seed(seed: int, offset: int) -> int:
    """A 63-bit seed for the stream `offset` of run `seed` (torch.manual_seed takes < 2**63)."""
    return (seed * 1_000_003 + offset) % (2**63 - 1)
