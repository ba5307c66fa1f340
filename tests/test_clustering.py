"""Clustering of clients by their public predictions: distances, greedy elimination, choice of ε,
k-means, cluster matching, and the soft-label aggregation rules they feed."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, silhouette_score

from hetpfl.algorithms.clustering import (
    adjusted_rand_index,
    auto_threshold,
    greedy_elimination,
    kmeans,
    match_clusters,
    oracle_threshold,
    pairwise_distances,
    silhouette,
)
from hetpfl.algorithms.soft_labels import aggregate_probabilities, hard_label_vote, majority_vote


def _symmetric(upper: dict[tuple[int, int], float], n: int) -> np.ndarray:
    d = np.zeros((n, n))
    for (i, j), v in upper.items():
        d[i, j] = d[j, i] = v
    return d


def _group_predictions(groups: int = 5, per_group: int = 5, n_public: int = 200, classes: int = 10,
                       noise: float = 0.3, seed: int = 0):
    """Clients of one group predict alike (their group's classes dominate), with client noise."""
    rng = np.random.default_rng(seed)
    probs, truth = [], []
    for g in range(groups):
        base = rng.dirichlet(np.ones(classes) * 0.3, size=n_public)
        own = np.arange(classes) % groups == g
        base[:, own] += 2.0
        for _ in range(per_group):
            logits = np.log(base) + rng.normal(0, noise, base.shape)
            p = np.exp(logits - logits.max(1, keepdims=True))
            probs.append((p / p.sum(1, keepdims=True)).astype(np.float32))
            truth.append(g)
    return probs, np.array(truth)


# -- distances -----------------------------------------------------------------------------------

def test_frobenius_distance_is_the_norm_of_the_difference():
    probs, _ = _group_predictions(groups=2, per_group=2, n_public=30)
    d = pairwise_distances(probs, "frobenius")
    for i in range(4):
        for j in range(4):
            assert d[i, j] == pytest.approx(np.linalg.norm(probs[i].astype(np.float64) - probs[j]), abs=1e-9)
    assert np.array_equal(d, d.T) and np.all(np.diag(d) == 0)


def test_symmetric_cross_entropy_distance():
    probs, _ = _group_predictions(groups=2, per_group=2, n_public=30)
    d = pairwise_distances(probs, "symmetric_ce")
    p, q = probs[0].astype(np.float64), probs[3].astype(np.float64)
    def ce(a, b):
        return -np.mean(np.sum(a * np.log(b), axis=1))

    assert d[0, 3] == pytest.approx(0.5 * (ce(p, q) + ce(q, p)), rel=1e-9)
    assert np.array_equal(d, d.T) and np.all(np.diag(d) == 0)


def test_unknown_distance_is_rejected():
    with pytest.raises(ValueError, match="symmetric_ce"):
        pairwise_distances([np.eye(3, dtype=np.float32)] * 2, "cosine")


# -- greedy elimination --------------------------------------------------------------------------

def test_greedy_elimination_on_a_hand_made_matrix():
    # 0-1-2 are mutually close, 3-4 close, 5 alone; 2 is also near 3 (but 0..2 is the larger group).
    d = _symmetric({(0, 1): 1, (0, 2): 1, (1, 2): 1, (3, 4): 1, (2, 3): 1,
                    (0, 3): 9, (0, 4): 9, (0, 5): 9, (1, 3): 9, (1, 4): 9, (1, 5): 9,
                    (2, 4): 9, (2, 5): 9, (3, 5): 9, (4, 5): 9}, 6)
    # client 2 has the most neighbours (0, 1, 3): cluster {0,1,2,3}; then 4 (alone now), then 5.
    np.testing.assert_array_equal(greedy_elimination(d, 1.0), [0, 0, 0, 0, 1, 2])
    np.testing.assert_array_equal(greedy_elimination(d, 0.5), [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(greedy_elimination(d, 9.0), [0, 0, 0, 0, 0, 0])


def test_greedy_elimination_ties_go_to_the_lowest_id():
    # a chain 0-1, 1-2, 2-3: clients 1 and 2 both have two neighbours; 1 wins the tie.
    d = _symmetric({(0, 1): 1, (1, 2): 1, (2, 3): 1, (0, 2): 5, (1, 3): 5, (0, 3): 5}, 4)
    np.testing.assert_array_equal(greedy_elimination(d, 1.0), [0, 0, 0, 1])
    # all equidistant: client 0 takes everyone
    np.testing.assert_array_equal(greedy_elimination(np.ones((4, 4)) - np.eye(4), 1.0), [0, 0, 0, 0])
    # two isolated pairs: the pair of the lowest id forms cluster 0
    d = _symmetric({(0, 3): 1, (1, 2): 1, (0, 1): 5, (0, 2): 5, (1, 3): 5, (2, 3): 5}, 4)
    np.testing.assert_array_equal(greedy_elimination(d, 1.0), [0, 1, 1, 0])


@pytest.mark.parametrize("seed", range(5))
def test_greedy_elimination_terminates_and_covers_everyone(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, 4))
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    for eps in [0.0, *np.quantile(d, [0.1, 0.5, 0.9]), d.max()]:
        labels = greedy_elimination(d, eps)
        assert labels.min() == 0 and set(labels.tolist()) == set(range(labels.max() + 1))
        # every member is within eps of its cluster's centre (the client picked first)
        for k in range(labels.max() + 1):
            members = np.flatnonzero(labels == k)
            assert any(np.all(d[c, members] <= eps) for c in members)
    assert greedy_elimination(d, d.max()).max() == 0


# -- choosing the threshold ----------------------------------------------------------------------

def test_oracle_search_stops_at_k_star_plus_a():
    probs, truth = _group_predictions()
    d = pairwise_distances(probs)
    choice = oracle_threshold(d, 5)
    assert choice.num_clusters <= 5
    assert adjusted_rand_score(truth, choice.labels) == 1.0
    assert choice.epsilon == pytest.approx(0.1 + 0.1 * round((choice.epsilon - 0.1) / 0.1))
    # ε one step smaller still gives more than K* clusters (the search stops at the first fit)
    assert greedy_elimination(d, choice.epsilon - 0.1).max() + 1 > 5
    assert oracle_threshold(d, 7).num_clusters <= 7
    assert oracle_threshold(d, 1).num_clusters == 1  # ends: one cluster once ε covers everything


def test_silhouette_matches_scikit_learn():
    probs, truth = _group_predictions(groups=3, per_group=4)
    d = pairwise_distances(probs)
    rng = np.random.default_rng(0)
    for labels in [truth, rng.integers(0, 3, len(truth)), np.r_[np.zeros(11, int), 1]]:
        assert silhouette(d, labels) == pytest.approx(silhouette_score(d, labels, metric="precomputed"), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("groups, per_group", [(5, 5), (5, 3), (3, 4), (2, 10)])
def test_auto_threshold_recovers_well_separated_groups(seed, groups, per_group):
    probs, truth = _group_predictions(groups=groups, per_group=per_group, seed=seed)
    for metric in ("frobenius", "symmetric_ce"):
        choice = auto_threshold(pairwise_distances(probs, metric))
        assert adjusted_rand_score(truth, choice.labels) == 1.0, (metric, choice)
        assert choice.num_clusters == groups and choice.score > 0.5


def test_auto_threshold_without_structure_gives_one_cluster():
    rng = np.random.default_rng(0)
    base = rng.dirichlet(np.ones(10), size=200)
    probs = []
    for _ in range(12):  # every client is the same model up to small noise
        p = base * np.exp(rng.normal(0, 0.05, base.shape))
        probs.append(p / p.sum(1, keepdims=True))
    choice = auto_threshold(pairwise_distances(probs))
    assert choice.num_clusters == 1
    assert auto_threshold(np.zeros((2, 2))).num_clusters == 1  # too few clients to score


# -- k-means and matching ------------------------------------------------------------------------

def test_kmeans_recovers_groups_and_is_deterministic():
    probs, truth = _group_predictions()
    x = np.stack([p.reshape(-1) for p in probs])
    labels, centroids = kmeans(x, 5, np.random.default_rng(3))
    assert adjusted_rand_score(truth, labels) == 1.0 and centroids.shape == (5, x.shape[1])
    again, _ = kmeans(x, 5, np.random.default_rng(3))
    np.testing.assert_array_equal(labels, again)
    warm, _ = kmeans(x, 5, np.random.default_rng(99), init=centroids)  # warm start keeps the ids
    np.testing.assert_array_equal(labels, warm)
    capped, _ = kmeans(x[:3], 5, np.random.default_rng(0))
    assert sorted(capped.tolist()) == [0, 1, 2]


def test_match_clusters_by_overlap():
    previous = np.array([7, 7, 7, 3, 3, -1])
    current = np.array([1, 1, 0, 0, 0, 2])
    assert match_clusters(previous, current) == {1: 7, 0: 3}
    assert match_clusters(np.full(4, -1), np.array([0, 0, 1, 1])) == {}


# -- aggregation rules ---------------------------------------------------------------------------

def test_aggregation_rules():
    a = np.array([[0.7, 0.2, 0.1]], np.float32)
    b = np.array([[0.1, 0.8, 0.1]], np.float32)
    c = np.array([[0.6, 0.3, 0.1]], np.float32)
    np.testing.assert_allclose(aggregate_probabilities([a, b, c], "mean"), [[14 / 30, 13 / 30, 3 / 30]], rtol=1e-6)
    np.testing.assert_allclose(aggregate_probabilities([a, b, c], "median"), np.array([[0.6, 0.3, 0.1]]), rtol=1e-6)
    np.testing.assert_allclose(aggregate_probabilities([a, b, c], "max"), np.array([[0.7, 0.8, 0.1]]) / 1.6, rtol=1e-6)
    with pytest.raises(ValueError, match="max"):
        aggregate_probabilities([a], "mode")


def test_majority_vote():
    labels = [np.array([0, 1, 2, 2]), np.array([0, 2, 1, 1]), np.array([1, 2, 0, 0])]
    np.testing.assert_array_equal(majority_vote(labels, 3), [0, 2, 0, 0])  # last two: 3-way ties → lowest
    probs = [np.eye(3, dtype=np.float32)[y] for y in labels]
    np.testing.assert_array_equal(hard_label_vote(probs, 3), np.eye(3, dtype=np.float32)[[0, 2, 0, 0]])
    with pytest.raises(ValueError, match="labels in 0..2"):
        majority_vote([np.array([0, 3])], 3)


def test_auto_threshold_scales_to_many_clients():
    probs, truth = _group_predictions(groups=4, per_group=25, n_public=50)
    d = pairwise_distances(probs)
    choice = auto_threshold(d, max_candidates=100)  # 4,950 distinct distances, 100 tried
    assert adjusted_rand_score(truth, choice.labels) == 1.0


def test_adjusted_rand_index_is_scikit_learns_to_the_bit():
    """The engine's ARI (no sklearn.metrics import at run time) equals ``adjusted_rand_score`` exactly,
    on random labelings, on equal ones (1.0), on empty ones and with -1 (unassigned) entries."""
    rng = np.random.default_rng(0)
    for trial in range(500):
        n = int(rng.integers(0, 30))
        truth = rng.integers(0, int(rng.integers(1, 6)), n)
        found = truth.copy() if trial % 4 == 0 else rng.integers(-1, int(rng.integers(1, 7)), n)
        assert adjusted_rand_index(truth, found) == adjusted_rand_score(truth, found)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == -0.5
    assert adjusted_rand_index([], []) == 1.0
