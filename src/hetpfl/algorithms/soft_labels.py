"""Rules that combine several clients' soft labels into one target matrix (one place each)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

AGGREGATIONS = ("mean", "median")


def aggregate_probabilities(probs: Sequence[np.ndarray], rule: str = "mean") -> np.ndarray:
    """Combine (N, C) probability matrices elementwise; rows are renormalized to sum to 1."""
    if not probs:
        raise ValueError("aggregate_probabilities needs at least one matrix")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probs])
    if rule == "mean":
        out = stack.mean(axis=0)
    elif rule == "median":
        out = np.median(stack, axis=0)
    else:
        raise ValueError(f"aggregation rule {rule!r} is not supported (allowed: {', '.join(AGGREGATIONS)})")
    out = np.clip(out, 0.0, None)
    sums = out.sum(axis=-1, keepdims=True)
    out = np.where(sums > 0, out / np.where(sums > 0, sums, 1.0), 1.0 / out.shape[-1])
    return out.astype(np.float32)


def hard_label_vote(probs: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Majority vote of the argmax labels, as one-hot rows (ties go to the lowest class id)."""
    votes = np.zeros((len(probs[0]), num_classes), dtype=np.int64)
    rows = np.arange(len(probs[0]))
    for p in probs:
        votes[rows, np.asarray(p).argmax(axis=-1)] += 1
    winner = votes.argmax(axis=-1)
    return np.eye(num_classes, dtype=np.float32)[winner]
