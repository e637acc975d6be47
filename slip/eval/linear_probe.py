"""Linear probes on frozen features: L-BFGS logistic regression with a regularisation sweep (the CLIP paper's
protocol), and SLIP's SGD protocol as an option.

`linear_probe` follows CLIP: a multinomial logistic regression fitted with L-BFGS, its L2 strength chosen on
a validation split carved from the training set, then refitted on the whole training set. The split is stratified
by class (`stratified_split`), or keeps groups of rows whole (`grouped_split`) where the training set holds
near-copies of one object, whose spread over both sides would let validation reward memorising them.

CLIP sweeps sklearn's C over 1e-6..1e6 and refines with a parametric binary search; here a coarse log grid of `l2`
(one value per decade) is refined by bisection in log space around the best point, each fit warm-started from the
nearest solution already found. Our objective is the *mean* cross-entropy plus l2/2 ||W||^2 (bias not penalised), so
sklearn's C on N samples corresponds to l2 = 1 / (C N).

Features are standardised (per dimension, with the mean and standard deviation of the rows being fitted; the
same affine map is applied to the rows being scored). The problem stays a linear classifier of the raw
features; the penalty then acts on standardised weights, so chosen `l2` values are not comparable with CLIP's C.
Standardising leaves the features' correlations, which make small-l2 fits ill-conditioned, so L-BFGS runs in
whitened coordinates (`minimise_lbfgs`): the same optimum in several times fewer iterations. A fit runs on as many
CPU threads as its size repays (`threads_for_work`), never more than the caller's.

`sgd_linear_probe` is the protocol of SLIP's `main_linear.py` (MoCo v3's `main_lincls.py`): a linear layer
initialised N(0, 0.01^2) with zero bias, trained with momentum SGD under a per-epoch cosine schedule and no
weight decay, no normalisation layer before the classifier. SLIP trains on freshly augmented images every
epoch (random resized crop + flip); here the features are the cached centre crops, so every epoch sees the
same inputs, which is cheaper and usually scores a little lower than SLIP's numbers.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slip.checks import positive_int
from slip.eval.features import check_features, standardize
from slip.eval.l2_sweep import L2Sweep, check_val_fraction, sweep_l2_and_refit, sweep_summary
from slip.eval.metrics import report, topk_accuracy

__all__ = [
    "MULTIPLY_ADDS_PER_THREAD",
    "SLIP_SGD_BATCH_SIZE",
    "SLIP_SGD_EPOCHS",
    "SLIP_SGD_LR",
    "fit_logistic_regression",
    "grouped_split",
    "lbfgs_start",
    "linear_probe",
    "minimise_lbfgs",
    "sgd_linear_probe",
    "stratified_split",
    "threads_for_work",
    "top1_then_loss",
]

# SLIP's main_linear.py on one 8-GPU node: 128 images per GPU (global batch 1024), 90 epochs, momentum 0.9,
# no weight decay, and a learning rate of 0.1 * int(128 / 8) / 256 = 0.00625 (it scales its base rate by
# int(per-GPU batch / world size) / 256).
SLIP_SGD_EPOCHS = 90
SLIP_SGD_BATCH_SIZE = 1024
SLIP_SGD_LR = 0.1 * (128 // 8) / 256
_LBFGS_HISTORY = 20
# One intra-op thread per this many multiply-adds of a loss evaluation (features [N, D] times weights [C, D]): 10-20
# ms of one core's matmul work, so that a thread joins only where its share outweighs waiting for the others. Below
# it a probe runs on one thread: where other work holds the other cores, a second thread mostly waits (a 5,664 x 192
# x 98-class fit ran 10x slower on two busy cores than on one).
MULTIPLY_ADDS_PER_THREAD = 1 << 28


def _check_num_classes(num_classes: int) -> int:
    """An int >= 2."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return num_classes


def _check_train_test(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int
) -> None:
    """Both splits are valid labelled features of the same width, on one device."""
    _check_num_classes(num_classes)
    check_features("train", train_x, train_y, num_classes)
    check_features("test", test_x, test_y, num_classes)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dims but test features {test_x.shape[1]}")
    if len({t.device for t in (train_x, train_y, test_x, test_y)}) != 1:
        raise ValueError("train and test features and labels must be on one device")


def stratified_split(labels: Tensor, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Sorted indices (fit, val): per class, a seeded random share `val_fraction` of its rows goes to val.

    Every class with at least two rows gives at least one to val and keeps at least one; a class with a
    single row keeps it. The result depends only on (labels, val_fraction, seed).
    """
    check_val_fraction(val_fraction)
    if labels.ndim != 1 or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor [N], got {tuple(labels.shape)} {labels.dtype}")
    generator = torch.Generator().manual_seed(seed)
    cpu_labels = labels.cpu()
    fit, val = [], []
    for label in torch.unique(cpu_labels).tolist():
        rows = (cpu_labels == label).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_val = min(len(rows) - 1, max(1, round(val_fraction * len(rows))))
        val.append(rows[:n_val])
        fit.append(rows[n_val:])
    val_idx = torch.cat(val).sort().values
    if len(val_idx) == 0:
        raise ValueError("the validation split is empty: every class has a single training row")
    return torch.cat(fit).sort().values.to(labels.device), val_idx.to(labels.device)


def grouped_split(groups: Sequence[Hashable], val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Sorted indices (fit, val) that keep every group on one side: the split of scikit-learn's
    ``GroupShuffleSplit(test_size=val_fraction, random_state=seed)``, val being its test side.

    The distinct groups (`groups` holds one per row), sorted, are shuffled by numpy's ``RandomState(seed)``; the first
    ceil(val_fraction * G) of them go to val, the other groups to fit. The share is of groups, not rows, and is not
    stratified by class. ValueError where either side would be empty (fewer than two groups, or a share that
    takes them all).
    """
    check_val_fraction(val_fraction)
    if len(groups) == 0:
        raise ValueError("no rows to split into groups")
    _, group_of_row = np.unique(np.asarray(groups), return_inverse=True)
    count = int(group_of_row.max()) + 1
    n_val = math.ceil(val_fraction * count)
    if n_val >= count:
        raise ValueError(f"{count} group{'s' * (count != 1)} cannot give a validation share of {val_fraction} and "
                         "keep one to fit")
    in_val = np.isin(group_of_row.reshape(-1), np.random.RandomState(seed).permutation(count)[:n_val])
    return torch.from_numpy(np.flatnonzero(~in_val)), torch.from_numpy(np.flatnonzero(in_val))


def _regularised_loss(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, l2: float) -> Tensor:
    """Mean cross-entropy of the linear classifier plus l2/2 ||weight||^2, in float64 from the logits on.

    The logits stay in the features' dtype; the softmax and the reductions are float64. Near the optimum the
    line search compares losses that differ by less than float32 resolution, and would stall far from it.
    """
    return F.cross_entropy((x @ weight.T + bias).double(), y) + 0.5 * l2 * weight.double().square().sum()


def fit_logistic_regression(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = 1000,
    init: tuple[Tensor, Tensor] | None = None,
    tol: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """(weight [C, D], bias [C]) minimising mean cross-entropy + l2/2 ||weight||^2 with full-batch L-BFGS.

    Runs `minimise_lbfgs` from `init` (else zeros) until the largest gradient entry is at most `tol * l2`, the
    loss stops changing (the float32 floor), or `max_iter` iterations. The objective is l2-strongly convex in
    the weights, so the stopping rule bounds their error by about `tol` whatever l2 is: scikit-learn's lbfgs rule
    in our scaling when its objective was C times the summed loss, as in the version CLIP used (today's stops
    at a largest entry of `tol` on the mean loss, 1/l2 times looser). The computation stays in the dtype and on
    the device of `x`; the features are used as given (no standardisation).
    """
    num_classes = _check_num_classes(num_classes)
    check_features("fit", x, y, num_classes)
    weight, bias = lbfgs_start(x, num_classes, l2, max_iter, tol, init)
    y = y.long()
    return minimise_lbfgs(lambda w, b: _regularised_loss(x, y, w, b, float(l2)), weight, bias, l2, max_iter, tol,
                          x)


def lbfgs_start(x: Tensor, outputs: int, l2: float, max_iter: int, tol: float,
                init: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """The checked starting point (weight [outputs, D], bias [outputs]) of a linear fit of `x`: `init` in the dtype
    and on the device of `x`, else zeros; raises ValueError for a bad l2, tol, max_iter or init shape."""
    positive_int("max_iter", max_iter)
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not (math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    shape = (outputs, x.shape[1])
    if init is None:
        return x.new_zeros(shape), x.new_zeros(outputs)
    weight, bias = (t.detach().to(x) for t in init)
    if weight.shape != shape or bias.shape != (outputs,):
        raise ValueError(f"init must be (weight {shape}, bias ({outputs},)), got "
                         f"({tuple(weight.shape)}, {tuple(bias.shape)})")
    return weight, bias


@contextmanager
def threads_for_work(multiply_adds: int, device: torch.device) -> Iterator[int]:
    """Run the block on one CPU thread per `MULTIPLY_ADDS_PER_THREAD` of work per step (at least one, at most the
    caller's count); yields that count and restores the caller's afterwards. Other devices: the count is unchanged."""
    caller = torch.get_num_threads()
    wanted = caller if device.type != "cpu" else max(1, min(caller, multiply_adds // MULTIPLY_ADDS_PER_THREAD))
    if wanted == caller:
        yield caller
        return
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(caller)


class _Converged(Exception):
    """Raised from the L-BFGS closure at the first evaluated point that meets the gradient rule; carries it."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.solution = weight, bias


def _whitening(features: Tensor, l2: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [D], basis [D, D], scale [D]) of the change of variables weight = (u * scale) @ basis.T and
    bias = c - weight @ mean, where basis and scale come from the eigendecomposition of the features' covariance
    plus l2: in (u, c) the curvature of the penalised loss no longer spans the covariance's eigenvalue range."""
    mean = features.mean(dim=0)
    # X^T X / N - mean mean^T avoids a centred copy of the features; it only has to be a fair preconditioner.
    covariance = (features.T @ features).double() / features.shape[0] - torch.outer(mean.double(), mean.double())
    eigenvalues, basis = torch.linalg.eigh(covariance)
    curvature = eigenvalues.clamp(min=0) + l2
    floor = max(1e-6 * float(curvature.max()), 1e-12)  # directions with no variance and no penalty stay finite
    return mean, basis.to(features), curvature.clamp(min=floor).rsqrt().to(features)


def minimise_lbfgs(loss: Callable[[Tensor, Tensor], Tensor], weight: Tensor, bias: Tensor, l2: float,
                   max_iter: int, tol: float, features: Tensor) -> tuple[Tensor, Tensor]:
    """(weight, bias) minimising `loss(weight, bias)`, a penalised loss of the linear map `features @ weight.T + bias`,
    by full-batch L-BFGS from the given start: strong-Wolfe line search, stopped at the first evaluated point whose
    largest gradient entry (in weight and bias) is at most `tol * l2`, when the loss stops changing, or after
    `max_iter` iterations (sklearn's lbfgs rule in our scaling; see `fit_logistic_regression`).

    L-BFGS runs in whitened coordinates (`_whitening` of `features`): the same minimiser, reached in far fewer
    iterations when the features are correlated, as embeddings are; and on the CPU threads that
    `threads_for_work` gives a loss evaluation of this size.
    """
    with threads_for_work(features.shape[0] * features.shape[1] * weight.shape[0], features.device):
        return _whitened_lbfgs(loss, weight, bias, l2, max_iter, tol, features)


def _whitened_lbfgs(loss: Callable[[Tensor, Tensor], Tensor], weight: Tensor, bias: Tensor, l2: float,
                    max_iter: int, tol: float, features: Tensor) -> tuple[Tensor, Tensor]:
    """`minimise_lbfgs` on the threads it was given: torch's L-BFGS on (u, c), the gradient rule on (weight, bias)."""
    mean, basis, scale = _whitening(features, l2)
    with torch.no_grad():
        u = ((weight.detach() @ basis) / scale).requires_grad_(True)
        c = (bias.detach() + weight.detach() @ mean).requires_grad_(True)
    # The gradient rule is checked in the closure, on (weight, bias); torch's own test on (u, c) is switched off.
    optimizer = torch.optim.LBFGS([u, c], lr=1.0, max_iter=max_iter, tolerance_grad=0.0, tolerance_change=1e-12,
                                  history_size=_LBFGS_HISTORY, line_search_fn="strong_wolfe")

    def to_weight_and_bias() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            weight = (u * scale) @ basis.T
            return weight, c - weight @ mean

    def closure() -> Tensor:
        weight, bias = (t.requires_grad_(True) for t in to_weight_and_bias())
        value = loss(weight, bias)
        grad_weight, grad_bias = torch.autograd.grad(value, (weight, bias))
        if max(float(grad_weight.abs().max()), float(grad_bias.abs().max())) <= tol * l2:
            raise _Converged(weight.detach(), bias.detach())
        with torch.no_grad():  # the chain rule through bias = c - weight @ mean and weight = (u * scale) @ basis.T
            u.grad = ((grad_weight - grad_bias[:, None] * mean) @ basis) * scale
            c.grad = grad_bias
        return value.detach()

    try:
        with torch.enable_grad():
            optimizer.step(closure)
    except _Converged as converged:
        return converged.solution
    return to_weight_and_bias()


def top1_then_loss(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """How `linear_probe` ranks the points of its l2 sweep: validation top-1, then the lower cross-entropy."""
    return topk_accuracy(logits, labels, (1,))["top1"], -F.cross_entropy(logits, labels).item()


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    sweep: L2Sweep = L2Sweep(),
    metric: str = "top1",
    groups: Sequence[Hashable] | None = None,
) -> dict[str, object]:
    """CLIP's linear probe: choose l2 by `sweep` on a validation split of train, refit on all of train, score
    test (top-1/top-5, plus the dataset's own `metric` from `slip.eval.metrics.DATASET_METRICS`).

    The split is `stratified_split`, or with `groups` (one per training row) `grouped_split`, which keeps each group
    on one side. Returns {"top1", "top5" (with >= 5 classes), "l2", "val_top1", "sweep": [[l2, val_top1], ...]}
    (accuracies in percent; the sweep sorted by l2). The best l2 has the highest validation accuracy;
    ties go to the lower validation cross-entropy. All work runs in float32 on the features' device.
    """
    _check_train_test(train_x, train_y, test_x, test_y, num_classes)
    train_x, test_x = train_x.float(), test_x.float()
    train_y, test_y = train_y.long(), test_y.long()
    if groups is None:
        fit_rows, val_rows = stratified_split(train_y, sweep.val_fraction, sweep.seed)
    elif len(groups) != len(train_y):
        raise ValueError(f"groups has {len(groups)} entries for {len(train_y)} training rows")
    else:
        fit_rows, val_rows = (rows.to(train_y.device) for rows in grouped_split(groups, sweep.val_fraction, sweep.seed))
    test_logits, best, scores = sweep_l2_and_refit(
        lambda x, y, l2, init: fit_logistic_regression(x, y, num_classes, l2, sweep.max_iter, init=init),
        top1_then_loss, (train_x, train_y), fit_rows, val_rows, test_x, sweep)
    return {**report(metric, test_logits, test_y), **sweep_summary(best, scores, "top1")}


def sgd_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    epochs: int = SLIP_SGD_EPOCHS,
    batch_size: int = SLIP_SGD_BATCH_SIZE,
    lr: float = SLIP_SGD_LR,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    normalize: bool = False,
    seed: int = 0,
    metric: str = "top1",
) -> dict[str, float]:
    """SLIP's linear-probe protocol on cached features: momentum SGD, per-epoch cosine lr, then test top-k.

    `normalize=True` standardises the features with the training statistics first (what a BatchNorm without
    affine parameters in front of the classifier does at test time, as in MAE's probe); SLIP has none.
    Returns {"top1", "top5" (with >= 5 classes)} and the dataset's own `metric` when another, in percent.
    """
    _check_train_test(train_x, train_y, test_x, test_y, num_classes)
    epochs = positive_int("epochs", epochs)
    batch_size = positive_int("batch_size", batch_size)
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    train_x, test_x = train_x.float(), test_x.float()
    train_y, test_y = train_y.long(), test_y.long()
    if normalize:
        to_space = standardize(train_x)
        train_x, test_x = to_space(train_x), to_space(test_x)
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(num_classes, train_x.shape[1], generator=generator)).to(train_x)
    bias = train_x.new_zeros(num_classes)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.SGD([weight, bias], lr=lr, momentum=momentum, weight_decay=weight_decay)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        order = torch.randperm(train_x.shape[0], generator=generator).to(train_x.device)
        for rows in order.split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                F.cross_entropy(train_x[rows] @ weight.T + bias, train_y[rows]).backward()
            optimizer.step()
    with torch.no_grad():
        return report(metric, test_x @ weight.T + bias, test_y)
