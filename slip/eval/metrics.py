"""Scores shared by the evaluation tasks."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among their k best scores, for each k in `ks` up to the class count."""
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"scores [N, C] and labels [N] disagree: {tuple(scores.shape)} and {tuple(labels.shape)}")
    usable = [k for k in ks if k <= scores.shape[1]]
    if not usable:
        return {}
    ranked = scores.topk(max(usable), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * int(hits[:, :k].any(dim=1).sum()) / len(labels) for k in usable}
