"""A momentum teacher: an exponential moving average (EMA) of a model, for self-distillation objectives (BYOL,
MoCo v3, DINO) and as an averaged model to evaluate.

The teacher is a copy of the whole student model that gets no gradients. After each optimizer step every
floating-point parameter and buffer moves towards the student's: t <- m t + (1 - m) s, where the momentum m follows
a cosine from `momentum` at the first update to 1 at `total_steps` (BYOL's and DINO's schedule), or stays at
`momentum` (`schedule="constant"`). Integer buffers (BatchNorm's batch count) are copied. The number of updates
made is a buffer, so a checkpoint of the teacher resumes its schedule exactly; the update is a pure function of
the two models, so ranks that hold the same student hold the same teacher.

The teacher runs in eval mode: no drop-path or patch dropout, and BatchNorm uses its moving averages.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from slip.checks import positive_int, unit_interval

__all__ = ["MOMENTUM_SCHEDULES", "MomentumTeacher", "check_momentum", "teacher_key", "teacher_momentum"]

MOMENTUM_SCHEDULES = ("cosine", "constant")


def check_momentum(momentum: float, schedule: str) -> None:
    """Raise a one-line ValueError unless `momentum` is in [0, 1] and `schedule` is one of MOMENTUM_SCHEDULES."""
    unit_interval("momentum", momentum)
    if schedule not in MOMENTUM_SCHEDULES:
        raise ValueError(f"schedule must be one of {list(MOMENTUM_SCHEDULES)}, got {schedule!r}")


def teacher_momentum(start: float, update: int, total: int, schedule: str = "cosine") -> float:
    """The momentum of update number `update` (0-based) of `total`: 1 - (1 - start)(cos(pi update/total) + 1)/2
    for "cosine", `start` for "constant"."""
    if schedule == "constant":
        return start
    progress = min(update, total) / total
    return 1.0 - (1.0 - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


def teacher_key(output_key: str) -> str:
    """The key under which an objective reads the teacher's version of a model output, e.g. teacher_aug1_embed."""
    return f"teacher_{output_key}"


class MomentumTeacher(nn.Module):
    """An EMA copy of `student` (see the module docstring); `views` are the batch inputs it embeds for the
    objective."""

    def __init__(self, student: nn.Module, views: tuple[str, ...], momentum: float = 0.996, total_steps: int = 1,
                 schedule: str = "cosine") -> None:
        super().__init__()
        check_momentum(momentum, schedule)
        self.total_steps = positive_int("total_steps", total_steps)
        self.momentum, self.schedule, self.views = float(momentum), schedule, tuple(views)
        self.model = copy.deepcopy(student).requires_grad_(False).eval()
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> MomentumTeacher:
        """Keep the copy in eval mode whatever the training task's mode."""
        super().train(mode)
        self.model.eval()
        return self

    def extra_repr(self) -> str:
        """Shown by print(module)."""
        return f"views={self.views}, momentum={self.momentum}, schedule={self.schedule}, total_steps={self.total_steps}"

    def current_momentum(self) -> float:
        """The momentum the next update uses."""
        return teacher_momentum(self.momentum, int(self.updates), self.total_steps, self.schedule)

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """One EMA step towards `student` (a model of the same structure as the copy); returns the momentum used."""
        momentum = self.current_momentum()
        for ours, theirs in zip(_state(self.model), _state(student), strict=True):
            if ours.is_floating_point():
                ours.lerp_(theirs.detach().to(ours.dtype), 1.0 - momentum)
            else:
                ours.copy_(theirs)
        self.updates += 1
        return momentum

    @torch.no_grad()
    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The teacher's outputs on the `views` of `batch`, under `teacher_key` names."""
        outputs = self.model({view: batch[view] for view in self.views})
        return {teacher_key(key): value for key, value in outputs.items()}


def _state(model: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of `model`, in state-dict order."""
    return list(model.state_dict(keep_vars=True).values())
