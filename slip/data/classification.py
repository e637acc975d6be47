"""Labelled images as fine-tuning samples: timm's training and evaluation transforms, bad images skipped.

`LabelledSource` makes a labelled catalog dataset a `Source` whose one "caption" is the class index, so that
`slip.data.dataset.ImageTextDataset` gives it the training data's machinery: augmentation as a pure function of
(seed, epoch, item), bad images skipped and counted. `ClassificationSample` turns (image, label) into the batch
entries `image` and `label`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from slip.checks import positive_fraction
from slip.data.decode import BadSample
from slip.data.sources.base import check_index

__all__ = ["ClassificationSample", "LabelledSource", "check_labelled", "eval_transform", "train_transform"]


def check_labelled(dataset: Any, where: str) -> int:
    """The number of classes of a single-label dataset (a `classes` list, int labels); a one-line ValueError naming
    `where` for a dataset without labels or with a set of classes per image."""
    classes = getattr(dataset, "classes", None)
    if not classes:
        raise ValueError(f"{where}: {type(dataset).__name__} has no class labels; fine-tuning needs a labelled "
                         "dataset (a catalog entry with classes)")
    if getattr(dataset, "multi_label", False):
        raise ValueError(f"{where}: {type(dataset).__name__} gives each image a set of classes; fine-tuning "
                         "trains single-label classifiers")
    return len(classes)


class LabelledSource:
    """A labelled dataset's (image, class index) items as a `Source`: the caption list is [class index]; an item
    that cannot be read raises `BadSample`."""

    def __init__(self, dataset: Any, where: str) -> None:
        self.num_classes = check_labelled(dataset, where)
        self.dataset, self.where = dataset, where

    def __len__(self) -> int:
        """The number of items."""
        return len(self.dataset)

    def load(self, index: int) -> tuple[Image.Image, list[int]]:
        """The RGB image and [class index] of item `index`."""
        index = check_index(index, len(self), self)
        try:
            image, label = self.dataset[index]
        except (OSError, ValueError) as error:
            raise BadSample("unreadable", f"{self.where}[{index}]", str(error)) from None
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_classes:
            raise BadSample("bad label", f"{self.where}[{index}]", f"label {label!r} of {self.num_classes} classes")
        return (image if image.mode == "RGB" else image.convert("RGB")), [label]


class ClassificationSample:
    """(image, class index) -> {"image": transformed tensor, "label": int64 scalar}."""

    keys = ("image", "label")

    def __init__(self, transform: Callable[[Image.Image], Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image, label: int) -> dict[str, Tensor]:
        """The training sample of one item."""
        return {"image": self.transform(image), "label": torch.tensor(label, dtype=torch.int64)}


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic",
                    scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5, auto_augment: str | None = None,
                    color_jitter: float = 0.4, re_prob: float = 0.0, re_mode: str = "pixel",
                    re_count: int = 1) -> Callable[[Image.Image], Tensor]:
    """timm's training transform (`timm.data.create_transform`): random resized crop, flip, RandAugment (an
    `auto_augment` string such as "rand-m9-mstd0.5-inc1"; colour jitter is off while it is on), normalisation and
    random erasing with probability `re_prob`."""
    from timm.data import create_transform

    return create_transform(image_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=color_jitter,
                            auto_augment=auto_augment, interpolation=interpolation, mean=tuple(mean), std=tuple(std),
                            re_prob=re_prob, re_mode=re_mode, re_count=re_count)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str,
                   crop_pct: float = 1.0) -> Callable[[Image.Image], Tensor]:
    """timm's evaluation transform: resize the shorter side to image_size / crop_pct, centre crop, normalise
    (crop_pct 1: the model's own evaluation view; BEiT's recipe uses 0.875)."""
    from timm.data import create_transform

    positive_fraction("crop_pct", crop_pct)
    return create_transform(image_size, is_training=False, interpolation=interpolation, mean=tuple(mean),
                            std=tuple(std), crop_pct=crop_pct)
