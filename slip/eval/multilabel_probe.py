"""Linear probe for multi-label datasets (PASCAL VOC 2007): one binary logistic regression per class.

An image can hold several classes, so the probe is one-vs-rest: class c gets its own logistic regression of
"holds c" on the frozen features, fitted on the images counted for c (targets 1 or 0; -1, VOC's "difficult",
leaves the image out of that class, as in scoring). The objective is the sum over classes of each class's
mean binary cross-entropy plus l2/2 ||W||^2 (bias not penalised), so it splits into independent per-class
problems, each scikit-learn's LogisticRegression with C = 1 / (l2 N_c) on that class's N_c images.

As in `slip.eval.linear_probe`: features are standardised with the statistics of the rows being fitted, the l2
strength is swept over a decade grid refined by bisection (warm-started), chosen on a held-out share of train,
then refitted on all of train. The held-out share is a seeded random one (a stratified split has no single
label to stratify by), and the sweep picks the highest validation 11-point mAP, ties going to the lower
validation loss. Test images are scored with the 11-point mAP (`slip.eval.metrics.eleven_point_map`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slip.eval.features import check_targets
from slip.eval.l2_sweep import L2Sweep, check_val_fraction, sweep_l2_and_refit, sweep_summary
from slip.eval.linear_probe import lbfgs_start, minimise_lbfgs
from slip.eval.metrics import eleven_point_map

__all__ = ["fit_one_vs_rest", "multilabel_linear_probe", "one_vs_rest_data_loss", "one_vs_rest_loss",
           "random_split"]


def one_vs_rest_data_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum over classes of the mean binary cross-entropy of `logits` over the images counted for the class
    (targets >= 0), in float64."""
    counted = targets >= 0
    per_entry = F.binary_cross_entropy_with_logits(logits, (targets > 0).to(logits.dtype), reduction="none")
    return ((per_entry.double() * counted).sum(dim=0) / counted.sum(dim=0).clamp(min=1)).sum()


def one_vs_rest_loss(x: Tensor, targets: Tensor, weight: Tensor, bias: Tensor, l2: float) -> Tensor:
    """`one_vs_rest_data_loss` of the linear classifier plus l2/2 ||weight||^2; reductions in float64, as in
    `slip.eval.linear_probe`."""
    return one_vs_rest_data_loss(x @ weight.T + bias, targets) + 0.5 * l2 * weight.double().square().sum()


def fit_one_vs_rest(x: Tensor, targets: Tensor, l2: float, max_iter: int = 1000,
                    init: tuple[Tensor, Tensor] | None = None, tol: float = 1e-4) -> tuple[Tensor, Tensor]:
    """(weight [C, D], bias [C]) minimising `one_vs_rest_loss` with full-batch L-BFGS (the stopping rule of
    `slip.eval.linear_probe.fit_logistic_regression`), in the dtype and on the device of `x`."""
    check_targets("fit", x, targets)
    weight, bias = lbfgs_start(x, targets.shape[1], l2, max_iter, tol, init)
    return minimise_lbfgs(lambda w, b: one_vs_rest_loss(x, targets, w, b, float(l2)), weight, bias, l2, max_iter,
                          tol, x)


def random_split(rows: int, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Sorted row indices (fit, val): a seeded random share `val_fraction` of the rows (at least one, and at least
    one left to fit) goes to val."""
    check_val_fraction(val_fraction)
    if rows < 2:
        raise ValueError(f"a validation split needs at least 2 training rows, got {rows}")
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    held_out = min(rows - 1, max(1, round(val_fraction * rows)))
    return order[held_out:].sort().values, order[:held_out].sort().values


def multilabel_linear_probe(
    train_x: Tensor,
    train_targets: Tensor,
    test_x: Tensor,
    test_targets: Tensor,
    sweep: L2Sweep = L2Sweep(),
) -> dict[str, object]:
    """One-vs-rest logistic regressions: choose l2 by `sweep` on a held-out share of train by 11-point mAP, refit on
    all of train, score test.

    Returns {"11point_map", "l2", "val_11point_map", "sweep": [[l2, val_11point_map], ...]} (percent; the sweep
    sorted by l2). All work runs in float32 on the features' device.
    """
    check_targets("train", train_x, train_targets)
    check_targets("test", test_x, test_targets)
    if train_x.shape[1] != test_x.shape[1] or train_targets.shape[1] != test_targets.shape[1]:
        raise ValueError(f"train is {train_x.shape[1]} dims x {train_targets.shape[1]} classes but test "
                         f"{test_x.shape[1]} x {test_targets.shape[1]}")
    train_x, test_x = train_x.float(), test_x.float()
    fit_rows, val_rows = (rows.to(train_x.device) for rows in random_split(train_x.shape[0], sweep.val_fraction,
                                                                            sweep.seed))
    if not bool((train_targets[val_rows] > 0).any()):
        raise ValueError("the validation split holds no positive target: too few training images to choose l2")
    test_logits, best, scores = sweep_l2_and_refit(
        lambda x, targets, l2, init: fit_one_vs_rest(x, targets, l2, sweep.max_iter, init=init),
        lambda logits, targets: (eleven_point_map(logits, targets)["11point_map"],
                                 -one_vs_rest_data_loss(logits, targets).item()),
        (train_x, train_targets), fit_rows, val_rows, test_x, sweep)
    return {**eleven_point_map(test_logits, test_targets), **sweep_summary(best, scores, "11point_map")}
