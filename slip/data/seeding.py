"""Seeds derived from (seed, epoch, item, ...), and running a transform under a seed without disturbing the caller.

Randomness in the data wing (caption choice, augmentation, shard order) is a pure function of such parts, never of
the worker layout.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from slip.random_state import RandomState

__all__ = ["derive_seed", "seeded_global_rngs"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a stable function of `parts` (ints and strings), across processes and runs."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, `random` and numpy's global generator; restore all three afterwards.

    Only the CPU generator is touched: torch.manual_seed would also reseed (and so disturb) CUDA generators.
    """
    saved = RandomState.capture(numpy=True, cuda=[])
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
    try:
        yield
    finally:
        saved.restore()
