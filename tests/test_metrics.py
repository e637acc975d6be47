"""Each dataset's own metric against a naive loop and scikit-learn's implementation, ties and odd classes included."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from slip.eval.metrics import (eleven_point_map, mean_per_class_accuracy, mean_top1_top5, roc_auc, score,
                               topk_accuracy)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def tied_scores(rows: int, classes: int, seed: int, levels: int = 5) -> torch.Tensor:
    """Scores on a few levels only, so that ties are everywhere."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (rows, classes), generator=generator).double()


@pytest.mark.parametrize("seed", range(5))
def test_mean_per_class_accuracy_is_balanced_accuracy_with_ties_and_classes_without_samples(seed: int) -> None:
    scores = tied_scores(60, 7, seed)
    labels = torch.randint(0, 5, (60,), generator=torch.Generator().manual_seed(100 + seed))  # classes 5, 6 empty
    predicted = scores.numpy().argmax(axis=1)  # numpy and torch both take the first of tied maxima
    with warnings.catch_warnings():  # scikit-learn warns about predicted classes that have no samples
        warnings.simplefilter("ignore", UserWarning)
        want = 100 * sklearn_metrics.balanced_accuracy_score(labels.numpy(), predicted)
    naive = []
    for label in sorted(set(labels.tolist())):
        rows = [i for i in range(60) if labels[i] == label]
        naive.append(sum(predicted[i] == label for i in rows) / len(rows))
    got = mean_per_class_accuracy(scores, labels)["mean_per_class"]
    assert got == pytest.approx(want, abs=1e-9) and got == pytest.approx(100 * np.mean(naive), abs=1e-9)


def voc07_ap_naive(scores: np.ndarray, positives: np.ndarray) -> float:
    """The VOC 2007 devkit's loop: one precision/recall point per image in score order, 11 recall levels."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(float)
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / hits.sum()
    total = 0.0
    for level in np.arange(0.0, 1.1, 0.1):
        total += (precision[recall >= level].max() if (recall >= level).any() else 0.0) / 11
    return total


def voc07_ap_sklearn(scores: np.ndarray, positives: np.ndarray) -> float:
    """The same levels on scikit-learn's precision-recall curve (its last point, (recall 0, precision 1), has no
    threshold and is left out)."""
    precision, recall, _ = sklearn_metrics.precision_recall_curve(positives, scores)
    precision, recall = precision[:-1], recall[:-1]
    return float(np.mean([precision[recall >= level / 10].max() if (recall >= level / 10).any() else 0.0
                          for level in range(11)]))


@pytest.mark.parametrize("seed", range(4))
def test_eleven_point_map_against_the_voc_loop_and_scikit_learn(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(80, 6, generator=generator) < 0.3).long()
    targets[:, 5] = 0  # a class with no positive image: left out of the mean
    distinct = torch.randn(80, 6, generator=generator, dtype=torch.float64)
    tied = tied_scores(80, 6, seed)
    for scores, reference in ((distinct, voc07_ap_naive), (distinct, voc07_ap_sklearn), (tied, voc07_ap_sklearn)):
        want = 100 * np.mean([reference(scores[:, c].numpy(), targets[:, c].numpy()) for c in range(5)])
        assert eleven_point_map(scores, targets)["11point_map"] == pytest.approx(want, abs=1e-9)
    with pytest.raises(ValueError, match="at least one class with a positive"):
        eleven_point_map(distinct, torch.zeros_like(targets))


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_against_scikit_learn_with_ties(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(120, generator=generator) < 0.35).long()
    logits = tied_scores(120, 2, seed, levels=4)
    want = 100 * sklearn_metrics.roc_auc_score(labels.numpy(), (logits[:, 1] - logits[:, 0]).numpy())
    assert roc_auc(logits, labels)["roc_auc"] == pytest.approx(want, abs=1e-9)
    naive = np.mean([1.0 if p > n else 0.5 if p == n else 0.0
                     for p in (logits[:, 1] - logits[:, 0])[labels == 1].tolist()
                     for n in (logits[:, 1] - logits[:, 0])[labels == 0].tolist()])
    assert roc_auc(logits, labels)["roc_auc"] == pytest.approx(100 * naive, abs=1e-9)
    with pytest.raises(ValueError, match="needs positives and negatives, got 0 and 120"):
        roc_auc(logits, torch.zeros(120, dtype=torch.long))


def test_mean_of_top1_and_top5_and_the_metric_names() -> None:
    scores = torch.randn(50, 10, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 10, (50,), generator=torch.Generator().manual_seed(4))
    ranked = scores.argsort(dim=1, descending=True)
    top1 = 100 * float(np.mean([ranked[i, 0] == labels[i] for i in range(50)]))
    top5 = 100 * float(np.mean([labels[i] in ranked[i, :5] for i in range(50)]))
    got = mean_top1_top5(scores, labels)
    assert got == pytest.approx({"mean_top1_top5": (top1 + top5) / 2, "top1": top1, "top5": top5})
    assert score("top1", scores, labels) == topk_accuracy(scores, labels, (1,))
    with pytest.raises(ValueError, match="unknown metric 'f1'; one of top1, mean_per_class"):
        score("f1", scores, labels)


def test_the_catalog_covers_slips_table_with_the_metrics_slips_evaluation_uses() -> None:
    from pathlib import Path

    from omegaconf import OmegaConf

    from slip.eval.metric_names import CLIP_ONLY_DATASETS, SLIP_TABLE_ORDER

    catalog = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "catalog" / "default.yaml")
    # SLIP's eval_zeroshot.py: mean per-class accuracy for these four, (top1 + top5) / 2 for Kinetics-700 frames,
    # ROC AUC for Hateful Memes, top-1 for the rest; VOC 2007 (CLIP's table) is scored by its 11-point mAP.
    own = {"aircraft": "mean_per_class", "pets": "mean_per_class", "caltech101": "mean_per_class",
           "flowers": "mean_per_class", "kinetics700": "mean_top1_top5", "hateful_memes": "roc_auc",
           "voc2007": "11point_map"}
    assert len(SLIP_TABLE_ORDER) == len(set(SLIP_TABLE_ORDER)) == 26 and SLIP_TABLE_ORDER[-1] == "imagenet"
    for name in SLIP_TABLE_ORDER + CLIP_ONLY_DATASETS:
        entry = catalog[name]
        assert (entry.get("metric") or "top1") == own.get(name, "top1"), name
        assert entry.prompts == name and entry.train is not None and entry.test is not None, name


def test_the_named_dataset_lists_stand_for_slips_table_on_the_command_line() -> None:
    from test_eval import eval_config

    from slip.eval.metric_names import CLIP_ONLY_DATASETS, SLIP_TABLE_ORDER

    cfg = eval_config("tasks.zeroshot=${datasets.slip_table}", "tasks.linear_probe=${datasets.clip_only}")
    assert tuple(cfg.tasks.zeroshot) == SLIP_TABLE_ORDER and tuple(cfg.tasks.linear_probe) == CLIP_ONLY_DATASETS
