"""trainer.precision: what autocast runs in, and what the engine casts weights and batches to."""
from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "autocast_dtype", "cast_floats", "parameter_dtype"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp64")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: no autocast). 'auto' is bf16 on GPU, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "fp64": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def parameter_dtype(precision: str) -> torch.dtype | None:
    """The dtype the engine casts weights and batches to: float64 for 'fp64'; None (as built) otherwise."""
    return torch.float64 if precision == "fp64" else None


def cast_floats(batch: dict, dtype: torch.dtype) -> dict:
    """The batch with its floating-point tensors in `dtype` (token ids and other integers as they are)."""
    return {key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for key, value in batch.items()}
