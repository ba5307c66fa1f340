"""Rules that combine several clients' soft labels into one target matrix (one place each)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .robust import AggregationOptions, combine

AGGREGATIONS = ("mean", "median", "max")


def aggregate_probabilities(probs: Sequence[np.ndarray], rule: str = "mean",
                            robust: AggregationOptions | None = None) -> np.ndarray:
    """Combine (N, C) probability matrices elementwise; rows are renormalized to sum to 1.

    ``mean`` (FedMD's consensus, COSMOS's default), ``median`` (robust to a few outlying clients)
    or ``max`` (the elementwise maximum; COSMOS's paper sweeps all three as the server input).
    ``robust``: the experiment's ``aggregation`` section; a rule other than ``mean`` there (median,
    trimmed mean: :mod:`robust`) replaces ``rule``."""
    if not probs:
        raise ValueError("aggregate_probabilities needs at least one matrix")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probs])
    if robust is not None and robust.rule != "mean":
        flat = stack.reshape(len(stack), -1)
        out = combine(flat, np.ones(len(stack)), robust).reshape(stack.shape[1:])
    elif rule == "mean":
        out = stack.mean(axis=0)
    elif rule == "median":
        out = np.median(stack, axis=0)
    elif rule == "max":
        out = stack.max(axis=0)
    else:
        raise ValueError(f"aggregation rule {rule!r} is not supported (allowed: {', '.join(AGGREGATIONS)})")
    out = np.clip(out, 0.0, None)
    sums = out.sum(axis=-1, keepdims=True)
    out = np.where(sums > 0, out / np.where(sums > 0, sums, 1.0), 1.0 / out.shape[-1])
    return out.astype(np.float32)


def hard_label_vote(probs: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Majority vote of the argmax labels, as one-hot rows (ties go to the lowest class id)."""
    winner = majority_vote([np.asarray(p).argmax(axis=-1) for p in probs], num_classes)
    return np.eye(num_classes, dtype=np.float32)[winner]


def majority_vote(labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Per sample, the class most of the (N,) hard-label vectors name (ties: the lowest class id)."""
    if not labels:
        raise ValueError("majority_vote needs at least one label vector")
    n = len(labels[0])
    votes = np.zeros((n, num_classes), dtype=np.int64)
    rows = np.arange(n)
    for y in labels:
        y = np.asarray(y, dtype=np.int64)
        if y.shape != (n,) or (n and (y.min() < 0 or y.max() >= num_classes)):
            raise ValueError(f"majority_vote: expected {n} labels in 0..{num_classes - 1}, got shape {y.shape}")
        votes[rows, y] += 1
    return votes.argmax(axis=-1).astype(np.int64)
