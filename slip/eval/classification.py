"""A classifier's top-1, top-5 and dataset metric on a labelled dataset: fine-tuning's evaluation."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from slip.eval.features import EvalViewDataset, model_modes
from slip.eval.metrics import check_metric, report
from slip.eval.zeroshot import Progress, reporting

__all__ = ["ClassifierEvaluator"]


class ClassifierEvaluator:
    """Callable(classifier) -> {top1, top5, and the dataset's `metric` where it is another}, on every image of
    `dataset` through `transform`."""

    title = "validation"  # what training's console calls it

    def __init__(self, dataset: Any, transform: Callable[[Image.Image], Tensor], batch_size: int = 256,
                 num_workers: int = 0, metric: str = "top1") -> None:
        self.metric = check_metric(metric)
        self.dataset, self.transform = dataset, transform
        self.batch_size, self.num_workers = batch_size, num_workers

    def __len__(self) -> int:
        """The number of images scored."""
        return len(self.dataset)

    @torch.no_grad()
    def __call__(self, classifier: nn.Module, progress: Progress | None = None) -> dict[str, float]:
        """Score every image (in eval mode, restored after); `progress(done, total)` after each batch."""
        images = EvalViewDataset(self.dataset, self.transform, len(self.dataset.classes))
        loader = torch.utils.data.DataLoader(images, batch_size=self.batch_size, num_workers=self.num_workers)
        parameter = next(classifier.parameters())
        modes = model_modes(classifier)
        classifier.eval()
        try:
            scores, labels = [], []
            for batch, batch_labels in reporting(loader, len(self), progress):
                scores.append(classifier(batch.to(parameter.device, parameter.dtype)).float().cpu())
                labels.append(batch_labels)
        finally:
            for module, training in modes:
                module.train(training)
        return report(self.metric, torch.cat(scores), torch.cat(labels))
