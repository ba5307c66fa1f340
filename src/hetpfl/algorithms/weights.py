"""Shared pieces of the methods that exchange weights (FedAvg and the methods built on it).

* :func:`weighted_average`: the FedAvg rule over named arrays (one place);
* :func:`shared_arrays` / :func:`load_shared`: the part of a model's state a method shares, as the
  ``w.``/``b.`` arrays that travel (``learn.state_to_arrays``), filtered by a key predicate;
* :func:`weight_distance_matrix`, :func:`flat_weights`: distances between models' parameters
  (parameter-space clustering);
* :func:`count_sketch`: a seeded random projection of a flattened update (similarity without the
  raw update, DisUE's ``projection_dim``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from torch import nn

from ..learn import arrays_to_state, state_to_arrays
from .robust import AggregationOptions, combine

KeyFilter = Callable[[str], bool]


def weighted_average(states: Sequence[dict[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Average float arrays by ``weights`` (in float64, returned as float32); integer buffers
    (BatchNorm's batch counters) take the maximum."""
    total = float(sum(weights))
    buffers = _max_buffers(states)
    return {key: (sum(w * s[key].astype(np.float64) for s, w in zip(states, weights)) / total).astype(np.float32)
            if key.startswith("w.") else buffers[key] for key in states[0]}


def _max_buffers(states: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Integer buffers (BatchNorm's batch counters): the maximum over clients."""
    return {key: np.max(np.stack([s[key] for s in states]), axis=0) for key in states[0] if not key.startswith("w.")}


def aggregate_weights(states: Sequence[dict[str, np.ndarray]], weights: Sequence[float],
                      options: AggregationOptions) -> dict[str, np.ndarray]:
    """The clients' states combined by the experiment's rule: :func:`weighted_average` for
    ``mean``; otherwise the float arrays, flattened into one vector per client, by
    :func:`robust.combine` (integer buffers take the maximum, as in the mean)."""
    if options.rule == "mean":
        return weighted_average(states, weights)
    names = sorted(k for k in states[0] if k.startswith("w."))
    stack = np.stack([np.concatenate([s[k].reshape(-1).astype(np.float64) for k in names]) for s in states])
    flat = combine(stack, np.asarray(weights, dtype=np.float64), options)
    out, start = {}, 0
    for key in names:
        size = states[0][key].size
        out[key] = flat[start: start + size].reshape(states[0][key].shape).astype(np.float32)
        start += size
    buffers = _max_buffers(states)
    return {key: out[key] if key.startswith("w.") else buffers[key] for key in states[0]}  # the states' order


def shared_arrays(model: nn.Module, shared: KeyFilter | None = None) -> dict[str, np.ndarray]:
    """``model``'s state as message arrays, only the tensors whose name (without the ``w.``/``b.``
    prefix) ``shared`` accepts (all by default)."""
    arrays = state_to_arrays(model)
    return arrays if shared is None else {k: v for k, v in arrays.items() if shared(k[2:])}


def load_shared(model: nn.Module, arrays: dict[str, np.ndarray], shared: KeyFilter | None = None) -> None:
    """Load received arrays into ``model``: all of its state, or (``shared`` given) the shared part,
    leaving the rest (the personal part) as it is."""
    arrays_to_state(model, arrays, strict=shared is None)


def flat_weights(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The float arrays of a state, flattened into one float64 vector (name order)."""
    return np.concatenate([arrays[k].reshape(-1).astype(np.float64) for k in sorted(arrays) if k.startswith("w.")])


def weight_distance_matrix(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Euclidean distances between flattened weight vectors."""
    stack = np.stack(vectors)
    sq = (stack**2).sum(axis=1)
    return np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * stack @ stack.T, 0.0, None))


def count_sketch(vector: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """The CountSketch of ``vector`` in ``dim`` buckets: coordinate j adds ``s_j · v_j`` to bucket
    ``h(j)``, with hash ``h`` and signs ``s = ±1`` drawn from ``seed`` (everyone holding the seed
    draws the same). A sparse random projection: inner products, hence cosines and distances, are
    preserved in expectation, with a variance that falls as ``dim`` grows (Charikar et al. 2002)."""
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    rng = np.random.default_rng(seed)
    buckets = rng.integers(0, dim, size=v.size)
    signs = rng.integers(0, 2, size=v.size) * 2.0 - 1.0
    return np.bincount(buckets, weights=signs * v, minlength=dim).astype(np.float32)
