"""The training task: the model and its objective together, the one module that owns every trainable parameter.

It is what the engine asks about a step: the batch keys it needs, the forward pass (whole, or split at the tower
features for exact accumulation), the hooks after each optimizer step, what to log and show, and the preview. Where
the objective names `teacher_views`, the task also holds a momentum teacher (`slip.teacher.MomentumTeacher`): its
outputs join the model's before the objective reads them, and it is updated after each optimizer step.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slip.inputs import IMAGE_VIEWS
from slip.losses import Objective
from slip.models import ImageTextModel
from slip.teacher import MomentumTeacher, check_momentum
from slip.app.monitor import view_grid

__all__ = ["TeacherSettings", "TrainTask"]


@dataclass(frozen=True)
class TeacherSettings:
    """The `teacher` node (conf/teacher/*.yaml): the momentum teacher of objectives that distil from one."""

    momentum: float
    schedule: str
    always: bool  # keep one for an objective without teacher views too: an EMA of the model to evaluate

    def __post_init__(self) -> None:
        check_momentum(self.momentum, self.schedule)

    def teacher_for(self, model: ImageTextModel, objective: Objective, total_steps: int) -> MomentumTeacher | None:
        """A teacher of `model` for `objective`'s teacher views over `total_steps` updates; None where the objective
        has none and `always` is off."""
        if not (objective.teacher_views or self.always):
            return None
        return MomentumTeacher(model, objective.teacher_views, self.momentum, total_steps, self.schedule)


class TrainTask(nn.Module):
    """Model plus objective: the one module that owns every trainable parameter (what DDP wraps).

    `image_mean` and `image_std` are the normalisation of the image inputs, undone to draw the preview. `teacher`
    is required where the objective has `teacher_views`, and must embed them; without them it is an EMA of the model
    kept to evaluate.
    """

    per_sample_loss = False  # contrastive: summing micro-batch gradients is not one big-batch step
    sharded_methods = ("encode", "finish", "teacher_outputs")  # what the engine calls besides forward

    def __init__(self, model: ImageTextModel, objective: Objective, image_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 image_std: Sequence[float] = (1.0, 1.0, 1.0), teacher: MomentumTeacher | None = None) -> None:
        super().__init__()
        if objective.teacher_views and teacher is None:
            raise ValueError(f"{objective.label()} needs a momentum teacher for {list(objective.teacher_views)}")
        if teacher is not None and not set(objective.teacher_views) <= set(teacher.views):
            raise ValueError(f"the teacher embeds {list(teacher.views)}, not all of {list(objective.teacher_views)}")
        self.model = model
        self.objective = objective
        self.teacher = teacher
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The batch keys a step needs: the objective's declared inputs."""
        return tuple(self.objective.inputs)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch -> the objective's result dict (loss, terms, accuracies)."""
        return self.objective({**self.model(batch), **self.teacher_outputs(batch)})

    def encode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's tower features of `batch`: what exact accumulation caches and replays."""
        return self.model.tower_features(batch)

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (the task wraps the rest): the model's blocks, and the teacher's
        blocks and the teacher itself, which runs on its own."""
        units = self.model.blocks()
        if self.teacher is not None:
            units += [*self.teacher.model.blocks(), self.teacher]
        return units

    def teacher_outputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher's outputs on `batch` (none without a teacher); no autograd."""
        return {} if self.teacher is None or not self.teacher.views else self.teacher(batch)

    def finish(self, features: dict[str, torch.Tensor],
               taught: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Tower features (`ImageTextModel.tower_features`) and the teacher's outputs on the same samples (none
        without a teacher) -> the objective's result dict, through the heads."""
        return self.objective({**self.model.heads(features), **(taught or {})})

    def after_optimizer_step(self) -> None:
        """The model's hook, the objective's, then the teacher's EMA update, after an optimizer step that was
        taken."""
        with torch.no_grad():
            self.model.after_optimizer_step()
            self.objective.after_optimizer_step()
            if self.teacher is not None:
                self.objective.after_teacher_update(self.teacher.update(self.model))

    def after_skipped_step(self) -> None:
        """The objective's hook after a step that was skipped (non-finite loss, fp16 overflow)."""
        self.objective.after_skipped_step()

    def checkpoint_state(self) -> dict[str, Any]:
        """The checkpoint's model entries: spec, weights (as `load_pretrained` reads them), objective, teacher."""
        return {"spec": self.model.spec.to_dict(), "model": self.model.state_dict(),
                "objective": self.objective.state_dict(),
                "teacher": None if self.teacher is None else self.teacher.state_dict()}

    def load_checkpoint_state(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore what `checkpoint_state` saved."""
        self.model.load_state_dict(checkpoint["model"])
        self.objective.load_state_dict(checkpoint["objective"])
        if self.teacher is not None:
            self.teacher.load_state_dict(checkpoint["teacher"])

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
