"""Comparisons the loss tests share: float64 losses and gradients against a reference computation."""
from __future__ import annotations

import torch
from torch import Tensor


def leaves(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Independent leaf copies."""
    return {k: v.detach().clone().requires_grad_() for k, v in outputs.items()}


def assert_matches(loss: Tensor, ref_loss: Tensor, inputs: list[Tensor], ref_inputs: list[Tensor]) -> None:
    """The float64 loss within 1e-12 relative of the reference's, and the gradients w.r.t. `inputs` within 1e-10 of
    the reference's largest gradient entry (one scale for all: a gradient that is zero in exact arithmetic, e.g. of a
    bias a BatchNorm follows, is rounding noise that a per-tensor scale would magnify)."""
    got = torch.autograd.grad(loss, inputs)
    want = torch.autograd.grad(ref_loss, ref_inputs)
    assert loss.dtype == ref_loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0.0)
    scale = max(w.abs().max().item() for w in want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0.0, atol=1e-10 * scale)
