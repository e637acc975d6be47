"""The names of the downstream datasets' own metrics and the order of SLIP's table, without importing torch
(`slip.report` reads results with them; `slip.eval.metrics` computes the metrics)."""
from __future__ import annotations

__all__ = ["CLIP_ONLY_DATASETS", "DATASET_METRIC_NAMES", "SLIP_TABLE_ORDER"]

# top1, and the metrics CLIP reports instead for some datasets (see slip.eval.metrics).
DATASET_METRIC_NAMES = ("top1", "mean_per_class", "11point_map", "roc_auc", "mean_top1_top5")
# The 26 datasets of SLIP's downstream table (ImageNet and 25 others), by our catalog names, in the order its
# evaluation walks and prints them (the SLIP repository's dataset_catalog.json). SLIP evaluates CUB-200 where
# CLIP's tables have Birdsnap, and has no VOC 2007.
SLIP_TABLE_ORDER = (
    "food101", "cifar10", "cifar100", "cub200", "sun397", "cars", "aircraft", "dtd", "pets", "caltech101",
    "flowers", "mnist", "fer2013", "stl10", "eurosat", "resisc45", "gtsrb", "kitti_distance", "country211",
    "patch_camelyon", "ucf101", "kinetics700", "clevr_counts", "hateful_memes", "rendered_sst2", "imagenet",
)
# Downstream sets of CLIP's tables that SLIP's lacks; the downstream view puts them after SLIP's.
CLIP_ONLY_DATASETS = ("birdsnap", "voc2007")
