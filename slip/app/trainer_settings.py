"""The `trainer` config node: how long and how to train, checked before any work (slip.app.engine reads it)."""
from __future__ import annotations

from dataclasses import dataclass, field

from slip.app.accumulation import ACCUMULATION_MODES
from slip.app.precision import PRECISIONS
from slip.app.strategy import STRATEGIES, FSDPSettings
from slip.data.decode import MAX_BAD_IN_A_ROW
from slip.distributed import resolve_device

__all__ = ["TrainerSettings"]


@dataclass(frozen=True)
class TrainerSettings:
    """How long and how to train; validated on construction so bad values fail before any work."""

    epochs: int = 1
    max_steps: int | None = None
    update_freq: int = 1
    accumulation: str = "exact"
    precision: str = "auto"  # fp64: weights, batches and losses in float64 (for checking equalities)
    grad_clip: float | None = None
    grad_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    eval_every: int | None = None
    resume: str = "auto"
    max_bad_fraction: float = 0.05
    max_bad_in_a_row: int = MAX_BAD_IN_A_ROW
    max_nonfinite_steps: int = 5
    init_grad_scale: float = 65536.0
    log_images: bool = True
    stop_after: int | None = None
    retain_freed_memory: bool = True
    strategy: str = "ddp"  # ddp: whole replicas | fsdp: FSDP2 shards (slip.app.strategy)
    fsdp: FSDPSettings = field(default_factory=FSDPSettings)

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "update_freq": self.update_freq, "log_every": self.log_every,
                    "max_nonfinite_steps": self.max_nonfinite_steps}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"trainer.{key} must be >= 1, got {value}")
        for key in ("max_steps", "eval_every", "stop_after"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"trainer.{key} must be >= 1 or null, got {value}")
        if not self.init_grad_scale > 0:
            raise ValueError(f"trainer.init_grad_scale must be > 0, got {self.init_grad_scale}")
        if self.save_every < 0:
            raise ValueError(f"trainer.save_every must be >= 0 (0: only at epoch ends), got {self.save_every}")
        if self.accumulation not in ACCUMULATION_MODES:
            raise ValueError(f"trainer.accumulation must be one of {list(ACCUMULATION_MODES)}, "
                             f"got {self.accumulation!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"trainer.grad_clip must be > 0 or null, got {self.grad_clip}")
        resolve_device(self.device)  # a one-line ValueError naming a value torch cannot read
        if self.strategy not in STRATEGIES:
            raise ValueError(f"trainer.strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.strategy == "fsdp" and self.compile:
            raise ValueError("trainer.compile: not supported with trainer.strategy=fsdp (untested); set it to false")
        if self.max_bad_in_a_row < 0:
            raise ValueError(f"trainer.max_bad_in_a_row must be >= 0, got {self.max_bad_in_a_row}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"trainer.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
