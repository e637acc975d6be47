"""The training task: the model and its objective together, the one module that owns every trainable parameter.

It is what the engine asks about a step: the batch keys it needs, the forward pass (whole, or split at the tower
features for exact accumulation), the hooks after each optimizer step, what to log and show, and the preview.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from slip.inputs import IMAGE_VIEWS
from slip.losses import Objective
from slip.models import ImageTextModel
from slip.app.monitor import view_grid

__all__ = ["TrainTask"]


class TrainTask(nn.Module):
    """Model plus objective: the one module that owns every trainable parameter (what DDP wraps).

    `image_mean` and `image_std` are the normalisation of the image inputs, undone to draw the preview.
    """

    def __init__(self, model: ImageTextModel, objective: Objective, image_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 image_std: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The batch keys a step needs: the objective's declared inputs."""
        return tuple(self.objective.inputs)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch -> the objective's result dict (loss, terms, accuracies)."""
        return self.objective(self.model(batch))

    def finish(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tower features (`ImageTextModel.tower_features`) -> the objective's result dict, through the heads."""
        return self.objective(self.model.heads(features))

    def after_optimizer_step(self) -> None:
        """The model's hook, then the objective's, after an optimizer step that was taken (clamps, EMA updates)."""
        with torch.no_grad():
            self.model.after_optimizer_step()
            self.objective.after_optimizer_step()

    def logged_scalars(self) -> dict[str, float]:
        """Values to log beside a step's results, read before its optimizer step (the model's logit scale)."""
        return self.model.logged_scalars()

    def console_metrics(self) -> tuple[str, ...]:
        """The result keys shown on the console's progress line: the loss and the objective's metrics."""
        return ("loss", *self.objective.metrics)

    def previews(self, batch: Mapping[str, torch.Tensor], count: int = 8) -> dict[str, torch.Tensor]:
        """{tag: [3, H, W] grid in [0, 1]}: a row per image input the task uses, of the first `count` samples."""
        views = [batch[key] for key in IMAGE_VIEWS if key in self.inputs and key in batch]
        return {"views": view_grid(views, self.image_mean, self.image_std, count)} if views else {}
