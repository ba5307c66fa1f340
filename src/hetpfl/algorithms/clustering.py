"""Clustering rules of every clustered method, one implementation each.

By public predictions (COSMOS, COMET):

* :func:`pairwise_distances`: client-by-client distances between ``(N_U, C)`` probability matrices,
  the Frobenius norm of their difference (COSMOS's default) or the symmetric cross-entropy.
* :func:`greedy_elimination`: COSMOS's clustering for a threshold ε: repeatedly take the remaining
  client with the most remaining neighbours within ε (ties to the lowest id); it and those
  neighbours form a cluster and leave the pool.
* Choosing ε: :func:`oracle_threshold` is the official code's search (ε = 0.1, 0.2, ... until the
  number of clusters is at most K* + a, with K* the TRUE number of data groups, an oracle);
  :func:`auto_threshold` is ours and needs nothing but the distance matrix: it tries every
  threshold at which the greedy clustering can change (the distinct pairwise distances) and keeps
  the clustering with the best silhouette, or one cluster when no clustering reaches
  ``min_silhouette`` (no substantial structure).
* :func:`kmeans`: Lloyd's k-means with k-means++ seeding from a given generator, optionally warm
  started from previous centroids (COMET's clustering).
* :func:`match_clusters`: carries cluster identities across re-clusterings by member overlap.
* :func:`best_by_silhouette`: the number of clusters chosen from a distance matrix alone (the
  partition of K = 2..max with the best silhouette, or one cluster without structure; DisUE).

By weights, updates or data subspaces (IFCA, CFL, FeSEM, PACFL):

* :func:`agglomerative`: bottom-up hierarchical clustering of a distance matrix (single,
  complete, average = UPGMA, weighted = WPGMA linkage), cut at a number of clusters or a
  distance threshold; CFL's bipartition is ``agglomerative(1 - cosine, "complete", num_clusters=2)``.
* :func:`cosine_similarity`: the cosine matrix of vectors (CFL's weight updates).
* :func:`nearest_center`: each point's nearest center in L2 (FeSEM's E-step).
* :func:`orthonormal_basis`, :func:`principal_angles`, :func:`subspace_distance`,
  :func:`subspace_distance_matrix`: distances between data subspaces (PACFL).
* :func:`cluster_averages`: the FedAvg rule within each cluster.
* :class:`ClusteredServer`: one model per cluster, each client's cluster id, and what the
  engine reads of them (``cluster`` models on each client's split, each cluster model on the
  global test set, the assignment).

Everything here is deterministic given its inputs (and the generator for k-means).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..configuration import FieldError
from ..learn import arrays_to_state
from ..messages import Message
from .base import Server, ServerSetup
from .robust import AggregationOptions
from .weights import aggregate_weights, shared_arrays

DISTANCES = ("frobenius", "symmetric_ce")
LINKAGES = ("single", "complete", "average", "weighted")
SUBSPACE_MEASURES = ("min_vector_angle", "smallest_angle", "mean_angle")

__all__ = [
    "DISTANCES",
    "GREEDY_WORK",
    "LINKAGES",
    "SUBSPACE_MEASURES",
    "ClusterChoice",
    "ClusteredServer",
    "agglomerative",
    "agglomerative_cuts",
    "auto_threshold",
    "best_by_silhouette",
    "check_num_clusters",
    "cluster_averages",
    "cosine_similarity",
    "distance",
    "greedy_elimination",
    "kmeans",
    "match_clusters",
    "nearest_center",
    "oracle_threshold",
    "orthonormal_basis",
    "pairwise_distances",
    "principal_angles",
    "silhouette",
    "subspace_distance",
    "subspace_distance_matrix",
]

_LOG_FLOOR = 1e-12  # probabilities are clipped here before a logarithm


def _stack(probs: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    stack = np.asarray(np.stack([np.asarray(p, dtype=np.float64) for p in probs]))
    if stack.ndim != 3:
        raise ValueError(f"expected a sequence of (N, C) probability matrices, got shape {stack.shape}")
    return stack


def _cross_entropy(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``ce[i, j] = -mean_n sum_c p[i, n, c] log q[j, n, c]`` for stacks ``p`` and ``q``."""
    logq = np.log(np.clip(q, _LOG_FLOOR, None))
    n = p.shape[1]
    return -np.einsum("inc,jnc->ij", p, logq) / n


def pairwise_distances(probs: Sequence[np.ndarray] | np.ndarray, metric: str = "frobenius") -> np.ndarray:
    """``(n, n)`` distances between ``n`` clients' ``(N_U, C)`` prediction matrices.

    ``frobenius``: ``d_ij = ||p_i - p_j||_F``. ``symmetric_ce``: ``d_ij = (CE(p_i, p_j) +
    CE(p_j, p_i)) / 2`` with CE averaged over the public samples; its diagonal (a client's own
    entropy) is set to 0, since a client is always its own nearest neighbour.
    """
    stack = _stack(probs)
    if metric == "frobenius":
        flat = stack.reshape(len(stack), -1)
        sq = (flat**2).sum(axis=1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T
        dist = np.sqrt(np.clip(d2, 0.0, None))
    elif metric == "symmetric_ce":
        ce = _cross_entropy(stack, stack)
        dist = 0.5 * (ce + ce.T)
    else:
        raise ValueError(f"distance metric {metric!r} is not supported (allowed: {', '.join(DISTANCES)})")
    dist = 0.5 * (dist + dist.T)  # exact symmetry despite rounding
    np.fill_diagonal(dist, 0.0)
    return dist


def distance(p: np.ndarray, q: np.ndarray, metric: str = "frobenius") -> float:
    """The distance of :func:`pairwise_distances` between two matrices."""
    return float(pairwise_distances([p, q], metric)[0, 1])


def greedy_elimination(dist: np.ndarray, epsilon: float) -> np.ndarray:
    """Cluster ids (0, 1, ... in creation order) from greedy elimination at threshold ``epsilon``.

    Neighbours are pairs with ``d <= epsilon``. While clients remain: the remaining client with the
    most remaining neighbours (ties: the lowest id) and its remaining neighbours form the next
    cluster and are removed. Every round removes at least one client, so it ends after at most
    ``n`` rounds.
    """
    dist = np.asarray(dist, dtype=np.float64)
    n = len(dist)
    if dist.shape != (n, n):
        raise ValueError(f"greedy_elimination needs a square distance matrix, got shape {dist.shape}")
    near = dist <= epsilon
    np.fill_diagonal(near, True)
    return _greedy_on(near)


def _greedy_on(near: np.ndarray) -> np.ndarray:
    """Greedy elimination on a neighbour matrix. The remaining neighbours of every client are counted
    once and decremented as clusters leave (O(n²) a pass, not O(n²) per cluster)."""
    n = len(near)
    labels = np.full(n, -1, dtype=np.int64)
    remaining = np.ones(n, dtype=bool)
    counts = near.sum(axis=1)
    cluster, left = 0, n
    while left:
        pick = int(np.argmax(np.where(remaining, counts, -1)))  # first maximum: ties go to the lowest id
        members = np.flatnonzero(near[pick] & remaining)
        labels[members] = cluster
        remaining[members] = False
        left -= members.size
        counts -= near[:, members].sum(axis=1) if members.size > 1 else near[:, members[0]]
        cluster += 1
    return labels


def num_clusters(labels: np.ndarray) -> int:
    labels = np.asarray(labels)
    return int(np.unique(labels[labels >= 0]).size)


@dataclass(frozen=True)
class ClusterChoice:
    """A clustering and how it was chosen (``epsilon``: the threshold; ``score``: silhouette)."""

    labels: np.ndarray
    epsilon: float | None = None
    score: float | None = None

    @property
    def num_clusters(self) -> int:
        return num_clusters(self.labels)


def oracle_threshold(dist: np.ndarray, max_clusters: int, start: float = 0.1, step: float = 0.1) -> ClusterChoice:
    """The official code's ε search: ε = start, start + step, ... until greedy elimination gives at
    most ``max_clusters`` clusters (K* + a, where K* is the true number of groups: an oracle).

    Terminates: once ε reaches the largest distance every client is one cluster.
    """
    if max_clusters < 1:
        raise ValueError(f"max_clusters={max_clusters}: must be >= 1")
    if start < 0 or step <= 0:
        raise ValueError(f"oracle threshold search needs start >= 0 and step > 0 (got {start}, {step})")
    dist = np.asarray(dist, dtype=np.float64)
    top = float(dist.max()) if dist.size else 0.0
    i = 0
    while True:
        epsilon = start + i * step  # no accumulated rounding
        labels = greedy_elimination(dist, epsilon)
        if num_clusters(labels) <= max_clusters or epsilon >= top:
            return ClusterChoice(labels, epsilon)
        i += 1


def silhouette(dist: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette on a precomputed distance matrix (Rousseeuw 1987).

    ``s_i = (b_i - a_i) / max(a_i, b_i)`` with ``a_i`` the mean distance to the other members of
    its cluster and ``b_i`` the smallest mean distance to another cluster; ``s_i = 0`` for a
    singleton (the usual convention). Needs 2 <= K <= n - 1 clusters.
    """
    dist = np.asarray(dist, dtype=np.float64)
    labels = np.asarray(labels)
    ids = np.unique(labels)
    n = len(labels)
    if not 2 <= ids.size <= n - 1:
        raise ValueError(f"silhouette needs 2..n-1 clusters, got {ids.size} for n={n}")
    own = np.searchsorted(ids, labels)
    sizes = np.bincount(own, minlength=ids.size).astype(np.float64)
    if ids.size <= 64:
        sums = dist @ (own[:, None] == np.arange(ids.size)[None, :]).astype(np.float64)  # (n, K)
    else:  # many clusters: sum each cluster's columns (O(n²), not O(n²K))
        order = np.argsort(own, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(own[order]) != 0])
        sums = np.add.reduceat(dist[:, order], starts, axis=1)
    rows = np.arange(n)
    own_size = sizes[own]
    a = np.where(own_size > 1, sums[rows, own] / np.maximum(own_size - 1, 1), 0.0)
    mean_other = sums / sizes[None, :]
    mean_other[rows, own] = np.inf
    b = mean_other.min(axis=1)
    denom = np.maximum(a, b)
    s = np.where((own_size > 1) & (denom > 0), (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(s.mean())


#: Greedy passes :func:`auto_threshold` makes per round of its search: every candidate up to
#: ``max_candidates`` while n² · candidates stays under this (n <= 316 at 1,000 candidates, so every
#: shipped config searches exactly as before); beyond, a coarse grid and then a fine one.
GREEDY_WORK = 10**8


def auto_threshold(dist: np.ndarray, min_silhouette: float = 0.25, max_candidates: int = 1000) -> ClusterChoice:
    """ε chosen from the distance matrix alone: the greedy clustering with the best silhouette.

    Candidates are the greedy clusterings at every distinct pairwise distance (the only values at
    which the neighbour graph, hence the clustering, can change; beyond ``max_candidates`` distinct
    values, that many evenly spaced quantiles of them). Clusterings with 2..n-1 clusters are
    scored by :func:`silhouette`; ties go to fewer clusters. If no candidate reaches
    ``min_silhouette`` (0.25: "no substantial structure" in Kaufman & Rousseeuw's reading of the
    index), or there are fewer than 3 clients, every client goes into one cluster.

    Scale: a pass costs O(n²), so when n² · ``max_candidates`` exceeds :data:`GREEDY_WORK` (beyond
    about 316 clients) the search takes ``GREEDY_WORK / n²`` quantiles (at least 50), then as many
    again among the distinct distances between the best one's neighbours on that grid, and keeps
    the best of both (1,000 clients: 2 × 100 passes instead of 1,000).
    """
    dist = np.asarray(dist, dtype=np.float64)
    n = len(dist)
    one = ClusterChoice(np.zeros(n, dtype=np.int64), float(dist.max()) if n else 0.0, None)
    if n < 3:
        return one
    distinct = np.unique(dist[np.triu_indices(n, k=1)])
    per_search = min(max_candidates, max(50, GREEDY_WORK // (n * n)))
    grid = _spread(distinct, per_search)
    seen: set[bytes] = set()
    best = _best_greedy(dist, grid, seen, None)
    if per_search < max_candidates and best is not None and len(distinct) > len(grid):
        at = int(np.searchsorted(grid, best.epsilon))
        low, high = grid[max(at - 1, 0)], grid[min(at + 1, len(grid) - 1)]
        between = distinct[(distinct > low) & (distinct < high)]
        best = _best_greedy(dist, _spread(between, per_search), seen, best)
    if best is None or best.score < min_silhouette:
        return ClusterChoice(one.labels, one.epsilon, None if best is None else best.score)
    return best


def _spread(values: np.ndarray, count: int) -> np.ndarray:
    """``values`` (sorted, distinct) if there are at most ``count``, else ``count`` evenly spaced quantiles."""
    if len(values) <= count:
        return values
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, count), method="nearest"))


def _best_greedy(dist: np.ndarray, thresholds: np.ndarray, seen: set[bytes],
                 best: ClusterChoice | None) -> ClusterChoice | None:
    """The best-silhouette greedy clustering over ``thresholds`` (in order), starting from ``best``;
    clusterings already in ``seen`` are skipped."""
    n = len(dist)
    for epsilon in thresholds:
        labels = greedy_elimination(dist, float(epsilon))
        key = labels.tobytes()
        if key in seen:
            continue
        seen.add(key)
        k = num_clusters(labels)
        if not 2 <= k <= n - 1:
            continue
        score = silhouette(dist, labels)
        if best is None or score > best.score or (score == best.score and k < best.num_clusters):
            best = ClusterChoice(labels, float(epsilon), score)
    return best


def best_by_silhouette(dist: np.ndarray, partition: Callable[[int], np.ndarray], max_clusters: int,
                       min_silhouette: float = 0.25) -> ClusterChoice:
    """K chosen from the distance matrix alone: ``partition(k)`` for k = 2..min(max_clusters, n - 1),
    the one with the best :func:`silhouette` (ties to fewer clusters); one cluster when none reaches
    ``min_silhouette`` (as :func:`auto_threshold`) or there are fewer than 3 points."""
    dist = np.asarray(dist, dtype=np.float64)
    n = len(dist)
    best: ClusterChoice | None = None
    for k in range(2, min(max_clusters, n - 1) + 1):
        labels = np.asarray(partition(k))
        if not 2 <= num_clusters(labels) <= n - 1:
            continue
        score = silhouette(dist, labels)
        if best is None or score > best.score:
            best = ClusterChoice(labels, None, score)
    if best is None or best.score < min_silhouette:
        return ClusterChoice(np.zeros(n, dtype=np.int64), None, None if best is None else best.score)
    return best


def kmeans(
    x: np.ndarray,
    k: int,
    rng: np.random.Generator,
    *,
    init: np.ndarray | None = None,
    restarts: int = 10,
    max_iter: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on the rows of ``x``: ``(labels, centroids)``.

    Seeded by k-means++ from ``rng`` (``restarts`` times, the lowest inertia wins), or warm started
    from ``init`` (one run). An emptied cluster is re-seeded with the point farthest from its
    centroid. ``k`` is capped at the number of rows.
    """
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n = len(x)
    if n == 0:
        raise ValueError("kmeans needs at least one point")
    k = max(1, min(int(k), n))
    starts = [np.asarray(init, dtype=np.float64).reshape(k, -1)] if init is not None and len(init) == k else None
    if starts is None:
        starts = [_kmeans_pp(x, k, rng) for _ in range(max(1, restarts))]
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for centroids in starts:
        labels, centroids, inertia = _lloyd(x, centroids.copy(), max_iter)
        if best is None or inertia < best[0]:
            best = (inertia, labels, centroids)
    return best[1], best[2]


def _sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.clip((x**2).sum(1)[:, None] + (c**2).sum(1)[None, :] - 2.0 * x @ c.T, 0.0, None)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = _sq_dists(x, np.stack(centroids)).min(axis=1)
        total = d2.sum()
        idx = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centroids.append(x[idx])
    return np.stack(centroids)


def _lloyd(x: np.ndarray, centroids: np.ndarray, max_iter: int) -> tuple[np.ndarray, np.ndarray, float]:
    labels = np.full(len(x), -1, dtype=np.int64)
    for _ in range(max_iter):
        d2 = _sq_dists(x, centroids)
        new = d2.argmin(axis=1)
        for j in range(len(centroids)):
            members = new == j
            if members.any():
                centroids[j] = x[members].mean(axis=0)
            else:  # re-seed an empty cluster with the worst-served point
                far = int(d2[np.arange(len(x)), new].argmax())
                centroids[j] = x[far]
                new[far] = j
        if np.array_equal(new, labels):
            break
        labels = new
    inertia = float(_sq_dists(x, centroids)[np.arange(len(x)), labels].sum())
    return labels, centroids, inertia


def match_clusters(previous: np.ndarray, current: np.ndarray) -> dict[int, int]:
    """Map each cluster id of ``current`` to an id of ``previous`` by member overlap, one to one
    (largest overlaps first; ties to the lowest ids). Unmatched current ids are absent; entries
    below 0 (clients without a cluster) are ignored."""
    previous, current = np.asarray(previous), np.asarray(current)
    both = (previous >= 0) & (current >= 0)
    pairs = []
    for c in np.unique(current[current >= 0]):
        for p in np.unique(previous[previous >= 0]):
            overlap = int(np.sum(both & (current == c) & (previous == p)))
            if overlap > 0:
                pairs.append((-overlap, int(c), int(p)))
    mapping: dict[int, int] = {}
    used: set[int] = set()
    for _, c, p in sorted(pairs):
        if c not in mapping and p not in used:
            mapping[c] = p
            used.add(p)
    return mapping


def adjusted_rand_index(truth: np.ndarray, found: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert and Arabie), from the pair-confusion counts in
    exact integers: the value scikit-learn's ``adjusted_rand_score`` gives, without importing
    ``sklearn.metrics`` (~0.6 s of a run's start)."""
    truth, found = np.asarray(truth).ravel(), np.asarray(found).ravel()
    n = len(truth)
    _, t = np.unique(truth, return_inverse=True)
    _, f = np.unique(found, return_inverse=True)
    shape = (t.max(initial=-1) + 1, f.max(initial=-1) + 1)
    table = np.bincount(t * shape[1] + f, minlength=shape[0] * shape[1]).astype(np.int64).reshape(shape)
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    squares = int((table**2).sum())
    tp = squares - n
    fp = int((table @ cols).sum()) - squares
    fn = int((table.T @ rows).sum()) - squares
    tn = n * n - fp - fn - squares
    if fn == 0 and fp == 0:  # empty or full agreement
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


# ----------------------------------------------------------------------------------------------
# Hierarchical clustering, cosine similarity, nearest centers
# ----------------------------------------------------------------------------------------------


def agglomerative(dist: np.ndarray, linkage: str = "complete", *, num_clusters: int | None = None,
                  threshold: float | None = None) -> np.ndarray:
    """Bottom-up hierarchical clustering of a symmetric distance matrix: cluster ids ``0, 1, ...``
    numbered in the order of each cluster's lowest member.

    From singletons, the two clusters at the smallest linkage distance merge (ties: the pair of
    lowest row indices) until ``num_clusters`` remain, or until the smallest distance exceeds
    ``threshold`` (merges at distance <= threshold happen); give one or both. Linkage between a
    merged cluster ``a ∪ b`` and ``c`` (Lance-Williams): ``single`` min(d_ac, d_bc), ``complete``
    max, ``average`` (UPGMA) the mean over all member pairs, ``weighted`` (WPGMA) (d_ac + d_bc) / 2.
    """
    if num_clusters is None and threshold is None:
        raise ValueError("agglomerative needs num_clusters or threshold (or both)")
    return agglomerative_cuts(dist, linkage, [num_clusters or 1], threshold=threshold)[num_clusters or 1]


def agglomerative_cuts(dist: np.ndarray, linkage: str, cuts: Sequence[int], *,
                       threshold: float | None = None) -> dict[int, np.ndarray]:
    """:func:`agglomerative`'s labels at each number of clusters in ``cuts``, from one merge sequence
    (the merges do not depend on where the tree is cut). With ``threshold``, merging also stops at
    the first distance above it, and a cut below that point gets the labels there.

    Each row's nearest active cluster is cached and refreshed only when its merge touched it, so
    the n - 1 merges cost O(n²) together rather than O(n²) each.
    """
    dist = np.asarray(dist, dtype=np.float64)
    n = len(dist)
    if dist.shape != (n, n) or n == 0:
        raise ValueError(f"agglomerative needs a non-empty square distance matrix, got shape {dist.shape}")
    if not np.all(np.isfinite(dist)):
        raise ValueError("agglomerative: the distance matrix has non-finite entries")
    if linkage not in LINKAGES:
        raise ValueError(f"linkage {linkage!r} is not supported (allowed: {', '.join(LINKAGES)})")
    if not cuts or min(cuts) < 1:
        raise ValueError(f"num_clusters={min(cuts) if cuts else None}: must be >= 1")
    d = 0.5 * (dist + dist.T)
    np.fill_diagonal(d, np.inf)
    active = np.ones(n, dtype=bool)
    sizes = np.ones(n)
    nearest, gap = d.argmin(axis=1), d.min(axis=1)  # each row's first closest column and its distance
    parent = np.arange(n)  # each row's cluster (a root row index)
    out: dict[int, np.ndarray] = {}
    remaining = n
    for k in sorted(set(cuts), reverse=True):
        while remaining > k:
            a = int(np.argmin(np.where(active, gap, np.inf)))  # first minimum: the lowest row, then
            b = int(nearest[a])                                # its lowest column (a < b by symmetry)
            if threshold is not None and d[a, b] > threshold:
                break
            da, db = d[a], d[b]
            na, nb = sizes[a], sizes[b]
            merged = {"single": np.minimum(da, db), "complete": np.maximum(da, db),
                      "average": (na * da + nb * db) / (na + nb), "weighted": 0.5 * (da + db)}[linkage]
            d[a, :] = merged
            d[:, a] = merged
            d[b, :] = np.inf
            d[:, b] = np.inf
            d[a, a] = np.inf
            active[b] = False
            sizes[a] += nb
            parent[parent == b] = a
            remaining -= 1
            stale = active & ((nearest == a) | (nearest == b))
            stale[a] = True
            rows = np.flatnonzero(stale)
            nearest[rows], gap[rows] = d[rows].argmin(axis=1), d[rows].min(axis=1)
            closer = active & ~stale & ((merged < gap) | ((merged == gap) & (a < nearest)))
            nearest[closer], gap[closer] = a, merged[closer]
        roots = np.unique(parent)  # cluster ids in the order of each cluster's lowest member
        lowest = {int(r): int(np.flatnonzero(parent == r)[0]) for r in roots}
        order = {r: i for i, r in enumerate(sorted(lowest, key=lowest.get))}
        out[k] = np.array([order[int(r)] for r in parent], dtype=np.int64)
    return {k: out[k] for k in cuts}


def cosine_similarity(vectors: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """``(n, n)`` cosines between vectors (0 against a zero vector; the diagonal of a nonzero one is 1)."""
    x = np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in vectors])
    norms = np.linalg.norm(x, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    sim = (x @ x.T) / safe[:, None] / safe[None, :]
    return np.clip(0.5 * (sim + sim.T), -1.0, 1.0)


def nearest_center(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of each point's nearest center in Euclidean distance (ties: the lowest index)."""
    x = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    c = np.asarray(centers, dtype=np.float64).reshape(len(centers), -1)
    return _sq_dists(x, c).argmin(axis=1).astype(np.int64)


def check_num_clusters(num_clusters: int | None, available: int, what: str = "clients") -> None:
    """``algorithm.num_clusters`` may not exceed the ``available`` clients (a ``FieldError``)."""
    if num_clusters is not None and num_clusters > available:
        raise FieldError("num_clusters", num_clusters, f"at most the number of {what} ({available})")


# ----------------------------------------------------------------------------------------------
# Data subspaces (PACFL)
# ----------------------------------------------------------------------------------------------


def orthonormal_basis(matrix: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """An orthonormal basis (columns) of the span of ``matrix``'s columns (directions whose singular
    value is below ``rtol`` times the largest are dropped)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.size == 0:
        return np.zeros((m.shape[0], 0))
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    return u[:, s > rtol * s[0]] if s[0] > 0 else u[:, :0]


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between the spans of two orthonormal bases:
    ``arccos`` of the singular values of ``a.T @ b`` (Björck & Golub 1973)."""
    s = np.linalg.svd(np.asarray(a, np.float64).T @ np.asarray(b, np.float64), compute_uv=False)
    return np.arccos(np.clip(s, 0.0, 1.0))


def subspace_distance(a: np.ndarray, b: np.ndarray, measure: str = "min_vector_angle") -> float:
    """Degrees between the signatures ``a`` and ``b`` (columns: basis vectors).

    ``min_vector_angle``: the smallest angle between a column of ``a`` and a column of ``b``, sign
    ignored (PACFL's official code takes the smallest entry of arccos(aᵀb), which also depends on
    the arbitrary signs SVD gives singular vectors); ``smallest_angle``: the smallest principal
    angle Θ_1 between the two spans; ``mean_angle``: the mean principal angle."""
    return float(subspace_distance_matrix([a, b], measure)[0, 1])


def _prepared(basis: np.ndarray, measure: str) -> np.ndarray:
    b = np.asarray(basis, dtype=np.float64)
    if measure == "min_vector_angle":
        norms = np.linalg.norm(b, axis=0)
        return b[:, norms > 0] / norms[norms > 0]
    return orthonormal_basis(b)


def _angle_degrees(qa: np.ndarray, qb: np.ndarray, measure: str) -> float:
    if qa.shape[1] == 0 or qb.shape[1] == 0:
        return 90.0
    if measure == "min_vector_angle":
        return float(np.degrees(np.arccos(np.clip(np.abs(qa.T @ qb).max(), 0.0, 1.0))))
    angles = principal_angles(qa, qb)
    return float(np.degrees(angles[0] if measure == "smallest_angle" else angles.mean()))


def subspace_distance_matrix(bases: Sequence[np.ndarray], measure: str = "min_vector_angle") -> np.ndarray:
    """``(n, n)`` :func:`subspace_distance` between every pair of signatures (zero diagonal)."""
    if measure not in SUBSPACE_MEASURES:
        raise ValueError(f"subspace measure {measure!r} is not supported (allowed: {', '.join(SUBSPACE_MEASURES)})")
    qs = [_prepared(b, measure) for b in bases]
    n = len(qs)
    widths = np.array([q.shape[1] for q in qs])
    if measure == "min_vector_angle" and n and widths.min() > 0:
        # every pair at once: one product of all columns, then the largest |cosine| of each block
        cosines = np.abs(np.concatenate(qs, axis=1).T @ np.concatenate(qs, axis=1))
        starts = np.r_[0, np.cumsum(widths)[:-1]]
        largest = np.maximum.reduceat(np.maximum.reduceat(cosines, starts, axis=0), starts, axis=1)
        dist = np.degrees(np.arccos(np.clip(largest, 0.0, 1.0)))
        dist = 0.5 * (dist + dist.T)
        np.fill_diagonal(dist, 0.0)
        return dist
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = _angle_degrees(qs[i], qs[j], measure)
    return dist


# ----------------------------------------------------------------------------------------------
# One model per cluster (the weight-averaging clustered methods)
# ----------------------------------------------------------------------------------------------


def cluster_averages(states: Mapping[int, dict[str, np.ndarray]], sizes: Mapping[int, float],
                     labels: Mapping[int, int],
                     options: AggregationOptions | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Per cluster, the experiment's rule over its members' states (``labels[client]``: its cluster;
    ``options``: the ``aggregation`` section, FedAvg's sample-weighted mean by default), members in
    client-id order, so one cluster of everyone is FedAvg's arithmetic exactly. A robust rule works
    within each cluster: it protects a cluster whose members are mostly honest."""
    options = AggregationOptions() if options is None else options
    out = {}
    for k in sorted(set(int(v) for v in labels.values())):
        members = [c for c in sorted(labels) if int(labels[c]) == k]
        out[k] = aggregate_weights([states[c] for c in members], [float(sizes[c]) for c in members], options)
    return out


class ClusteredServer(Server):
    """Base of IFCA, CFL, FeSEM and PACFL: one model per cluster (``models[k]``, every client of
    one architecture) and each client's cluster id (``assignment``, -1: none yet).

    Cluster ``0``'s model is built with FedAvg's key (``"global"``), cluster ``k >= 1``'s with
    ``"cluster-k"``, so each starts from its own seeded initialization and one cluster starts
    exactly where FedAvg does. Reported: ``cluster`` (each client's cluster model on its test
    split: ``cluster_acc_*``), ``cluster<k>_test_acc`` (each cluster model on the global test set)
    and the assignment (the engine's ``cluster_ari`` against the true groups)."""

    aggregates = "weights"  # each cluster's members by the experiment's rule (robust.WEIGHT_RULES)

    def __init__(self, config: Any, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.assignment = np.full(setup.num_clients, -1, dtype=np.int64)
        self.models: dict[int, nn.Module] = {}

    @staticmethod
    def model_key(k: int) -> str:
        return "global" if k == 0 else f"cluster-{k}"

    def new_model(self, key: str, arch: str | None = None) -> nn.Module:
        # default: the one architecture of every client (homogeneous_only specs, checked in prepare)
        return self.setup.build_model(arch or self.setup.client_archs[0], key)

    def set_model(self, k: int, arrays: dict[str, np.ndarray], arch: str | None = None) -> None:
        """Cluster ``k``'s model takes ``arrays`` (built first, of ``arch``, if ``k`` is new)."""
        if k not in self.models:
            self.models[k] = self.new_model(self.model_key(k), arch)
        arrays_to_state(self.models[k], arrays)

    def weights(self, k: int) -> dict[str, np.ndarray]:
        return shared_arrays(self.models[k])

    def cluster_messages(self, clients: Sequence[int]) -> dict[int, Message]:
        """Each client's cluster model (clients without a cluster are left out)."""
        cache = {k: self.weights(k) for k in sorted({int(self.assignment[c]) for c in clients}) if k in self.models}
        return {c: Message(dict(cache[int(self.assignment[c])])) for c in clients if int(self.assignment[c]) in cache}

    def aggregate(self, replies: Mapping[int, Message], labels: Mapping[int, int] | None = None) -> None:
        """Each cluster's model ← the experiment's rule (the sample-weighted mean by default) over its
        members' uploads (``labels``:
        the cluster of each reply, default the assignment); a cluster without uploads keeps its model."""
        labels = {c: int(self.assignment[c]) for c in replies} if labels is None else labels
        states = {c: dict(r.arrays) for c, r in replies.items()}
        sizes = {c: float(r.scalars["num_examples"]) for c, r in replies.items()}
        for k, arrays in cluster_averages(states, sizes, {c: labels[c] for c in replies},
                                          self.setup.aggregation).items():
            self.set_model(k, arrays)

    def num_clusters_in_use(self) -> int:
        return int(np.unique(self.assignment[self.assignment >= 0]).size)

    def extra_models(self) -> dict[str, dict[int, nn.Module]]:
        return {"cluster": {c: self.models[int(k)] for c, k in enumerate(self.assignment) if int(k) in self.models}}

    def test_models(self) -> dict[str, nn.Module]:
        return {f"cluster{k}": self.models[k] for k in sorted(self.models)}

    def cluster_assignment(self) -> np.ndarray:
        return self.assignment.copy()
