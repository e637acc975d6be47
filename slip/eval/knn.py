"""Weighted k-nearest-neighbour classification on frozen features (the InstDisc / DINO evaluation rule).

Features are L2-normalised, so similarity is cosine. Each test row takes its k most similar training rows;
neighbour j votes for its label with weight exp(s_j / temperature). Scores are the votes per class divided by
the row's total vote, i.e. a softmax of s / temperature over the k neighbours: the same ranking as the raw
sums, and free of overflow at any temperature. Test rows are processed in chunks, so memory stays at
chunk_size x N_train similarities.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from slip.checks import positive_int, positive_number
from slip.eval.features import check_features
from slip.eval.metrics import report

__all__ = ["KnnVote", "knn_accuracy", "knn_predict"]


@dataclass(frozen=True)
class KnnVote:
    """How the k nearest training rows vote: k neighbours, each weighted exp(cosine / temperature), test rows
    scored `chunk_size` at a time; checked on construction (k against the training rows when used)."""

    k: int = 20
    temperature: float = 0.07
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        positive_int("k", self.k)
        positive_number("temperature", self.temperature)
        positive_int("chunk_size", self.chunk_size)


@torch.no_grad()
def knn_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int,
                vote: KnnVote = KnnVote()) -> Tensor:
    """Class scores [N_test, C]: the exp(cosine / temperature)-weighted votes of the k nearest training rows.

    Each row sums to 1. Runs in float32 on the features' device.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    check_features("train", train_x, train_y, num_classes)
    check_features("test", test_x)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dims but test features {test_x.shape[1]}")
    if vote.k > train_x.shape[0]:
        raise ValueError(f"k must be an int in [1, {train_x.shape[0]}] (the number of training rows), got {vote.k!r}")
    train = F.normalize(train_x.float(), dim=1)
    train_y = train_y.long()
    chunks = []
    for rows in F.normalize(test_x.float(), dim=1).split(vote.chunk_size):
        similarity, neighbours = (rows @ train.T).topk(vote.k, dim=1)
        weights = (similarity / vote.temperature).softmax(dim=1)
        scores = rows.new_zeros(rows.shape[0], num_classes)
        chunks.append(scores.scatter_add_(1, train_y[neighbours], weights))
    return torch.cat(chunks)


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                 vote: KnnVote = KnnVote(), metric: str = "top1") -> dict[str, float]:
    """Percent {"top1", "top5" (with >= 5 classes)} of `knn_predict` on labelled test features, plus the dataset's
    own `metric` when it is another one."""
    check_features("test", test_x, test_y, num_classes if isinstance(num_classes, int) else None)
    scores = knn_predict(train_x, train_y, test_x, num_classes, vote)
    return report(metric, scores, test_y.to(scores.device).long())
