"""The training task: the model and its objective together, the one module that owns every trainable parameter."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from slip.losses import Objective
from slip.models import ImageTextModel

__all__ = ["TrainTask"]


class TrainTask(nn.Module):
    """Model plus objective: the one module that owns every trainable parameter (what DDP wraps)."""

    def __init__(self, model: ImageTextModel, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch -> the objective's result dict (loss, terms, accuracies)."""
        return self.objective(self.model(batch))

    def finish(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tower features (`ImageTextModel.tower_features`) -> the objective's result dict, through the heads."""
        return self.objective(self.model.heads(features))
