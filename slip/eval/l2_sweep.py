"""How the L-BFGS probes choose their L2 strength, shared by the single-label and the multi-label probe: the
sweep's settings (`L2Sweep`, checked once, on construction), the log-grid search, and CLIP's protocol of
choosing on a validation split of train, then refitting on all of train."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from slip.checks import non_negative_int, positive_int
from slip.eval.features import standardize

__all__ = ["DEFAULT_L2_GRID", "L2Sweep", "LinearFit", "check_val_fraction", "log_grid_search", "sweep_l2_and_refit",
           "sweep_summary"]

DEFAULT_L2_GRID = tuple(10.0 ** e for e in range(2, -7, -1))  # 1e2 .. 1e-6, strongest first


def check_val_fraction(val_fraction: float) -> None:
    """Raise ValueError unless the share of train held out for validation is a number in (0, 1)."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")


@dataclass(frozen=True)
class L2Sweep:
    """An L-BFGS probe's search for its L2 strength: the coarse grid (evaluated in this order), the bisection
    rounds around its best point, the share of train held out to score them, the iterations per fit, and the seed
    of the held-out split."""

    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID
    val_fraction: float = 0.2
    refinements: int = 4
    max_iter: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        grid = tuple(float(v) for v in self.l2_grid)
        if not grid or any(not (math.isfinite(v) and v > 0) for v in grid):
            raise ValueError(f"l2_grid must be non-empty positive finite numbers, got {list(self.l2_grid)}")
        object.__setattr__(self, "l2_grid", grid)
        check_val_fraction(self.val_fraction)
        non_negative_int("refinements", self.refinements)
        positive_int("max_iter", self.max_iter)
        non_negative_int("seed", self.seed)


def log_grid_search(
    score: Callable[[float], tuple[float, ...]], sweep: L2Sweep
) -> tuple[float, dict[float, tuple[float, ...]]]:
    """Maximise `score(v)` over positive v: `sweep.l2_grid`, then `sweep.refinements` rounds of bisection in log10
    space around the best.

    Each refinement halves the log step (starting from the grid's median log spacing) and scores the two points one
    step either side of the current best. Returns the best value and every score computed, by value; ties keep the
    value found first.
    """
    scores: dict[float, tuple[float, ...]] = {}
    best = sweep.l2_grid[0]
    for value in sweep.l2_grid:
        if value not in scores:
            scores[value] = score(value)
            if scores[value] > scores[best]:
                best = value
    logs = sorted({math.log10(v) for v in sweep.l2_grid})
    gaps = sorted(b - a for a, b in zip(logs, logs[1:]))
    step = gaps[len(gaps) // 2] if gaps else 1.0
    for _ in range(sweep.refinements):
        step /= 2
        centre = math.log10(best)
        for candidate in (10.0 ** (centre + step), 10.0 ** (centre - step)):
            if candidate not in scores:
                scores[candidate] = score(candidate)
            if scores[candidate] > scores[best]:
                best = candidate
    return best, scores


# fit(x, labels, l2, init or None) -> (weight, bias)
LinearFit = Callable[[Tensor, Tensor, float, "tuple[Tensor, Tensor] | None"], tuple[Tensor, Tensor]]


def sweep_l2_and_refit(
    fit: LinearFit,
    validation_score: Callable[[Tensor, Tensor], tuple[float, ...]],
    train: tuple[Tensor, Tensor],
    fit_rows: Tensor,
    val_rows: Tensor,
    test_x: Tensor,
    sweep: L2Sweep,
) -> tuple[Tensor, float, dict[float, tuple[float, ...]]]:
    """CLIP's protocol around a linear fit: choose l2 on the validation rows, refit on all of train, score test.

    `train` is (features, labels). `fit(x, labels, l2, init)` returns (weight, bias); each sweep point starts from
    the solution at the nearest l2 already fitted. `validation_score(logits, labels)` ranks the sweep points
    (`log_grid_search`: higher wins, ties keep the first). Features are standardised with the statistics of the
    rows being fitted: the fit rows during the sweep, all of train for the refit. Returns (test logits, the chosen
    l2, every score).
    """
    train_x, train_labels = train
    to_fit_space = standardize(train_x[fit_rows])
    fit_x, fit_labels = to_fit_space(train_x[fit_rows]), train_labels[fit_rows]
    val_x, val_labels = to_fit_space(train_x[val_rows]), train_labels[val_rows]
    solutions: dict[float, tuple[Tensor, Tensor]] = {}

    def score(l2: float) -> tuple[float, ...]:
        nearest = min(solutions, key=lambda v: abs(math.log10(v) - math.log10(l2)), default=None)
        solutions[l2] = fit(fit_x, fit_labels, l2, None if nearest is None else solutions[nearest])
        with torch.no_grad():
            return validation_score(val_x @ solutions[l2][0].T + solutions[l2][1], val_labels)

    best, scores = log_grid_search(score, sweep)
    to_train_space = standardize(train_x)
    weight, bias = fit(to_train_space(train_x), train_labels, best, solutions[best])
    with torch.no_grad():
        return to_train_space(test_x) @ weight.T + bias, best, scores


def sweep_summary(best: float, scores: dict[float, tuple[float, ...]], metric: str) -> dict[str, object]:
    """What a probe reports of its sweep: {"l2": the chosen l2, "val_<metric>": its validation score,
    "sweep": [[l2, validation score], ...] sorted by l2}."""
    return {"l2": best, f"val_{metric}": scores[best][0], "sweep": [[l2, scores[l2][0]] for l2 in sorted(scores)]}
