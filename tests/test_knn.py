"""kNN classification: chunked, vectorised scores equal a per-row float64 loop; accuracy; argument checks."""
from __future__ import annotations

import math

import pytest
import torch

from slip.eval.knn import KnnVote, knn_accuracy, knn_predict


pytestmark = pytest.mark.usefixtures("one_thread")


def naive_knn_scores(train_x, train_y, test_x, num_classes, k, temperature):
    """Per test row: cosine to every train row, the k largest, exp(s / T) votes per class, normalised."""
    train = train_x.double().tolist()
    labels = train_y.tolist()
    out = []
    for row in test_x.double().tolist():
        row_norm = math.sqrt(sum(v * v for v in row))
        sims = []
        for j, other in enumerate(train):
            other_norm = math.sqrt(sum(v * v for v in other))
            sims.append((sum(a * b for a, b in zip(row, other)) / (row_norm * other_norm), j))
        votes = [0.0] * num_classes
        for sim, j in sorted(sims, reverse=True)[:k]:
            votes[labels[j]] += math.exp(sim / temperature)
        total = sum(votes)
        out.append([v / total for v in votes])
    return torch.tensor(out, dtype=torch.float64)


def clusters(seed, n, dims=6, classes=4, spread=0.6):
    """Noisy points around one random direction per class."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(classes, dims, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=g)
    return directions[y] + spread * torch.randn(n, dims, generator=g), y


@pytest.mark.parametrize("k, temperature, chunk_size", [(5, 0.07, 1024), (1, 0.5, 3), (20, 0.07, 7), (40, 2.0, 1)])
def test_scores_equal_a_naive_loop(k, temperature, chunk_size):
    train_x, train_y = clusters(0, 40)
    test_x, _ = clusters(1, 17)
    scores = knn_predict(train_x, train_y, test_x, 4, KnnVote(k, temperature, chunk_size))
    expected = naive_knn_scores(train_x, train_y, test_x, 4, k, temperature)
    assert scores.dtype == torch.float32 and scores.shape == (17, 4)
    assert torch.allclose(scores.double(), expected, atol=1e-5)


def test_low_temperature_does_not_overflow():
    train_x, train_y = clusters(0, 30)
    test_x, _ = clusters(1, 5)
    scores = knn_predict(train_x, train_y, test_x, 4, KnnVote(k=10, temperature=1e-3))
    assert torch.isfinite(scores).all() and torch.allclose(scores.sum(dim=1), torch.ones(5))


def test_accuracy_matches_the_naive_ranking():
    train_x, train_y = clusters(2, 60, classes=6)
    test_x, test_y = clusters(3, 25, classes=6)
    result = knn_accuracy(train_x, train_y, test_x, test_y, 6, KnnVote(k=7))
    expected = naive_knn_scores(train_x, train_y, test_x, 6, 7, 0.07)
    for k in (1, 5):
        hits = sum(int(test_y[i]) in expected[i].argsort(descending=True)[:k].tolist() for i in range(25))
        assert result[f"top{k}"] == pytest.approx(100.0 * hits / 25)
    assert result["top1"] > 50.0  # far above the 1/6 chance on these separable clusters


def test_exact_copies_are_their_own_nearest_neighbour():
    train_x, train_y = clusters(4, 30)
    scores = knn_predict(train_x, train_y, train_x * 3.0, 4, KnnVote(k=1))  # scale does not change cosine
    assert torch.equal(scores.argmax(dim=1), train_y)
    assert knn_accuracy(train_x, train_y, train_x, train_y, 4, KnnVote(k=1)) == {"top1": 100.0}


def test_bad_arguments_are_named():
    train_x, train_y = clusters(0, 10)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 10\]"):
        knn_predict(train_x, train_y, train_x, 4, KnnVote(k=11))
    with pytest.raises(ValueError, match="temperature"):
        KnnVote(temperature=0.0, k=3)
    with pytest.raises(ValueError, match="6 dims but test features 5"):
        knn_predict(train_x, train_y, train_x[:, :5], 4, KnnVote(k=3))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        knn_predict(train_x, train_y, train_x, 3, KnnVote(k=3))
