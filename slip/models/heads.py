"""Heads on top of the towers: projections into the joint space, the logit scale and the SSL MLP head."""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

CLIP_INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0
"""The largest logit scale (exp of the learned parameter) that the objectives use: CLIP's clamp."""


def projection(in_dim: int, out_dim: int) -> nn.Parameter:
    """A bias-free projection matrix [in_dim, out_dim], applied as `features @ P`, initialised as in CLIP."""
    return nn.Parameter(torch.randn(in_dim, out_dim) * in_dim**-0.5)


SSL_HEAD_NORMS = ("batch", "layer", "none")


def _hidden_norm(kind: str, width: int, index: int) -> list[tuple[str, nn.Module]]:
    """The named normalisation after hidden layer `index`: BatchNorm (SLIP's `bn<i>`), LayerNorm (`ln<i>`) or none."""
    if kind == "batch":
        return [(f"bn{index}", nn.BatchNorm1d(width))]
    if kind == "layer":
        return [(f"ln{index}", nn.LayerNorm(width))]
    return []


class SSLHead(nn.Sequential):
    """SimCLR's MLP head as in SLIP: Linear-BN-ReLU-Linear-BN-ReLU-Linear.

    `norm` picks the hidden normalisation: "batch" (SLIP's; couples the samples of a batch, and becomes a
    SyncBatchNorm1d across ranks), "layer" (per sample) or "none".
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, norm: str = "batch") -> None:
        if norm not in SSL_HEAD_NORMS:
            raise ValueError(f"ssl_head_norm must be one of {list(SSL_HEAD_NORMS)}, got {norm!r}")
        super().__init__(OrderedDict([
            ("layer1", nn.Linear(in_dim, hidden_dim)),
            *_hidden_norm(norm, hidden_dim, 1),
            ("relu1", nn.ReLU(inplace=True)),
            ("layer2", nn.Linear(hidden_dim, hidden_dim)),
            *_hidden_norm(norm, hidden_dim, 2),
            ("relu2", nn.ReLU(inplace=True)),
            ("layer3", nn.Linear(hidden_dim, out_dim)),
        ]))
