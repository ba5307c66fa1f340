"""Clustering clients by their predictions on the public inputs (one place for every rule).

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

Everything here is deterministic given its inputs (and the generator for k-means).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DISTANCES = ("frobenius", "symmetric_ce")

__all__ = [
    "DISTANCES",
    "ClusterChoice",
    "auto_threshold",
    "distance",
    "greedy_elimination",
    "kmeans",
    "match_clusters",
    "oracle_threshold",
    "pairwise_distances",
    "silhouette",
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
    labels = np.full(n, -1, dtype=np.int64)
    remaining = np.ones(n, dtype=bool)
    cluster = 0
    while remaining.any():
        counts = np.where(remaining, (near & remaining[None, :]).sum(axis=1), -1)
        pick = int(np.argmax(counts))  # first maximum: ties go to the lowest id
        members = near[pick] & remaining
        labels[members] = cluster
        remaining &= ~members
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
    onehot = (labels[:, None] == ids[None, :]).astype(np.float64)  # (n, K)
    sizes = onehot.sum(axis=0)
    sums = dist @ onehot  # (n, K): total distance to each cluster
    own = np.searchsorted(ids, labels)
    rows = np.arange(n)
    own_size = sizes[own]
    a = np.where(own_size > 1, sums[rows, own] / np.maximum(own_size - 1, 1), 0.0)
    mean_other = sums / sizes[None, :]
    mean_other[rows, own] = np.inf
    b = mean_other.min(axis=1)
    denom = np.maximum(a, b)
    s = np.where((own_size > 1) & (denom > 0), (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(s.mean())


def auto_threshold(dist: np.ndarray, min_silhouette: float = 0.25, max_candidates: int = 1000) -> ClusterChoice:
    """ε chosen from the distance matrix alone: the greedy clustering with the best silhouette.

    Candidates are the greedy clusterings at every distinct pairwise distance (the only values at
    which the neighbour graph, hence the clustering, can change; beyond ``max_candidates`` distinct
    values, that many evenly spaced quantiles of them). Clusterings with 2..n-1 clusters are
    scored by :func:`silhouette`; ties go to fewer clusters. If no candidate reaches
    ``min_silhouette`` (0.25: "no substantial structure" in Kaufman & Rousseeuw's reading of the
    index), or there are fewer than 3 clients, every client goes into one cluster.
    """
    dist = np.asarray(dist, dtype=np.float64)
    n = len(dist)
    one = ClusterChoice(np.zeros(n, dtype=np.int64), float(dist.max()) if n else 0.0, None)
    if n < 3:
        return one
    thresholds = np.unique(dist[np.triu_indices(n, k=1)])
    if len(thresholds) > max_candidates:
        thresholds = np.unique(np.quantile(thresholds, np.linspace(0.0, 1.0, max_candidates), method="nearest"))
    best: ClusterChoice | None = None
    seen: set[bytes] = set()
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
    if best is None or best.score < min_silhouette:
        return ClusterChoice(one.labels, one.epsilon, None if best is None else best.score)
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
