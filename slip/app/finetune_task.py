"""The fine-tuning task: a classifier and its loss, for the same engine that pretrains (`slip.app.engine`).

Its loss is BEiT's: with mixup/cutmix on (timm's `Mixup`, which also smooths the labels), timm's
`SoftTargetCrossEntropy`; without, cross-entropy with `label_smoothing`. Both are means over samples, so summing
the gradients of micro-batches is already the step of the whole batch (`per_sample_loss`): the engine's plain
accumulation is exact here. Mixup pairs the samples of each process's micro-batch, as BEiT's script does.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slip.app.monitor import view_grid
from slip.classifier import ImageClassifier

__all__ = ["FinetuneTask"]


class FinetuneTask(nn.Module):
    """Classifier plus loss: the one module that owns every trainable parameter (what DDP wraps).

    `mixup` is a `timm.data.Mixup` (applied in training only) or None; `label_smoothing` applies without it.
    """

    per_sample_loss = True
    inputs = ("image", "label")
    sharded_methods: tuple[str, ...] = ()  # the engine calls only forward (no exact accumulation)

    def __init__(self, classifier: ImageClassifier, mixup: Any = None, label_smoothing: float = 0.0,
                 image_mean: Sequence[float] = (0.0, 0.0, 0.0), image_std: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
                or not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        from timm.loss import SoftTargetCrossEntropy

        self.model, self.mixup, self.label_smoothing = classifier, mixup, float(label_smoothing)
        self.soft_target_loss = SoftTargetCrossEntropy()
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch -> {"loss"} and, without mixup, the batch's top-1 accuracy in percent ("top1")."""
        images, labels = batch["image"], batch["label"]
        if self.training and self.mixup is not None:
            images, targets = self.mixup(images, labels)
            logits = self.model(images)
            return {"loss": self.soft_target_loss(logits, targets.to(logits.dtype))}
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        top1 = (logits.detach().argmax(dim=-1) == labels).float().mean() * 100
        return {"loss": loss, "top1": top1}

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (the task wraps the rest): the image tower's blocks."""
        return self.model.spec.vision.blocks(self.model.tower)

    def checkpoint_state(self) -> dict[str, Any]:
        """The checkpoint's model entries: what rebuilds the classifier, and its weights."""
        return {"classifier": self.model.describe(), "model": self.model.state_dict()}

    def load_checkpoint_state(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore what `checkpoint_state` saved."""
        self.model.load_state_dict(checkpoint["model"])

    def after_optimizer_step(self) -> None:
        """Nothing is kept between steps."""

    def after_skipped_step(self) -> None:
        """Nothing is kept between steps."""

    def logged_scalars(self) -> dict[str, float]:
        """No values besides the step's results."""
        return {}

    def console_metrics(self) -> tuple[str, ...]:
        """The loss, and the batch's top-1 where it is measured (no mixup)."""
        return ("loss",) if self.mixup is not None else ("loss", "top1")

    def previews(self, batch: Mapping[str, torch.Tensor], count: int = 8) -> dict[str, torch.Tensor]:
        """{"views": a row of the first `count` training images, as augmented}."""
        return {"views": view_grid([batch["image"]], self.image_mean, self.image_std, count)}
