"""COMET (Cho et al., 2023) as COSMOS's paper runs it: clustered soft-label consensus, no server model.

Every round t:
  CLIENT i  the routine COSMOS clients run (pseudo_label_client.PseudoLabelClient): distill the
            received targets (from round 1 on; Adam at lr 8e-4, the code's COMET value), train on
            private data, upload p_i = softmax(f_i(U)).
  SERVER    k-means with K clusters on the flattened p_i (every round, warm started from the last
            round's centroids, as COSMOS's code runs its COMET baseline); each cluster's targets
            are the mean of its members' p_i; they go to the members at the start of the next
            round. The server trains no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..configuration import option
from .base import AlgorithmSpec, Comm, Server, ServerSetup
from .clustering import kmeans
from .pseudo_label_client import SOFT_LABEL_ROUND, cluster_targets, PseudoLabelClient, PseudoLabelClientConfig
from .soft_labels import AGGREGATIONS, aggregate_probabilities


@dataclass
class CometConfig(PseudoLabelClientConfig):
    distill_lr: float = option(8e-4, gt=0)  # COSMOS's code: client distillation lr of its COMET baseline
    num_clusters: int = option(5, ge=1)  # K (COSMOS's COMET baseline uses 5, the number of data groups)
    aggregation: str = option("mean", choices=AGGREGATIONS)  # COMET averages its cluster's soft labels
    recluster_every_round: bool = True  # COMET re-clusters each round (warm-started k-means)
    kmeans_restarts: int = option(10, ge=1)  # k-means++ seedings for a cold start (the best inertia wins)


class CometServer(Server):
    def __init__(self, config: CometConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.assignment = np.full(setup.num_clients, -1, dtype=np.int64)
        self.centroids: np.ndarray | None = None
        self.feedback: dict[int, np.ndarray] = {}  # cluster-averaged soft labels, sent next round

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        replies = comm.ask("round", cluster_targets(clients, self.assignment, self.feedback))
        if not replies:
            return {}
        ids = sorted(replies)
        points = np.stack([replies[c].arrays["probs"].reshape(-1) for c in ids]).astype(np.float64)
        if self.centroids is None or self.config.recluster_every_round:
            k = min(self.config.num_clusters, len(ids))
            warm = self.centroids if self.centroids is not None and len(self.centroids) == k else None
            labels, self.centroids = kmeans(points, k, self.setup.rng("kmeans", rnd),
                                            init=warm, restarts=self.config.kmeans_restarts)
        else:  # clustered once: clients keep their cluster, a newcomer joins the nearest centroid
            nearest = ((points[:, None, :] - self.centroids[None]) ** 2).sum(-1).argmin(axis=1)
            labels = np.where(self.assignment[ids] >= 0, self.assignment[ids], nearest)
        self.assignment[ids] = labels
        self.feedback = {}
        for k in sorted(set(labels.tolist())):
            members = [c for c, label in zip(ids, labels) if label == k]
            self.feedback[int(k)] = aggregate_probabilities([replies[c].arrays["probs"] for c in members],
                                                            self.config.aggregation)
        return {"num_clusters": float(len(self.feedback))}

    def cluster_assignment(self) -> np.ndarray:
        return self.assignment.copy()


SPEC = AlgorithmSpec(
    name="comet",
    config_cls=CometConfig,
    server_cls=CometServer,
    client_cls=PseudoLabelClient,
    schemas={"round": SOFT_LABEL_ROUND},
    summary="Clients distill the average soft labels of their k-means cluster (no server model).",
    uses_public=True,
)
