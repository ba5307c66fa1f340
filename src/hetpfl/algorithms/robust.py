"""Robust aggregation: rules a server can use instead of the (weighted) mean, so that a minority
of wrong or hostile uploads cannot steer the result.

Which servers use them: a server class declares ``aggregates = "weights"`` (FedAvg, the clustered
methods within each cluster, and every method built on their aggregation), ``"rows"`` (FedMD's
consensus of score rows, COSMOS's per-cluster soft labels) or ``"entries"`` (width sub-models:
HeteroFL, FedRolex, DFRD, Mosaic's global model — each entry over the clients whose sub-model holds it,
so only coordinate-wise rules apply). The experiment's
``aggregation`` section picks the rule; a rule a method cannot use fails at config time.

* ``mean``: the method's own rule (FedAvg weighs by sample count); the default, bit for bit today's.
* ``median``: coordinate-wise median (Yin et al., 2018).
* ``trimmed_mean``: per coordinate, drop the ``trim_fraction`` largest and smallest values, average
  the rest (Yin et al., 2018).
* ``krum`` / ``multi_krum``: score each upload by the summed squared distances to its n − f − 2
  nearest others; keep the best one (Krum) or average the n − f best (Multi-Krum) (Blanchard et al.,
  2017), ``f = byzantine``. Weights only: they compare whole models.
* ``geometric_median``: the point minimizing the summed distances to the uploads, weighted by
  sample count, by Weiszfeld's iterations (Pillutla et al., 2022, RFA). Weights only.

Sample counts are a client's own claim, so only ``mean`` and ``geometric_median`` use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..configuration import Validated, option

ROW_RULES = ("mean", "median", "trimmed_mean")  # coordinate-wise: any stack of equal arrays (or with gaps)
WEIGHT_RULES = (*ROW_RULES, "krum", "multi_krum", "geometric_median")  # whole-model rules too


@dataclass
class AggregationOptions(Validated):
    rule: str = option("mean", choices=WEIGHT_RULES)
    trim_fraction: float = option(0.2, ge=0, lt=0.5)  # trimmed_mean: share cut at each end
    byzantine: int = option(1, ge=0)  # krum, multi_krum: f, the adversaries assumed among the uploads
    iterations: int = option(100, ge=1)  # geometric_median: Weiszfeld steps at most
    tolerance: float = option(1e-6, gt=0)  # geometric_median: stop when the point moves less (relative)


def combine(stack: np.ndarray, weights: np.ndarray, options: AggregationOptions) -> np.ndarray:
    """Aggregate ``stack`` (n uploads × d numbers, float64) into one d-vector by ``options.rule``."""
    n = stack.shape[0]
    weights = np.asarray(weights, dtype=np.float64)
    rule = options.rule
    if rule == "mean":
        return (weights[:, None] * stack).sum(axis=0) / weights.sum()
    if rule == "median":
        return np.median(stack, axis=0)
    if rule == "trimmed_mean":
        cut = int(np.floor(options.trim_fraction * n))  # trim_fraction < 0.5 keeps at least one value
        return np.sort(stack, axis=0)[cut: n - cut].mean(axis=0)
    if rule in ("krum", "multi_krum"):
        scores = krum_scores(stack, options.byzantine)
        keep = 1 if rule == "krum" else max(1, n - options.byzantine)
        chosen = np.argsort(scores, kind="stable")[:keep]
        return stack[chosen].mean(axis=0)
    if rule == "geometric_median":
        return geometric_median(stack, weights, options.iterations, options.tolerance)
    raise ValueError(f"aggregation rule {rule!r} (allowed: {', '.join(WEIGHT_RULES)})")


def krum_scores(stack: np.ndarray, byzantine: int) -> np.ndarray:
    """Each upload's summed squared distance to its n − f − 2 nearest others (at least one)."""
    sq = (stack**2).sum(axis=1)
    dist = np.clip(sq[:, None] + sq[None, :] - 2.0 * stack @ stack.T, 0.0, None)
    n = stack.shape[0]
    nearest = max(1, n - byzantine - 2)
    ordered = np.sort(dist + np.diag(np.full(n, np.inf)), axis=1)[:, : min(nearest, n - 1)]
    return ordered.sum(axis=1) if n > 1 else np.zeros(1)


def geometric_median(stack: np.ndarray, weights: np.ndarray, iterations: int, tolerance: float) -> np.ndarray:
    """Weiszfeld's algorithm (smoothed at 1e-12 so a point on an upload does not divide by 0)."""
    point = (weights[:, None] * stack).sum(axis=0) / weights.sum()
    for _ in range(iterations):
        distances = np.maximum(np.linalg.norm(stack - point, axis=1), 1e-12)
        alpha = weights / distances
        moved = (alpha[:, None] * stack).sum(axis=0) / alpha.sum()
        step = np.linalg.norm(moved - point)
        point = moved
        if step <= tolerance * max(1.0, np.linalg.norm(point)):
            break
    return point


def combine_with_gaps(stack: np.ndarray, options: AggregationOptions) -> np.ndarray:
    """A coordinate-wise robust rule (``median`` or ``trimmed_mean``) over ``stack`` (n uploads × any
    shape, float64) where NaN marks an entry an upload does not hold; each entry is combined over the
    uploads holding it (the trimmed share of that count). An entry nobody holds comes back NaN."""
    if options.rule not in ROW_RULES or options.rule == "mean":
        raise ValueError(f"combine_with_gaps: rule {options.rule!r} (allowed: median, trimmed_mean)")
    held = ~np.isnan(stack)
    count = held.sum(axis=0)
    if options.rule == "median":
        with np.errstate(all="ignore"):
            return np.where(count > 0, np.nanmedian(np.where(count > 0, stack, 0.0), axis=0), np.nan)
    ordered = np.sort(stack, axis=0)  # NaNs sort last: entry j's values are ordered[:count[j], j]
    cut = np.floor(options.trim_fraction * count).astype(np.int64)
    rank = np.arange(stack.shape[0]).reshape((-1,) + (1,) * (stack.ndim - 1))
    keep = (rank >= cut) & (rank < count - cut)
    with np.errstate(all="ignore"):
        return np.where(count > 0, np.where(keep, ordered, 0.0).sum(axis=0) / keep.sum(axis=0), np.nan)


def combine_rows(arrays: list[np.ndarray], options: AggregationOptions) -> np.ndarray:
    """A coordinate-wise rule over equal-shaped arrays (FedMD's score rows), as float32; ``mean``
    is the plain float32 mean."""
    if options.rule == "mean":
        return np.mean(arrays, axis=0).astype(np.float32)
    stack = np.stack([a.astype(np.float64).reshape(-1) for a in arrays])
    return combine(stack, np.ones(len(arrays)), options).reshape(arrays[0].shape).astype(np.float32)


__all__ = ["ROW_RULES", "WEIGHT_RULES", "AggregationOptions", "combine", "combine_rows", "combine_with_gaps",
           "geometric_median", "krum_scores"]
