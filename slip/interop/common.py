"""What every converter shares: the converted result, the export error, and reading tower sizes off a state dict."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slip.checkpoint import CheckpointInfo
from slip.checks import is_positive_int
from slip.models import ModelSpec

__all__ = ["SLIP_TEXT_PREFIXES", "Converted", "ExportError", "Exported", "count_blocks",
           "prefix_text_keys", "square_side", "text_kwargs", "unprefix_text_keys"]

# Our text tower's parameters live under "text."; OpenAI CLIP, original SLIP and open_clip keep them at the top.
SLIP_TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.")


class ExportError(ValueError):
    """A model that a target format cannot express exactly; the message names the missing piece."""


@dataclass(frozen=True)
class Converted:
    """A checkpoint in our terms: the model spec `build_model` takes, our state dict, what it says,
    and the training objective's tensors where the file keeps them (SigLIP's `logit_bias`), for exports to carry."""

    spec: ModelSpec
    state: Mapping[str, torch.Tensor]
    info: CheckpointInfo
    objective_state: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Exported:
    """What an export wrote, one-line notes on what the target has no place for (e.g. the SSL head), and
    one-line warnings on what it has no place for that the model's scores need (e.g. SigLIP's logit bias)."""

    files: list[Path]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def square_side(value: Any) -> int | None:
    """The side of an image or patch size given as a positive int or a square [n, n] pair; None for anything else
    (our towers are square)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) == 2 and value[0] == value[1] else None
    return value if is_positive_int(value) else None


def count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks `prefix<i>.` the state dict holds."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def text_kwargs(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, Any]:
    """The text tower's builder keywords read off the tensor shapes of a CLIP-layout text tower (heads are
    width / 64)."""
    width = state[f"{prefix}ln_final.weight"].shape[0]
    return dict(
        text_width=width,
        text_heads=max(width // 64, 1),
        text_layers=count_blocks(state, f"{prefix}transformer.resblocks."),
        context_length=state[f"{prefix}positional_embedding"].shape[0],
        vocab_size=state[f"{prefix}token_embedding.weight"].shape[0],
    )


def prefix_text_keys(key: str) -> str:
    """A top-level CLIP text-tower key under our "text." prefix; other keys unchanged."""
    return f"text.{key}" if key.startswith(SLIP_TEXT_PREFIXES) else key


def unprefix_text_keys(key: str) -> str:
    """Our "text." keys at the top level, as CLIP-layout checkpoints keep them."""
    return key[len("text."):] if key.startswith("text.") else key
