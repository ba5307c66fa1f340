"""The scalable clustering rules give the clusters the former ones gave (issue #14).

The former implementations (O(n³) greedy passes and merges, a pair loop for subspace angles) are
kept here as references, and the fast ones must give the same labels on inputs shaped like every
shipped config's (6 to 100 clients, grouped or not, both distance metrics, every linkage), and
the same distance matrices up to float rounding. ``benchmarks/clustering_scale.py`` times them.
"""

from __future__ import annotations

import numpy as np
import pytest

from hetpfl.algorithms.clustering import (
    LINKAGES,
    agglomerative,
    agglomerative_cuts,
    auto_threshold,
    greedy_elimination,
    num_clusters,
    oracle_threshold,
    pairwise_distances,
    silhouette,
    subspace_distance_matrix,
)

SHIPPED_SIZES = [6, 10, 20, 25, 50, 100]  # data.num_clients in configs/ and tests/configs/


# -- the former implementations --------------------------------------------------------------------


def former_greedy(dist, epsilon):
    near = dist <= epsilon
    np.fill_diagonal(near, True)
    n = len(dist)
    labels = np.full(n, -1, dtype=np.int64)
    remaining = np.ones(n, dtype=bool)
    cluster = 0
    while remaining.any():
        counts = np.where(remaining, (near & remaining[None, :]).sum(axis=1), -1)
        pick = int(np.argmax(counts))
        members = near[pick] & remaining
        labels[members] = cluster
        remaining &= ~members
        cluster += 1
    return labels


def former_silhouette(dist, labels):
    ids = np.unique(labels)
    n = len(labels)
    onehot = (labels[:, None] == ids[None, :]).astype(np.float64)
    sizes = onehot.sum(axis=0)
    sums = dist @ onehot
    own = np.searchsorted(ids, labels)
    rows = np.arange(n)
    own_size = sizes[own]
    a = np.where(own_size > 1, sums[rows, own] / np.maximum(own_size - 1, 1), 0.0)
    mean_other = sums / sizes[None, :]
    mean_other[rows, own] = np.inf
    b = mean_other.min(axis=1)
    denom = np.maximum(a, b)
    return float(np.where((own_size > 1) & (denom > 0), (b - a) / np.where(denom > 0, denom, 1.0), 0.0).mean())


def former_auto_threshold(dist, min_silhouette=0.25, max_candidates=1000):
    n = len(dist)
    if n < 3:
        return np.zeros(n, dtype=np.int64)
    thresholds = np.unique(dist[np.triu_indices(n, k=1)])
    if len(thresholds) > max_candidates:
        thresholds = np.unique(np.quantile(thresholds, np.linspace(0.0, 1.0, max_candidates), method="nearest"))
    best, seen = None, set()
    for epsilon in thresholds:
        labels = former_greedy(dist, float(epsilon))
        if labels.tobytes() in seen:
            continue
        seen.add(labels.tobytes())
        k = num_clusters(labels)
        if not 2 <= k <= n - 1:
            continue
        score = former_silhouette(dist, labels)
        if best is None or score > best[1] or (score == best[1] and k < num_clusters(best[0])):
            best = (labels, score)
    return np.zeros(n, dtype=np.int64) if best is None or best[1] < min_silhouette else best[0]


def former_agglomerative(dist, linkage, num_clusters=None, threshold=None):
    n = len(dist)
    d = 0.5 * (dist + dist.T)
    np.fill_diagonal(d, np.inf)
    members = [[i] for i in range(n)]
    active = list(range(n))
    while len(active) > max(1, num_clusters or 1):
        sub = d[np.ix_(active, active)]
        ia, ib = divmod(int(np.argmin(sub)), len(active))
        if threshold is not None and sub[ia, ib] > threshold:
            break
        a, b = active[ia], active[ib]
        da, db = d[a].copy(), d[b].copy()
        na, nb = len(members[a]), len(members[b])
        merged = {"single": np.minimum(da, db), "complete": np.maximum(da, db),
                  "average": (na * da + nb * db) / (na + nb), "weighted": 0.5 * (da + db)}[linkage]
        d[a, :] = merged
        d[:, a] = merged
        d[a, a] = np.inf
        members[a] += members[b]
        active.remove(b)
    labels = np.empty(n, dtype=np.int64)
    for k, idx in enumerate(sorted((sorted(members[a]) for a in active), key=lambda m: m[0])):
        labels[idx] = k
    return labels


def former_min_vector_angles(bases):
    qs = [b / np.linalg.norm(b, axis=0) for b in bases]
    n = len(qs)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = np.degrees(np.arccos(np.clip(np.abs(qs[i].T @ qs[j]).max(), 0.0, 1.0)))
    return dist


# -- inputs shaped like the shipped configs' --------------------------------------------------------


def client_predictions(n, groups, seed, public=40, classes=10):
    """Public predictions of n clients in ``groups`` label-skew groups (0: no structure)."""
    rng = np.random.default_rng(seed)
    if groups == 0:
        raw = rng.dirichlet(np.ones(classes), size=(n, public))
    else:
        centres = rng.dirichlet(np.full(classes, 0.3), size=(groups, public))
        raw = np.clip(centres[np.arange(n) % groups] + rng.normal(0, 0.05, (n, public, classes)), 1e-6, None)
    return (raw / raw.sum(axis=2, keepdims=True)).astype(np.float32)


CASES = [(n, groups, seed) for n in SHIPPED_SIZES for groups in (0, 2, 4) for seed in (0, 1)]


@pytest.mark.parametrize("metric", ["frobenius", "symmetric_ce"])
@pytest.mark.parametrize(("n", "groups", "seed"), CASES)
def test_cosmos_threshold_searches_give_the_former_clusters(n, groups, seed, metric):
    dist = pairwise_distances(client_predictions(n, groups, seed), metric)
    assert np.array_equal(auto_threshold(dist).labels, former_auto_threshold(dist))
    for epsilon in np.quantile(dist[np.triu_indices(n, 1)], [0.05, 0.2, 0.5, 0.8]):
        labels = greedy_elimination(dist, float(epsilon))
        assert np.array_equal(labels, former_greedy(dist, float(epsilon)))
        if 2 <= num_clusters(labels) <= n - 1:
            assert silhouette(dist, labels) == pytest.approx(former_silhouette(dist, labels), abs=1e-12)
    # the official search, ε = 0.1, 0.2, ... (its result equals the former greedy at its ε)
    choice = oracle_threshold(dist, max(1, groups) + 1)
    assert np.array_equal(choice.labels, former_greedy(dist, choice.epsilon))


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize(("n", "groups", "seed"), CASES)
def test_hierarchical_clustering_gives_the_former_clusters(n, groups, seed, linkage):
    flat = client_predictions(n, groups, seed).reshape(n, -1).astype(np.float64)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    dist = 1.0 - unit @ unit.T  # CFL's and DisUE's cosine distance
    for k in (1, 2, 3, max(1, groups)):
        assert np.array_equal(agglomerative(dist, linkage, num_clusters=k), former_agglomerative(dist, linkage, k))
    for threshold in np.quantile(dist[np.triu_indices(n, 1)], [0.1, 0.5]):
        assert np.array_equal(agglomerative(dist, linkage, threshold=threshold),
                              former_agglomerative(dist, linkage, threshold=threshold))
    cuts = agglomerative_cuts(dist, linkage, [2, 3, 4])  # DisUE's K search, from one merge sequence
    assert all(np.array_equal(cuts[k], former_agglomerative(dist, linkage, k)) for k in (2, 3, 4))


def test_hierarchical_ties_go_to_the_lowest_pair_as_before():
    dist = np.ones((6, 6)) - np.eye(6)  # every pair at the same distance
    for linkage in LINKAGES:
        for k in range(1, 6):
            assert np.array_equal(agglomerative(dist, linkage, num_clusters=k), former_agglomerative(dist, linkage, k))


@pytest.mark.parametrize(("n", "seed"), [(n, s) for n in SHIPPED_SIZES for s in (0, 1)])
def test_pacfl_signature_angles_and_clusters_are_the_former_ones(n, seed):
    rng = np.random.default_rng(seed)
    shared = [np.linalg.qr(rng.normal(size=(64, 5)))[0] for _ in range(3)]
    bases = [np.linalg.qr(shared[i % 3] + rng.normal(0, 0.2, (64, 5)))[0] for i in range(n)]
    dist, former = subspace_distance_matrix(bases), former_min_vector_angles(bases)
    np.testing.assert_allclose(dist, former, rtol=0, atol=1e-9)
    assert np.array_equal(agglomerative(dist, "complete", num_clusters=3), former_agglomerative(former, "complete", 3))


def test_beyond_the_exact_range_the_search_is_coarse_then_fine_and_finds_the_groups():
    # 400 clients: 400² × 1,000 candidates > GREEDY_WORK, so 2 × 625 passes; the groups are found
    probs = client_predictions(400, 4, 0)
    choice = auto_threshold(pairwise_distances(probs))
    assert choice.num_clusters == 4
    assert all(len(set(choice.labels[g::4])) == 1 for g in range(4))
