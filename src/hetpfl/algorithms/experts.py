"""Class-wise experts and class prototypes (Mosaic; no ``SPEC``: not a method).

* :func:`class_experts`: from the clients' weights θ_i and class counts n_ic, one expert per class,
  ``e_c = Σ_i n_ic θ_i / Σ_i n_ic`` (Mosaic's code: the FedAvg rule with class c's counts as the
  weights), entry-wise over width sub-models; a robust ``aggregation`` rule replaces the weighted
  mean. A class no client in the round holds keeps its former expert.
* :func:`class_prototypes`: a client's per-class summary of its penultimate features: the
  ``k``-means centres of each class's features, or the class mean when the class has fewer than
  ``k`` samples (Mosaic's code: k = 10).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..learn.tensors import as_input_tensor
from .clustering import kmeans
from .robust import AggregationOptions
from .submodels import average_submodels


def class_experts(previous: Mapping[int, dict[str, np.ndarray]], full: Mapping[str, np.ndarray],
                  subs: Sequence[Mapping[str, np.ndarray]], indices: Sequence[Mapping[str, tuple[np.ndarray, ...]]],
                  class_counts: Sequence[np.ndarray], num_classes: int,
                  options: AggregationOptions | None = None) -> dict[int, dict[str, np.ndarray]]:
    """The round's experts ``{c: e_c}``: e_c = Σ_i n_ic θ_i / Σ_i n_ic over the clients holding class c
    (entry-wise over the sub-models holding each entry; a class's former expert, else ``full``,
    keeps the entries none of them holds). Classes no client holds are left out. ``options``: the
    experiment's ``aggregation``; ``median`` / ``trimmed_mean`` replace the count-weighted mean over
    each class's holders, so a few hostile uploads (or hostile counts) cannot steer an expert."""
    experts = {}
    for c in range(num_classes):
        holders = [i for i, n in enumerate(class_counts) if n[c] > 0]
        if holders:
            experts[c] = average_submodels(previous.get(c, full), [subs[i] for i in holders],
                                           [indices[i] for i in holders], [class_counts[i][c] for i in holders],
                                           options)
    return experts


@torch.no_grad()
def penultimate_features(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """``model.features(x)`` in eval mode, float32, in input order."""
    model.eval()
    xt = as_input_tensor(x)
    parts = [model.features(xt[i : i + batch_size]) for i in range(0, len(xt), batch_size)]
    return torch.cat(parts).float().numpy() if parts else np.zeros((0, 0), np.float32)


def class_prototypes(features: np.ndarray, labels: np.ndarray, k: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per class present in ``labels``: ``k``-means centres of its features (its mean when it has
    fewer than ``k`` samples). Returns ``(prototypes (P, D) float32, their classes (P,) int64)``."""
    protos, classes = [], []
    for c in np.unique(labels):
        rows = features[labels == c]
        centres = rows.mean(axis=0, keepdims=True) if len(rows) < k else kmeans(rows, k, rng, restarts=1)[1]
        protos.append(centres.astype(np.float32))
        classes.append(np.full(len(centres), c, dtype=np.int64))
    if not protos:
        return np.zeros((0, features.shape[1] if features.ndim == 2 else 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(protos), np.concatenate(classes)
