"""FeSEM (Xie et al., "Multi-center federated learning", 2021): stochastic EM over K model centers.

The objective is min Σ_i Σ_k r_ik ||W_i - W̃_k||² over the assignments r and the centers W̃, with
each local model W_i trained on its client's data. Every round t:
  SERVER  sends each sampled client i the center of its cluster, W̃_{r_i};
  CLIENT  loads it, trains with the shared routine, uploads W_i and n_i;
  SERVER  E-step: r_i = argmin_k ||W_i - W̃_k||₂ for every upload (parameter-space L2);
          M-step: W̃_k ← Σ_{i: r_i = k} n_i W_i / Σ n_i for every center with uploads
          (a center without any keeps its weights).

No official code exists (docs: methods.md §7), so every step the paper leaves open is ours:

* Round 0 (no centers yet): every sampled client trains from one common initialization (FedAvg's
  initial global model; models from different random starts would be far apart for reasons that
  have nothing to do with their data), then the K centers are initialized from those uploads:
  ``center_init=kmeans`` (default) runs k-means++ on the flattened uploads (``kmeans_restarts``
  seedings from the server's stream, the lowest inertia wins) and takes its clusters;
  ``random_clients`` takes K uploads drawn from the server's stream as centers and assigns every
  upload to its nearest. Either way the centers are then the M-step's weighted means.
  FeSEM therefore needs K <= the clients sampled per round (checked before training).
* E-step distances cover every float tensor of the model state; ties go to the lowest center.
* A client that has no cluster yet (not sampled in round 0) starts from the mean of the centers
  and is placed by the E-step like everyone else.
* Clients not sampled keep their cluster; the M-step averages this round's uploads only
  (the paper's full participation makes these the same).
* Weighting by sample counts; the client's own (personalized) model is its trained copy of its
  center, as in FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..configuration import Validated, option
from ..messages import Message
from .base import AlgorithmSpec, Comm
from .clustering import ClusteredServer, check_num_clusters, kmeans, nearest_center
from .fedavg import WEIGHTS_ROUND, FedAvgClient
from .weights import flat_weights, shared_arrays, weighted_average

CENTER_INITS = ("kmeans", "random_clients")


@dataclass
class FeSEMConfig(Validated):
    num_clusters: int = option(4, ge=1)  # K centers; at most the clients sampled per round
    center_init: str = option("kmeans", choices=CENTER_INITS)  # round 0: how the K centers are chosen
    kmeans_restarts: int = option(10, ge=1)  # kmeans: k-means++ seedings (the lowest inertia wins)


class FeSEMServer(ClusteredServer):
    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        replies = comm.ask("train", self.messages(clients))
        if not replies:
            return {"num_clusters": float(self.num_clusters_in_use())}
        ids = sorted(replies)
        points = np.stack([flat_weights(replies[c].arrays) for c in ids])
        if not self.models:
            labels = self.initial_clusters(points, rnd)
        else:  # E-step: the nearest center to each upload
            keys = sorted(self.models)
            centers = np.stack([flat_weights(self.weights(k)) for k in keys])
            labels = np.asarray(keys)[nearest_center(points, centers)]
        moved = sum(int(self.assignment[c] >= 0 and self.assignment[c] != k) for c, k in zip(ids, labels))
        self.assignment[ids] = labels
        self.aggregate(replies)  # M-step
        return {"num_clusters": float(self.num_clusters_in_use()), "reassigned": float(moved)}

    def messages(self, clients: list[int]) -> dict[int, Message]:
        """Each client's center; round 0 the common start, a client without a cluster the centers' mean."""
        if not self.models:
            start = shared_arrays(self.new_model(self.model_key(0)))
            return {c: Message(dict(start)) for c in clients}
        out = self.cluster_messages(clients)
        newcomers = [c for c in clients if c not in out]
        if newcomers:
            mean = weighted_average([self.weights(k) for k in sorted(self.models)], [1.0] * len(self.models))
            out.update({c: Message(dict(mean)) for c in newcomers})
        return dict(sorted(out.items()))

    def initial_clusters(self, points: np.ndarray, rnd: int) -> np.ndarray:
        k = min(self.config.num_clusters, len(points))
        rng = self.setup.rng("fesem-init", rnd)
        if self.config.center_init == "random_clients":
            seeds = np.sort(rng.choice(len(points), size=k, replace=False))
            return nearest_center(points, points[seeds])
        labels, _ = kmeans(points, k, rng, restarts=self.config.kmeans_restarts)
        return labels


def check_run(config: FeSEMConfig, run) -> None:
    """Round 0 initializes the K centers from that round's uploads: K <= the clients of a round."""
    check_num_clusters(config.num_clusters, min(len(r) for r in run.schedule()), "clients sampled per round")


SPEC = AlgorithmSpec(
    name="fesem",
    config_cls=FeSEMConfig,
    server_cls=FeSEMServer,
    client_cls=FedAvgClient,
    schemas={"train": WEIGHTS_ROUND},
    summary="K model centers; each client joins the center nearest its trained weights (L2) and trains from it; "
    "each center is its members' weighted mean (homogeneous architectures only).",
    homogeneous_only=True,
    stateful_clients=False,
    check_run=check_run,
)
