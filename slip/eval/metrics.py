"""Scores shared by the evaluation tasks, and each downstream dataset's own metric as CLIP and SLIP report it.

Every metric maps (scores, labels) to {name: percent}: `scores` are [N, C] class scores (logits, similarities or
probabilities; only their order matters), `labels` are [N] class indices, or [N, C] 0/1 targets for the
multi-label `eleven_point_map`. `DATASET_METRICS` names them for the catalog's `metric:` key.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import torch
from torch import Tensor

from slip.eval.metric_names import DATASET_METRIC_NAMES

__all__ = ["DATASET_METRICS", "MULTI_LABEL_METRICS", "check_metric", "eleven_point_map",
           "mean_per_class_accuracy", "mean_top1_top5", "report", "roc_auc", "score", "top1", "topk_accuracy"]


def _check(scores: Tensor, labels: Tensor) -> None:
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"scores [N, C] and labels [N] disagree: {tuple(scores.shape)} and {tuple(labels.shape)}")


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among their k best scores, for each k in `ks` up to the class count."""
    _check(scores, labels)
    usable = [k for k in ks if k <= scores.shape[1]]
    if not usable:
        return {}
    ranked = scores.topk(max(usable), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * int(hits[:, :k].any(dim=1).sum()) / len(labels) for k in usable}


def top1(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Percent of rows whose best score is their label."""
    return topk_accuracy(scores, labels, (1,))


def mean_top1_top5(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """The mean of top-1 and top-5 accuracy (CLIP's Kinetics-700 metric), with both."""
    accuracies = topk_accuracy(scores, labels, (1, 5))
    return {"mean_top1_top5": (accuracies["top1"] + accuracies["top5"]) / 2, **accuracies}


def mean_per_class_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy of the best score within each class, averaged over the classes that have samples (CLIP's metric
    for Aircraft, Pets, Caltech-101 and Flowers-102; scikit-learn's balanced accuracy)."""
    _check(scores, labels)
    predicted = scores.argmax(dim=1)
    present = labels.unique()
    recalls = [(predicted[labels == label] == label).double().mean() for label in present]
    return {"mean_per_class": 100.0 * float(torch.stack(recalls).mean())}


def _precision_at_thresholds(scores: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """(precision, recall) at every distinct score, highest first; tied scores form one threshold."""
    order = scores.argsort(descending=True)
    sorted_scores, sorted_hits = scores[order], positives[order].double()
    true_positives = sorted_hits.cumsum(0)
    last_of_tie = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    kept = true_positives[last_of_tie]
    predicted = torch.arange(1, len(scores) + 1, dtype=torch.float64)[last_of_tie]
    return kept / predicted, kept / sorted_hits.sum()


def eleven_point_map(scores: Tensor, targets: Tensor) -> dict[str, float]:
    """PASCAL VOC 2007's 11-point interpolated mean average precision over the classes that have a positive.

    Per class, AP is the mean over recall levels t = 0, 0.1, ..., 1 of the highest precision at recall >= t
    (0 where recall t is never reached). `targets` is [N, C] with 1 for every class an image holds, 0 where
    it does not, and -1 where the class is ignored for that image (VOC's "difficult").
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores and targets must both be [N, C]: {tuple(scores.shape)} and {tuple(targets.shape)}")
    precisions = []
    for column in range(scores.shape[1]):
        counted = targets[:, column] >= 0
        positives = targets[counted, column] > 0
        if not positives.any():
            continue
        precision, recall = _precision_at_thresholds(scores[counted, column].double(), positives)
        levels = [precision[recall >= level / 10].max() if (recall >= level / 10).any() else precision.new_zeros(())
                  for level in range(11)]
        precisions.append(torch.stack(levels).mean())
    if not precisions:
        raise ValueError("11-point mAP needs at least one class with a positive image")
    return {"11point_map": 100.0 * float(torch.stack(precisions).mean())}


def roc_auc(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Area under the ROC curve of the positive class's score (column 1 of [N, 2], or [N] scores) for 0/1 labels
    (CLIP's Hateful Memes metric); tied scores count half, as in the Mann-Whitney statistic."""
    positive_scores = scores[:, 1] - scores[:, 0] if scores.ndim == 2 else scores
    positives = labels > 0
    count_positive, count_negative = int(positives.sum()), int((~positives).sum())
    if count_positive == 0 or count_negative == 0:
        raise ValueError(f"ROC AUC needs positives and negatives, got {count_positive} and {count_negative}")
    ranks = _average_ranks(positive_scores.double())
    statistic = ranks[positives].sum() - count_positive * (count_positive + 1) / 2
    return {"roc_auc": 100.0 * float(statistic / (count_positive * count_negative))}


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of `values`, ties given the mean of the ranks they span."""
    order = values.argsort()
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


# The catalog's `metric:` names (DATASET_METRIC_NAMES) -> the function computing it.
DATASET_METRICS: Mapping[str, Callable[[Tensor, Tensor], dict[str, float]]] = MappingProxyType({
    "top1": top1,
    "mean_per_class": mean_per_class_accuracy,
    "11point_map": eleven_point_map,
    "roc_auc": roc_auc,
    "mean_top1_top5": mean_top1_top5,
})
assert tuple(DATASET_METRICS) == DATASET_METRIC_NAMES
# The metrics that score [N, C] multi-label targets rather than [N] class indices.
MULTI_LABEL_METRICS = ("11point_map",)


def check_metric(metric: str) -> str:
    """`metric` if it is a DATASET_METRICS name, else a one-line ValueError listing them."""
    if metric not in DATASET_METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(DATASET_METRICS)}")
    return metric


def report(metric: str, scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 (where there are 5 classes), plus the dataset's own `metric` when it is another one."""
    check_metric(metric)
    if labels.ndim == 2:  # multi-label targets: only the dataset's metric applies
        return DATASET_METRICS[metric](scores, labels)
    result = topk_accuracy(scores, labels)
    return result if metric == "top1" else {**DATASET_METRICS[metric](scores, labels), **result}


def score(metric: str, scores: Tensor, labels: Tensor) -> dict[str, float]:
    """The dataset metric `metric` (a DATASET_METRICS name) of `scores` against `labels`."""
    return DATASET_METRICS[check_metric(metric)](scores, labels)
