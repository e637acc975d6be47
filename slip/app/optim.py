"""Optimiser parameter groups (no weight decay where it does harm) and the per-step learning-rate schedule."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Logit scales (and SigLIP's bias) set the loss's temperature: shrinking them towards zero is never wanted.
SCALE_NAME_PARTS = ("logit_scale", "logit_bias")
# Lookup tables and learned positions / class tokens. Decoupled weight decay shrinks every row of a token table at
# every step, rows of tokens absent from the batch included; the SLIP repository decays them all the same.
EMBEDDING_NAME_PARTS = ("token_embedding", "positional_embedding", "pos_embed", "cls_token", "class_embedding")
NO_DECAY_NAME_PARTS = SCALE_NAME_PARTS + EMBEDDING_NAME_PARTS


def _decays(name: str, ndim: int, decay_embeddings: bool) -> bool:
    """True for weight matrices and kernels; biases and norm scales (1-D), logit scales and (unless
    `decay_embeddings`) embeddings are excluded."""
    excluded = SCALE_NAME_PARTS if decay_embeddings else NO_DECAY_NAME_PARTS
    return ndim >= 2 and not any(part in name for part in excluded)


def param_groups(*modules: nn.Module, decay_embeddings: bool = False) -> list[dict]:
    """Trainable parameters of `modules` in two AdamW groups: with weight decay, and with weight_decay=0.

    `decay_embeddings=True` is the SLIP repository's rule (every parameter of two or more dimensions decays,
    embeddings included); the default leaves embeddings undecayed.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if _decays(name, param.ndim, decay_embeddings) else no_decay).append(param)
    groups = [{"params": decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no trainable parameters to optimise")
    return groups


def _check_number(name: str, value: float, low: float, high: float = math.inf, high_open: bool = False) -> None:
    """Raise ValueError naming `name` unless low <= value <= high (or < high when `high_open`)."""
    inside = low <= value < high if high_open else low <= value <= high
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and inside):
        bound = f"in [{low}, {high})" if high_open else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def adamw(
    params: Iterable[Any],
    lr: float,
    weight_decay: float,
    betas: Sequence[float] = (0.9, 0.98),
    eps: float = 1e-8,
    foreach: bool | None = None,
    fused: bool | None = None,
    decay_embeddings: bool = False,
) -> torch.optim.AdamW:
    """torch.optim.AdamW over `params`, with every setting checked by name first.

    `params` are modules, split into a decay and a no-decay group by `param_groups(*params, decay_embeddings)`,
    or parameters and param groups as torch takes them (then `decay_embeddings` must stay False: it needs names).
    `fused=True` runs the update as one kernel per device (CPU and CUDA): the same arithmetic, about 5x faster
    than the per-tensor loop on CPU.
    """
    params = list(params)
    if params and all(isinstance(item, nn.Module) for item in params):
        params = param_groups(*params, decay_embeddings=decay_embeddings)
    elif decay_embeddings:
        raise ValueError("decay_embeddings needs the modules (their parameter names), not bare parameters")
    _check_number("lr", lr, 0.0)
    _check_number("weight_decay", weight_decay, 0.0)
    _check_number("eps", eps, 0.0)
    if len(betas) != 2:
        raise ValueError(f"betas must be two numbers, got {list(betas)}")
    for beta in betas:
        _check_number("betas", beta, 0.0, 1.0, high_open=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                             foreach=foreach, fused=fused)


@dataclass(frozen=True)
class WarmupCosine:
    """Learning rate per optimizer step: linear warmup from `start_lr`, then cosine decay to `end_lr`.

    The SLIP repository's cosine_scheduler, step for step: warmup step i of W is start + (base - start) i / (W - 1),
    then step W + j of the remaining D is end + (base - end) (1 + cos(pi j / D)) / 2.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    start_lr: float = 1e-6
    end_lr: float = 1e-5

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"schedule total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"schedule warmup_steps must be in [0, total_steps={self.total_steps}], "
                             f"got {self.warmup_steps}")
        for name in ("base_lr", "start_lr", "end_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"schedule {name} must be a finite number >= 0, got {value}")

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:  # SLIP's np.linspace(start_lr, base_lr, warmup_steps): base at the last one
            return self.start_lr + (self.base_lr - self.start_lr) * step / max(self.warmup_steps - 1, 1)
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(max(step - self.warmup_steps, 0) / max(decay_steps, 1), 1.0)
        return self.end_lr + 0.5 * (self.base_lr - self.end_lr) * (1 + math.cos(math.pi * progress))


WARMUP_KEYS = ("warmup_epochs", "warmup_steps", "warmup_fraction")


def warmup_cosine(
    base_lr: float,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float | None = 1.0,
    start_lr: float = 1e-6,
    end_lr: float = 1e-5,
    warmup_steps: int | None = None,
    warmup_fraction: float | None = None,
) -> WarmupCosine:
    """The SLIP recipe's schedule (Hydra partial: the engine adds the step counts), its warmup given by exactly one
    of `warmup_epochs` (SLIP's unit; capped at the run's length), `warmup_steps` or `warmup_fraction` (of the run's
    optimizer steps, rounded); a one-line ValueError naming the key otherwise."""
    given = {key: value for key, value in zip(WARMUP_KEYS, (warmup_epochs, warmup_steps, warmup_fraction))
             if value is not None}
    if len(given) != 1:
        shown = ", ".join(f"{key}={value}" for key, value in given.items()) or "none"
        extra = (f"; e.g. add schedule.{next(iter(given))}=null" if len(given) > 1 else "")
        key = next((key for key in WARMUP_KEYS[1:] if key in given), "warmup_epochs")
        raise ValueError(f"schedule.{key}: set exactly one of schedule.warmup_epochs, warmup_steps and "
                         f"warmup_fraction (set: {shown}){extra}")
    if warmup_steps is not None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if warmup_steps > total_steps:
            raise ValueError(f"schedule.warmup_steps: {warmup_steps} is more than the run's {total_steps} steps")
        warmup = warmup_steps
    elif warmup_fraction is not None:
        _check_number("schedule.warmup_fraction", warmup_fraction, 0.0, 1.0)
        warmup = round(warmup_fraction * total_steps)
    else:
        _check_number("schedule.warmup_epochs", warmup_epochs, 0.0)
        warmup = min(round(warmup_epochs * steps_per_epoch), total_steps)
    return WarmupCosine(base_lr, total_steps, warmup, start_lr, end_lr)
