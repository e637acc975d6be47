"""The process's random generators: seeded per rank, captured and restored (exact resumes, replays, seeded draws)."""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from slip.distributed import WorldInfo

__all__ = ["RandomState", "rng_state", "seed_everything", "set_rng_state"]


def seed_everything(seed: int, world: WorldInfo) -> None:
    """Seed torch's, Python's and numpy's global generators differently on each rank."""
    torch.manual_seed(seed + world.rank)
    random.seed(seed + world.rank)
    np.random.seed((seed + world.rank) & 0xFFFF_FFFF)


def _cuda_index(device: int | torch.device) -> int:
    if isinstance(device, int):
        return device
    return device.index if device.index is not None else torch.cuda.current_device()


@dataclass(frozen=True)
class RandomState:
    """The captured states of this process's generators: torch's CPU one, and those asked for of Python's
    `random`, numpy's global generator and CUDA devices' (by index). `restore()` makes each continue from there."""

    cpu: torch.Tensor
    python: Any = None
    numpy: Any = None
    cuda: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def capture(cls, *, python: bool = True, numpy: bool = False,
                cuda: Iterable[int | torch.device] | None = None) -> RandomState:
        """The generators' current states; `cuda`: the devices to include (None: every visible one, if any)."""
        if cuda is None:
            cuda = range(torch.cuda.device_count()) if torch.cuda.is_available() else ()
        indices = [_cuda_index(device) for device in cuda]
        return cls(torch.get_rng_state(), random.getstate() if python else None,
                   np.random.get_state() if numpy else None,
                   {index: torch.cuda.get_rng_state(index) for index in indices})

    def restore(self) -> None:
        """Make the captured generators continue from this state."""
        torch.set_rng_state(self.cpu)
        if self.python is not None:
            version, internal, gauss = self.python  # a checkpoint may hold the tuple as lists
            random.setstate((version, tuple(internal), gauss))
        if self.numpy is not None:
            np.random.set_state(self.numpy)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)


def rng_state() -> dict[str, Any]:
    """This process's torch, Python, numpy (timm's mixup draws from it) and (when available) CUDA RNG states, as a
    checkpoint keeps them: plain values and tensors, which a weights-only load reads."""
    captured = RandomState.capture(numpy=True)
    name, keys, position, has_gauss, cached_gaussian = captured.numpy
    state: dict[str, Any] = {"torch": captured.cpu, "python": captured.python,
                             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                                       float(cached_gaussian)]}
    if torch.cuda.is_available():
        state["cuda"] = [captured.cuda[index] for index in sorted(captured.cuda)]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA's only where CUDA is available)."""
    cuda = dict(enumerate(state.get("cuda", []))) if torch.cuda.is_available() else {}
    numpy_state = None
    if state.get("numpy") is not None:  # a checkpoint without it leaves numpy's generator as it is
        name, keys, position, has_gauss, cached_gaussian = state["numpy"]
        numpy_state = (name, np.asarray(keys, dtype=np.int64).astype(np.uint32), int(position), int(has_gauss),
                       float(cached_gaussian))
    RandomState(state["torch"], state["python"], numpy_state, cuda).restore()
