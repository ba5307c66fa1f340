"""CFL (Sattler, Müller & Samek, 2020): clustered FL by recursive bipartitioning of update directions.

"Clustered Federated Learning: Model-Agnostic Distributed Multitask Optimization under Privacy
Constraints" (IEEE TNNLS). Every client starts in one cluster. Every round t, per cluster c:
  SERVER  sends θ_c to the sampled members of c;
  CLIENT  i loads θ_c, trains with the shared routine, uploads w_i and n_i;
  SERVER  Δ_i = w_i - θ_c (computed from the upload: the same information as an uploaded update);
          mean = ||Σ_i n_i Δ_i / Σ_i n_i||,  max = max_i ||Δ_i||   (over c's sampled members)
          if t >= warmup and mean < ε1 and max > ε2 and c has >= min_cluster_size members:
              α_ij = cos(Δ_i, Δ_j);  c → c1, c2 by complete-linkage clustering of 1 - α into 2
              (the paper's optimal bipartition, the official code's AgglomerativeClustering)
          θ_k ← Σ_{i∈k} n_i w_i / Σ n_i for every (new) cluster k with uploads   (= θ_c + mean Δ)

With one cluster that never splits (e.g. ε1 = 0) this is FedAvg exactly: the same messages, the
same arithmetic (cluster 0 starts as FedAvg's global model), so every accuracy equals FedAvg's.

Defaults are the official code's (felisat/clustered-federated-learning): ε1 = 0.4, ε2 = 1.6, a
split only after round 20 (``c_round > 20``, 1-based) and only of a cluster of more than 2 clients.
ε1 and ε2 are absolute norms of weight updates: they depend on the optimizer, learning rate, local
epochs and model (the official code: SGD lr 0.1, momentum 0.9, one epoch, batch 128), so set them
from the ``cluster<k>_mean_update_norm``/``cluster<k>_max_update_norm`` the server reports. E.g.
rotated MNIST, cnn_small, Adam lr 0.003, 2 local epochs of 200 samples: one cluster's mean norm
falls from 1.25 to 0.5 over 20 rounds while the largest stays near 2; ε1 = 0.9, ε2 = 1.5 after
3 rounds split it at round 4 (0/180 vs 90/270 degrees) and both halves at round 6 (ARI 1.0).

Choices where the paper is silent or the code differs (ours):

* The mean update is sample-weighted (the official code averages uniformly); Δ covers every
  float tensor of the model state (the code: the parameters; the same for a model without
  BatchNorm statistics).
* Partial participation: the split test uses the updates of this round's sampled members. The
  server keeps every client's latest update, and a split partitions every member that has one
  (the official code's similarity matrix likewise holds each client's latest update). A member
  that never trained goes with the first part. Clients not sampled keep their cluster.
* The part holding the lowest client id keeps the cluster's id, the other gets a new id; a part
  without uploads this round starts from the cluster's model of the round.
* No cap on the number of clusters and no γ_max / α_cross test (the paper's extra checks the
  official code does not run).
* The client's own (personalized) model is its trained copy of its cluster model, as in FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..configuration import Validated, option
from ..messages import Message
from .base import AlgorithmSpec, Comm, ServerSetup
from .clustering import LINKAGES, ClusteredServer, agglomerative, cosine_similarity
from .fedavg import WEIGHTS_ROUND, FedAvgClient
from .weights import flat_weights


@dataclass
class CFLConfig(Validated):
    eps1: float = option(0.4, ge=0)  # split when the cluster's mean update norm is below ε1 (code: 0.4)...
    eps2: float = option(1.6, ge=0)  # ...and its largest client update norm above ε2 (code: 1.6)
    warmup_rounds: int = option(20, ge=0)  # no split before round index 20 (code: c_round > 20, 1-based)
    min_cluster_size: int = option(3, ge=2)  # members with a known update needed to split (code: > 2)
    linkage: str = option("complete", choices=LINKAGES)  # of the bipartition (paper and code: complete)


class CFLServer(ClusteredServer):
    def __init__(self, config: CFLConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.models[0] = self.new_model(self.model_key(0))
        self.assignment[:] = 0  # everyone starts in the one cluster
        self.updates: dict[int, np.ndarray] = {}  # each client's latest Δ_i (float32, flattened)
        self.splits = 0

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        before = {k: self.weights(k) for k in sorted({int(self.assignment[c]) for c in clients})}
        replies = comm.ask("train", {c: Message(dict(before[int(self.assignment[c])])) for c in clients})
        if not replies:
            return {"num_clusters": float(self.num_clusters_in_use())}
        bases = {k: flat_weights(arrays) for k, arrays in before.items()}
        for c, reply in replies.items():
            self.updates[c] = (flat_weights(reply.arrays) - bases[int(self.assignment[c])]).astype(np.float32)
        measures: dict[str, float] = {}
        for k in sorted({int(self.assignment[c]) for c in replies}):
            fresh = [c for c in replies if self.assignment[c] == k]
            sizes = np.array([float(replies[c].scalars["num_examples"]) for c in fresh])
            stack = np.stack([self.updates[c].astype(np.float64) for c in fresh])
            mean_norm = float(np.linalg.norm(sizes @ stack / sizes.sum()))
            max_norm = float(np.linalg.norm(stack, axis=1).max())
            measures[f"cluster{k}_mean_update_norm"] = mean_norm
            measures[f"cluster{k}_max_update_norm"] = max_norm
            if self.should_split(rnd, k, mean_norm, max_norm):
                self.split(k, before[k])
        self.aggregate(replies)
        measures["num_clusters"] = float(self.num_clusters_in_use())
        measures["splits"] = float(self.splits)
        return measures

    def should_split(self, rnd: int, k: int, mean_norm: float, max_norm: float) -> bool:
        c = self.config
        known = [i for i in np.flatnonzero(self.assignment == k) if int(i) in self.updates]
        return rnd >= c.warmup_rounds and mean_norm < c.eps1 and max_norm > c.eps2 and len(known) >= c.min_cluster_size

    def split(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        """Bipartition cluster ``k`` by the cosine similarity of its members' latest updates."""
        members = [int(i) for i in np.flatnonzero(self.assignment == k)]
        known = [i for i in members if i in self.updates]
        sim = cosine_similarity([self.updates[i] for i in known])
        parts = agglomerative(1.0 - sim, self.config.linkage, num_clusters=2)  # part 0 holds known[0]
        new = max(self.models) + 1
        for i, part in zip(known, parts):
            if part == 1:
                self.assignment[i] = new
        self.set_model(new, arrays)  # the cluster's model of this round until its members upload
        self.splits += 1


SPEC = AlgorithmSpec(
    name="cfl",
    config_cls=CFLConfig,
    server_cls=CFLServer,
    client_cls=FedAvgClient,
    schemas={"train": WEIGHTS_ROUND},
    summary="FedAvg per cluster; a cluster at a stationary point with diverging client updates splits in two "
    "by the cosine similarity of the updates (homogeneous architectures only).",
    homogeneous_only=True,
    stateful_clients=False,
)
