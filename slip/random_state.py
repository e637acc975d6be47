"""The process's random generators: seeded per rank, captured and restored for exact resumes."""
from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

from slip.distributed import WorldInfo

__all__ = ["rng_state", "seed_everything", "set_rng_state"]


def seed_everything(seed: int, world: WorldInfo) -> None:
    """Seed torch and Python's RNG differently on each rank."""
    torch.manual_seed(seed + world.rank)
    random.seed(seed + world.rank)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as plain tensors and tuples."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
