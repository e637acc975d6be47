"""The config nodes of `python -m slip.finetune` that have no library builder of their own."""
from __future__ import annotations

from dataclasses import dataclass

from slip.checks import non_negative_int, positive_int

__all__ = ["ClassifierSettings", "FinetuneData", "TestSettings"]


@dataclass(frozen=True)
class ClassifierSettings:
    """The `classifier` node: the fine-tuned model (`slip.classifier.classifier_from_model`, which checks the values)
    and its layer-wise lr decay (`slip.classifier.layer_decay_groups`)."""

    drop_path_rate: float = 0.1
    head_init_scale: float = 1e-3
    layer_decay: float = 0.65  # 1.0: every layer at the scheduled lr


@dataclass(frozen=True)
class FinetuneData:
    """The `data` node: samples per process per micro-batch, and loader workers."""

    batch_size: int = 32
    num_workers: int = 0

    def __post_init__(self) -> None:
        positive_int("batch_size", self.batch_size)
        non_negative_int("num_workers", self.num_workers)


@dataclass(frozen=True)
class TestSettings:
    """The `test` node: how the dataset's test split is scored (every `trainer.eval_every` steps and at the end).

    `crop_pct` (checked by `slip.data.classification.eval_transform`): the evaluation view resizes the shorter side
    to image_size / crop_pct, then centre crops."""

    crop_pct: float = 1.0
    batch_size: int = 256
    num_workers: int = 0

    def __post_init__(self) -> None:
        positive_int("batch_size", self.batch_size)
        non_negative_int("num_workers", self.num_workers)
