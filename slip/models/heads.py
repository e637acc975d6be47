"""Heads on top of the towers: projections into the joint space, the logit scale and the SSL MLP head."""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

CLIP_INITIAL_LOGIT_SCALE = math.log(1 / 0.07)


def projection(in_dim: int, out_dim: int) -> nn.Parameter:
    """A bias-free projection matrix [in_dim, out_dim], applied as `features @ P`, initialised as in CLIP."""
    return nn.Parameter(torch.randn(in_dim, out_dim) * in_dim**-0.5)


class SSLHead(nn.Sequential):
    """SimCLR's MLP head as in SLIP: Linear-BN-ReLU-Linear-BN-ReLU-Linear.

    The BatchNorms become SyncBatchNorm under DDP (`nn.SyncBatchNorm.convert_sync_batchnorm`).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(OrderedDict([
            ("layer1", nn.Linear(in_dim, hidden_dim)),
            ("bn1", nn.BatchNorm1d(hidden_dim)),
            ("relu1", nn.ReLU(inplace=True)),
            ("layer2", nn.Linear(hidden_dim, hidden_dim)),
            ("bn2", nn.BatchNorm1d(hidden_dim)),
            ("relu2", nn.ReLU(inplace=True)),
            ("layer3", nn.Linear(hidden_dim, out_dim)),
        ]))
