"""Linear probes: L-BFGS logistic regression against float64 references, the l2 sweep, the split, SGD protocol."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slip.eval.linear_probe import (
    MULTIPLY_ADDS_PER_THREAD,
    fit_logistic_regression,
    grouped_split,
    linear_probe,
    minimise_lbfgs,
    sgd_linear_probe,
    stratified_split,
    threads_for_work,
)
from slip.eval.features import standardize
from slip.eval.l2_sweep import DEFAULT_L2_GRID, L2Sweep, log_grid_search
from slip.eval.metrics import topk_accuracy


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(seed: int, n: int, dims: int = 5, classes: int = 3, spread: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian classes, with an offset and uneven scales (not separable)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=torch.Generator().manual_seed(1234))
    y = torch.arange(n) % classes
    x = centres[y] + spread * torch.randn(n, dims, generator=g)
    return x * torch.linspace(0.5, 2.0, dims) + 0.3, y


def float64_gradient(x, y, weight, bias, l2):
    """Gradient of mean cross-entropy + l2/2 ||W||^2, written out by hand in float64."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    logits = x @ weight.T + bias
    p = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    p = p / p.sum(dim=1, keepdim=True)
    p[torch.arange(len(y)), y] -= 1.0
    residual = p / len(y)
    return residual.T @ x + l2 * weight, residual.sum(dim=0)


def newton_reference(x, y, num_classes, l2, max_steps=50):
    """The regularised optimum by Newton's method in float64 with the exact Hessian."""
    n, d = x.shape
    x = x.double()
    augmented = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    theta = torch.zeros(num_classes, d + 1, dtype=torch.float64)
    penalty = torch.zeros(num_classes, d + 1, dtype=torch.float64)
    penalty[:, :d] = l2
    for _ in range(max_steps):
        grad_w, grad_b = float64_gradient(x, y, theta[:, :d], theta[:, d], l2)
        grad = torch.cat([grad_w, grad_b[:, None]], dim=1).flatten()
        if grad.abs().max() < 1e-14:
            break
        probs = torch.softmax(augmented @ theta.T, dim=1)
        # H[c, j, e, k] = mean_i (p_ic [c == e] - p_ic p_ie) a_ij a_ik, plus the penalty on the weights.
        curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        hessian = torch.einsum("ice,ij,ik->cjek", curvature, augmented, augmented) / n
        hessian = hessian.reshape(grad.numel(), grad.numel()) + torch.diag(penalty.flatten())
        # Adding a constant to every bias changes nothing, so the Hessian is singular: use the pseudo-inverse.
        theta = theta - (torch.linalg.pinv(hessian) @ grad).view(num_classes, d + 1)
    return theta[:, :d], theta[:, d]


@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_lbfgs_solution_is_stationary_and_matches_newton(l2):
    x, y = blobs(0, 60)
    weight, bias = fit_logistic_regression(x, y, 3, l2)
    assert weight.dtype == torch.float32 and weight.shape == (3, 5) and bias.shape == (3,)
    grad_w, grad_b = float64_gradient(x, y, weight, bias, l2)
    assert grad_w.abs().max() < 1e-5 and grad_b.abs().max() < 1e-5
    ref_w, ref_b = newton_reference(x, y, 3, l2)
    ref_grad_w, ref_grad_b = float64_gradient(x, y, ref_w, ref_b, l2)
    assert ref_grad_w.abs().max() < 1e-12 and ref_grad_b.abs().max() < 1e-12
    assert torch.allclose(weight.double(), ref_w, rtol=0, atol=1e-3 * ref_w.abs().max().item())
    # Biases are defined up to a common shift.
    assert torch.allclose(bias.double() - bias.double().mean(), ref_b - ref_b.mean(), atol=1e-3)


@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_lbfgs_solution_is_scikit_learns_multinomial_logistic_regression(l2):
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(2, 90)
    weight, bias = fit_logistic_regression(x.double(), y, 3, l2, tol=1e-10)
    # Mean cross-entropy + l2/2 |W|^2 is sklearn's C * summed cross-entropy + 1/2 |W|^2 with C = 1 / (l2 N).
    reference = linear_model.LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-12, max_iter=10_000)
    reference.fit(x.double().numpy(), y.numpy())
    want_w, want_b = torch.from_numpy(reference.coef_), torch.from_numpy(reference.intercept_)
    assert torch.allclose(weight, want_w, rtol=0, atol=1e-4 * max(1.0, want_w.abs().max().item()))
    # Biases are defined up to a common shift (unpenalised).
    assert torch.allclose(bias - bias.mean(), want_b - want_b.mean(), atol=1e-4)


def test_warm_start_reaches_the_same_solution():
    x, y = blobs(1, 60)
    cold = fit_logistic_regression(x, y, 3, 1e-2)
    other_start = fit_logistic_regression(x, y, 3, 1.0)
    other_start[1].add_(torch.tensor([5.0, -2.0, 0.0]))
    warm = fit_logistic_regression(x, y, 3, 1e-2, init=other_start)
    assert torch.allclose(warm[0], cold[0], atol=1e-3)
    assert torch.allclose(warm[1] - warm[1].mean(), cold[1] - cold[1].mean(), atol=1e-3)


def correlated_features(seed: int, n: int, dims: int = 8, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 features that share one strong factor, the class signal a small part of each (as embeddings do):
    the covariance's eigenvalues span more than three decades."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(classes, dims, generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, 1, generator=g) + 0.05 * (centres[y] + torch.randn(n, dims, generator=g))
    return x.double(), y


@pytest.mark.parametrize("l2", [1e-2, 1e-4])
def test_correlated_features_converge_in_twenty_iterations_to_newtons_optimum(l2):
    x, y = correlated_features(0, 300)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(x.T))
    assert eigenvalues.max() / eigenvalues.min() > 1000
    weight, bias = fit_logistic_regression(x, y, 3, l2, max_iter=20)
    grad_w, grad_b = float64_gradient(x, y, weight, bias, l2)
    assert grad_w.abs().max() < 1e-6 and grad_b.abs().max() < 1e-6
    ref_w, ref_b = newton_reference(x, y, 3, l2)
    assert torch.allclose(weight, ref_w, rtol=0, atol=1e-4 * ref_w.abs().max().item())
    assert torch.allclose(bias - bias.mean(), ref_b - ref_b.mean(), atol=1e-4 * ref_w.abs().max().item())


def test_threads_follow_the_work_and_the_callers_count_comes_back():
    torch.set_num_threads(2)
    try:
        with threads_for_work(MULTIPLY_ADDS_PER_THREAD - 1, torch.device("cpu")) as threads:
            assert threads == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads_for_work(8 * MULTIPLY_ADDS_PER_THREAD, torch.device("cpu")) as threads:
            assert threads == torch.get_num_threads() == 2  # never more than the caller's
        with pytest.raises(RuntimeError, match="inside"):
            with threads_for_work(10, torch.device("cpu")):
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_a_small_fit_runs_on_one_thread_and_restores_the_callers():
    x, y = blobs(0, 60)
    seen = []

    def loss(weight, bias):
        seen.append(torch.get_num_threads())
        return F.cross_entropy((x @ weight.T + bias).double(), y) + 5e-4 * weight.double().square().sum()

    torch.set_num_threads(2)
    try:
        weight, bias = minimise_lbfgs(loss, torch.zeros(3, 5), torch.zeros(3), 1e-3, 100, 1e-4, x)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert seen and set(seen) == {1}
    reference = fit_logistic_regression(x, y, 3, 1e-3)  # the same objective
    assert torch.allclose(weight, reference[0], atol=1e-3)


def test_fit_rejects_bad_input():
    x, y = blobs(0, 12)
    with pytest.raises(ValueError, match="l2"):
        fit_logistic_regression(x, y, 3, -1.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_logistic_regression(x, y, 2, 1.0)
    with pytest.raises(ValueError, match="12 feature rows but 11 labels"):
        fit_logistic_regression(x, y[:11], 3, 1.0)
    with pytest.raises(ValueError, match="init"):
        fit_logistic_regression(x, y, 3, 1.0, init=(torch.zeros(3, 4), torch.zeros(3)))
    with pytest.raises(ValueError, match="NaN"):
        fit_logistic_regression(x.masked_fill(x > 1, float("nan")), y, 3, 1.0)


def test_standardize_uses_reference_statistics():
    x, _ = blobs(2, 50)
    x[:, 2] = 7.0  # a constant column stays finite
    out = standardize(x[:30])(x)
    reference = x[:30].double()
    std = reference.std(dim=0, unbiased=False)
    std[2] = 1.0
    expected = (x.double() - reference.mean(dim=0)) / std
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_stratified_split_is_deterministic_disjoint_and_per_class():
    shuffle = torch.randperm(25, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3] * 1 + [4] * 7)[shuffle]
    fit, val = stratified_split(labels, 0.2, seed=3)
    again_fit, again_val = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(fit, again_fit) and torch.equal(val, again_val)
    assert sorted(fit.tolist() + val.tolist()) == list(range(25))
    assert not set(fit.tolist()) & set(val.tolist())
    expected_val = {0: 2, 1: 1, 2: 1, 3: 0, 4: 1}  # round(0.2 n), at least 1, keeping one in fit
    assert {c: int((labels[val] == c).sum()) for c in range(5)} == expected_val
    other_fit, other_val = stratified_split(labels, 0.2, seed=4)
    assert not torch.equal(val, other_val)
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 1.0)


def generated_groups(seed: int, count: int, rows: int, as_text: bool) -> list:
    """`rows` group ids drawn unevenly from `count` groups (every group used), in a shuffled row order."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.arange(count), torch.multinomial(torch.rand(count, generator=g) ** 3, rows - count,
                                                             replacement=True, generator=g)])
    ids = ids[torch.randperm(rows, generator=g)].tolist()
    return [f"object-{i:03d}" for i in ids] if as_text else [7 * i - 40 for i in ids]


@pytest.mark.parametrize("count, rows, val_fraction, seed, as_text", [
    (10, 60, 0.2, 0, True), (37, 400, 0.2, 3, False), (5, 9, 0.5, 1, True), (120, 1000, 0.07, 11, False),
    (2, 30, 0.2, 5, True), (64, 65, 0.33, 2, False),
])
def test_grouped_split_is_scikit_learns_group_shuffle_split(count, rows, val_fraction, seed, as_text):
    sklearn_model_selection = pytest.importorskip("sklearn.model_selection")
    groups = generated_groups(seed, count, rows, as_text)
    fit, val = grouped_split(groups, val_fraction, seed)
    splitter = sklearn_model_selection.GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    expected_fit, expected_val = next(splitter.split(torch.zeros(rows, 1).numpy(), groups=groups))
    assert fit.tolist() == expected_fit.tolist() and val.tolist() == expected_val.tolist()
    assert sorted(fit.tolist() + val.tolist()) == list(range(rows))
    fit_groups, val_groups = {groups[i] for i in fit.tolist()}, {groups[i] for i in val.tolist()}
    assert not fit_groups & val_groups  # every group whole on one side
    assert len(val_groups) == math.ceil(val_fraction * count) and len(fit_groups) == count - len(val_groups)


def test_grouped_split_refuses_a_side_left_empty():
    with pytest.raises(ValueError, match=r"^1 group cannot give a validation share of 0\.2 and keep one to fit$"):
        grouped_split(["a"] * 5, 0.2)
    with pytest.raises(ValueError, match="3 groups cannot give a validation share of 0.7"):
        grouped_split(["a", "b", "c"], 0.7)
    with pytest.raises(ValueError, match="val_fraction"):
        grouped_split(["a", "b"], 0.0)
    x, y = blobs(0, 20)
    with pytest.raises(ValueError, match="groups has 19 entries for 20 training rows"):
        linear_probe(x, y, x, y, 3, groups=list(range(19)))


def renditions(seed: int, objects_per_class: int = 20, classes: int = 4, copies: int = 4,
               dims: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, labels, object ids): `copies` near-identical renditions of each object, whose own look outweighs
    its class's, so that telling renditions of a seen object apart is easy and a new object's class is not."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=torch.Generator().manual_seed(99))
    object_class = torch.arange(objects_per_class * classes) % classes
    looks = 0.5 * centres[object_class] + 1.5 * torch.randn(len(object_class), dims, generator=g)
    objects = torch.arange(len(object_class)).repeat_interleave(copies)
    return looks[objects] + 0.3 * torch.randn(len(objects), dims, generator=g), object_class[objects], objects


def test_grouped_validation_does_not_leak_renditions_and_picks_more_regularisation():
    train_x, train_y, objects = renditions(0)
    test_x, test_y, _ = renditions(100)  # new objects of the same classes
    sweep = L2Sweep(refinements=0)
    leaky = linear_probe(train_x, train_y, test_x, test_y, 4, sweep)
    grouped = linear_probe(train_x, train_y, test_x, test_y, 4, sweep, groups=objects.tolist())
    # A random split puts renditions of one object on both sides: validation reads far above test.
    assert leaky["val_top1"] - leaky["top1"] > 25 and leaky["l2"] == min(DEFAULT_L2_GRID)
    # Whole objects held out: validation reads like test, and the sweep regularises more and scores better.
    assert abs(grouped["val_top1"] - grouped["top1"]) < 15
    assert grouped["l2"] >= 1e3 * leaky["l2"] and grouped["top1"] > leaky["top1"]


def test_topk_accuracy_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(40, 7, generator=g), torch.randint(0, 7, (40,), generator=g)
    result = topk_accuracy(scores, labels)
    for k in (1, 5):
        hits = sum(int(labels[i]) in sorted(range(7), key=lambda c: -scores[i, c].item())[:k] for i in range(40))
        assert result[f"top{k}"] == pytest.approx(100.0 * hits / 40)
    assert set(topk_accuracy(scores[:, :3], labels.clamp(max=2))) == {"top1"}


def test_log_grid_search_finds_the_peak_by_bisection():
    calls = []

    def score(value):
        calls.append(value)
        return (-(math.log10(value) - 0.37) ** 2,)

    best, scores = log_grid_search(score, L2Sweep(refinements=4))
    assert abs(math.log10(best) - 0.37) <= 1 / 16
    assert len(calls) == len(DEFAULT_L2_GRID) + 2 * 4 and set(calls) == set(scores)
    assert best == max(scores, key=scores.get)
    # Ties keep the value found first.
    first, _ = log_grid_search(lambda value: (1.0,), L2Sweep(l2_grid=(1.0, 10.0, 0.1), refinements=2))
    assert first == 1.0


PATTERN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


def nuisance_problem(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes whose signal is buried in a strong nuisance that a second feature pair measures.

    Only weak regularisation lets the classifier subtract the nuisance; strong regularisation shrinks
    towards the class-mean direction, which ignores the nuisance pair and is near chance.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    nuisance = 3.0 * torch.randn(n, 2, generator=g)
    x = torch.cat([PATTERN[y] + nuisance, nuisance + 0.3 * torch.randn(n, 2, generator=g),
                   torch.randn(n, 20, generator=g)], dim=1)
    return x, y


def val_accuracy(train_x, train_y, l2, val_fraction, seed):
    """Validation top-1 of a cold-started fit at `l2`, recomputed from the pieces."""
    fit, val = stratified_split(train_y, val_fraction, seed)
    to_space = standardize(train_x[fit])
    weight, bias = fit_logistic_regression(to_space(train_x[fit]), train_y[fit], 4, l2)
    predictions = (to_space(train_x[val]) @ weight.T + bias).argmax(dim=1)
    return 100.0 * (predictions == train_y[val]).double().mean().item(), len(val)


def test_linear_probe_picks_the_best_validation_l2():
    train_x, train_y = nuisance_problem(0, 320)
    test_x, test_y = nuisance_problem(1, 200)
    result = linear_probe(train_x, train_y, test_x, test_y, 4, L2Sweep(val_fraction=0.5, seed=0))
    sweep = dict((l2, top1) for l2, top1 in result["sweep"])
    assert [l2 for l2, _ in result["sweep"]] == sorted(sweep)
    assert set(DEFAULT_L2_GRID) <= set(sweep) and len(sweep) == len(DEFAULT_L2_GRID) + 8
    assert result["val_top1"] == sweep[result["l2"]] == max(sweep.values())
    # The constructed problem needs weak regularisation: strong l2 is far worse on validation.
    assert result["l2"] < 1e-2 and result["val_top1"] > max(sweep[1.0], sweep[100.0]) + 30
    # The recorded validation accuracies are those of independent cold-started fits.
    for l2 in (result["l2"], 1.0, 1e-6):
        accuracy, n_val = val_accuracy(train_x, train_y, l2, 0.5, 0)
        assert abs(accuracy - sweep[l2]) <= 100.0 / n_val + 1e-9
    # The test score is that of a refit on all of train at the chosen l2.
    to_space = standardize(train_x)
    weight, bias = fit_logistic_regression(to_space(train_x), train_y, 4, result["l2"])
    test_top1 = 100.0 * ((to_space(test_x) @ weight.T + bias).argmax(dim=1) == test_y).double().mean().item()
    assert abs(result["top1"] - test_top1) <= 100.0 / len(test_y) + 1e-9
    assert "top5" not in result


def test_linear_probe_reports_top5_with_five_classes_and_checks_inputs():
    x, y = blobs(3, 100, dims=4, classes=5, spread=0.3)
    result = linear_probe(x[:70], y[:70], x[70:], y[70:], 5, L2Sweep(l2_grid=(1e-2, 1e-4), refinements=1))
    assert result["top1"] >= 90.0 and result["top5"] == 100.0 and len(result["sweep"]) == 4
    with pytest.raises(ValueError, match="4 dims but test features 3"):
        linear_probe(x, y, x[:, :3], y, 5)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(x, y, x, y, 1)


def test_sgd_probe_learns_and_is_seeded():
    x, y = blobs(4, 400, dims=6, classes=5, spread=0.25)
    kwargs = dict(epochs=10, batch_size=64, lr=0.1, seed=7)
    first = sgd_linear_probe(x[:300], y[:300], x[300:], y[300:], 5, **kwargs)
    second = sgd_linear_probe(x[:300], y[:300], x[300:], y[300:], 5, **kwargs)
    assert first == second and first["top1"] >= 90.0 and set(first) == {"top1", "top5"}
    normalized = sgd_linear_probe(x[:300], y[:300], x[300:], y[300:], 5, normalize=True, **kwargs)
    assert normalized["top1"] >= 90.0
    # With a zero learning rate the classifier stays at its N(0, 0.01^2) start: near chance, not 90 %.
    frozen = sgd_linear_probe(x[:300], y[:300], x[300:], y[300:], 5, **{**kwargs, "lr": 0.0})
    assert frozen["top1"] < 60.0
    with pytest.raises(ValueError, match="momentum"):
        sgd_linear_probe(x, y, x, y, 5, momentum=-0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"l2_grid": ()}, r"^l2_grid must be non-empty positive finite numbers, got \[\]$"),
    ({"l2_grid": (1.0, -1.0)}, r"^l2_grid must be non-empty positive finite numbers"),
    ({"val_fraction": 0}, r"^val_fraction must be in \(0, 1\), got 0$"),
    ({"refinements": -1}, r"^refinements must be >= 0, got -1$"),
    ({"max_iter": 0}, r"^max_iter must be a positive integer, got 0$"),
    ({"seed": True}, r"^seed must be >= 0, got True$"),
])
def test_a_bad_sweep_setting_fails_on_construction_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        L2Sweep(**kwargs)


def test_the_sweep_holds_its_grid_as_floats_in_the_order_given():
    assert L2Sweep(l2_grid=[1, 0.1]).l2_grid == (1.0, 0.1)
    assert L2Sweep().l2_grid == DEFAULT_L2_GRID
