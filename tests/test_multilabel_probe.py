"""The multi-label (one-vs-rest) linear probe: per-class fits against scikit-learn, the loss against a loop, the
sweep, the split and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from slip.eval.l2_sweep import L2Sweep
from slip.eval.metrics import eleven_point_map
from slip.eval.multilabel_probe import fit_one_vs_rest, multilabel_linear_probe, one_vs_rest_loss, random_split

linear_model = pytest.importorskip("sklearn.linear_model")

pytestmark = pytest.mark.usefixtures("one_thread")


def multilabel_blobs(seed: int, rows: int, dims: int = 6, classes: int = 4,
                     ignored: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and [N, C] targets: class c is present where a noisy linear score of the features is positive;
    a share `ignored` of the entries is -1 ("difficult")."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dims, generator=generator) * torch.linspace(0.5, 2.0, dims) + 0.3
    directions = torch.randn(classes, dims, generator=torch.Generator().manual_seed(99))
    noisy = x @ directions.T + 1.5 * torch.randn(rows, classes, generator=generator)
    targets = (noisy > 0.2).long()
    targets[torch.rand(rows, classes, generator=generator) < ignored] = -1
    return x, targets


@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_each_class_is_scikit_learns_logistic_regression_on_the_images_counted_for_it(l2: float) -> None:
    x, targets = multilabel_blobs(0, 80)
    weight, bias = fit_one_vs_rest(x.double(), targets, l2, tol=1e-10)
    for column in range(targets.shape[1]):
        counted = targets[:, column] >= 0
        # Our per-class objective is the mean loss over its N_c images + l2/2 |w|^2: sklearn's C = 1 / (l2 N_c).
        reference = linear_model.LogisticRegression(C=1.0 / (l2 * int(counted.sum())), tol=1e-12, max_iter=10_000)
        reference.fit(x[counted].double().numpy(), targets[counted, column].numpy())
        want_w = torch.from_numpy(reference.coef_[0])
        # L-BFGS stops where the loss no longer changes in float64 (gradients ~1e-7): weights agree to ~1e-5.
        assert torch.allclose(weight[column], want_w, rtol=0, atol=1e-4 * max(1.0, want_w.abs().max().item()))
        assert bias[column].item() == pytest.approx(reference.intercept_[0], abs=1e-4)


def test_the_loss_is_a_sum_over_classes_of_the_mean_over_their_counted_images() -> None:
    x, targets = multilabel_blobs(1, 30)
    generator = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(4, 6, generator=generator), torch.randn(4, generator=generator)
    want = 0.0
    for column in range(4):
        losses = []
        for row in range(30):
            if targets[row, column] < 0:
                continue
            logit = float(x[row].double() @ weight[column].double() + bias[column].double())
            probability = 1 / (1 + math.exp(-logit))
            losses.append(-math.log(probability if targets[row, column] == 1 else 1 - probability))
        want += sum(losses) / len(losses)
    want += 0.5 * 0.3 * float(weight.double().square().sum())
    assert one_vs_rest_loss(x, targets, weight, bias, 0.3).item() == pytest.approx(want, rel=1e-6)


def test_a_class_nobody_is_counted_for_adds_nothing() -> None:
    x, targets = multilabel_blobs(2, 40)
    targets[:, 2] = -1
    weight, bias = fit_one_vs_rest(x.double(), targets, 1e-2, tol=1e-10)
    assert weight[2].abs().max() < 1e-12 and bias[2].abs().item() < 1e-12  # the penalty alone: zero
    others = fit_one_vs_rest(x.double(), targets[:, [0, 1, 3]], 1e-2, tol=1e-10)
    assert torch.allclose(weight[[0, 1, 3]], others[0], atol=1e-6)


def test_the_probe_learns_chooses_its_l2_by_validation_map_and_is_seeded() -> None:
    train_x, train_targets = multilabel_blobs(3, 200)
    test_x, test_targets = multilabel_blobs(4, 100)
    result = multilabel_linear_probe(train_x, train_targets, test_x, test_targets, L2Sweep(refinements=1, max_iter=200))
    assert set(result) == {"11point_map", "l2", "val_11point_map", "sweep"}
    sweep = dict((l2, value) for l2, value in result["sweep"])
    assert result["val_11point_map"] == sweep[result["l2"]] == max(sweep.values())
    chance = eleven_point_map(torch.rand(100, 4, generator=torch.Generator().manual_seed(5)),
                              test_targets)["11point_map"]
    assert result["11point_map"] > chance + 20
    assert multilabel_linear_probe(train_x, train_targets, test_x, test_targets,
                                   L2Sweep(refinements=1, max_iter=200)) == result


def test_the_random_split_is_seeded_disjoint_and_complete() -> None:
    fit, val = random_split(50, 0.2, seed=3)
    assert len(val) == 10 and sorted(torch.cat([fit, val]).tolist()) == list(range(50))
    assert torch.equal(random_split(50, 0.2, seed=3)[1], val) and not torch.equal(random_split(50, 0.2, seed=4)[1], val)
    assert [len(part) for part in random_split(2, 0.9)] == [1, 1]
    with pytest.raises(ValueError, match="at least 2 training rows, got 1"):
        random_split(1, 0.2)


def test_bad_input_is_named() -> None:
    x, targets = multilabel_blobs(5, 20)
    with pytest.raises(ValueError, match=r"train targets must be an integer tensor \[N, C\]"):
        multilabel_linear_probe(x, targets[:, 0], x, targets)
    with pytest.raises(ValueError, match="1 \\(present\\), 0 \\(absent\\) or -1"):
        fit_one_vs_rest(x, targets * 2, 1.0)
    with pytest.raises(ValueError, match="20 feature rows but 19 target rows"):
        fit_one_vs_rest(x, targets[:19], 1.0)
    with pytest.raises(ValueError, match="train is 6 dims x 4 classes but test 6 x 3"):
        multilabel_linear_probe(x, targets, x, targets[:, :3])
    with pytest.raises(ValueError, match="validation split holds no positive"):
        multilabel_linear_probe(x, torch.zeros_like(targets), x, targets)
