"""The names of the downstream datasets' own metrics and the order of CLIP's tables, without importing torch
(`slip.report` reads results with them; `slip.eval.metrics` computes the metrics)."""
from __future__ import annotations

__all__ = ["DATASET_METRIC_NAMES", "PAPER_DATASET_ORDER"]

# top1, and the metrics CLIP reports instead for some datasets (see slip.eval.metrics).
DATASET_METRIC_NAMES = ("top1", "mean_per_class", "11point_map", "roc_auc", "mean_top1_top5")
# The 27 downstream datasets in the column order of CLIP's tables (ImageNet last), by our catalog names.
PAPER_DATASET_ORDER = (
    "food101", "cifar10", "cifar100", "birdsnap", "sun397", "cars", "aircraft", "voc2007", "dtd", "pets",
    "caltech101", "flowers", "mnist", "fer2013", "stl10", "eurosat", "resisc45", "gtsrb", "kitti_distance",
    "country211", "patch_camelyon", "ucf101", "kinetics700", "clevr_counts", "hateful_memes", "rendered_sst2",
    "imagenet",
)
