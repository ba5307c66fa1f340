"""IFCA (Ghosh et al., 2020): the Iterative Federated Clustering Algorithm, model-averaging form.

K cluster models θ_0..θ_{K-1}. Every round t:
  SERVER  sends all K models to the sampled clients;
  CLIENT  i: ĵ = argmin_j F_i(θ_j), its training loss under each model;
          loads θ_ĵ, trains it with the shared routine, uploads w_i, n_i and ĵ;
  SERVER  for every j chosen by someone: θ_j ← Σ_{i: ĵ_i = j} n_i w_i / Σ n_i  (FedAvg within j);
          a model nobody chose keeps its weights. Client i's cluster is its last choice.

Choices where the paper is silent (ours):

* Initialization: K distinct random initializations from the server's seeded stream, each
  under its own key: θ_0 under FedAvg's key ``global``, θ_j (j >= 1) under ``cluster-<j>``
  (the official code draws them one after another from one seed; it does not warm-start).
* F_i(θ_j): mean cross-entropy on the client's whole training split (this round's view), the model
  in eval mode, no augmentation, as the official code scores each machine's data
  (``selection_samples``: a random subset of that many samples per round instead, from the
  client's stream, to cut the K forward passes); ties to the lowest j.
* Weighting by sample counts (the paper and code average uniformly over equal-sized clients).
* No remedy for a model nobody chooses: it keeps its weights and may never be chosen again, so
  IFCA can merge groups for good (as happens with some initializations; docs in tests/test_clustered.py).
* Clients not sampled keep their cluster; a client never sampled has none (-1) and no cluster model
  (with K = 1 every client is in the one cluster from the start: there is nothing to choose).
* The client's own (personalized) model is its trained copy of θ_ĵ, as FedAvg's is of the global model.

Messages: with K > 1 model j's arrays travel as ``w.<j>/<name>`` (``b.<j>/...`` for integer
buffers), the reply carries the trained weights, ``num_examples`` and ``cluster`` = ĵ. With K = 1
nothing is chosen: the round is FedAvg's, message for message (same keys, same bytes, same
stage name, hence the same seeds), and θ_0 starts as FedAvg's global model, so every accuracy
equals FedAvg's; only the names of the cluster records differ (``cluster_*`` for ``global_*``)
and the assignment is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..configuration import Validated, option
from ..learn import evaluate
from ..messages import Message, Schema, StageSchema
from .base import AlgorithmSpec, ClientContext, Comm, ServerSetup, train_locally, weight_fields
from .clustering import ClusteredServer, check_num_clusters
from .fedavg import FedAvgClient
from .weights import load_shared, shared_arrays


@dataclass
class IFCAConfig(Validated):
    num_clusters: int = option(4, ge=1)  # K (the paper's rotated MNIST: 4); at most the number of clients
    selection_samples: int | None = option(None, ge=1)  # samples scored per model (None: the whole split)


def pack_models(models: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """K models' arrays in one message (one model: its own arrays, FedAvg's message)."""
    if len(models) == 1:
        return dict(models[0])
    return {f"{key[:2]}{j}/{key[2:]}": value for j, arrays in enumerate(models) for key, value in arrays.items()}


def unpack_models(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The inverse of :func:`pack_models`."""
    if all("/" not in key for key in arrays):
        return [dict(arrays)]
    models: dict[int, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        index, name = key[2:].split("/", 1)
        models.setdefault(int(index), {})[key[:2] + name] = value
    if sorted(models) != list(range(len(models))):
        raise ValueError(f"IFCA message holds models {sorted(models)}, expected 0..{len(models) - 1}")
    return [models[j] for j in range(len(models))]


class IFCAServer(ClusteredServer):
    def __init__(self, config: IFCAConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        for k in range(config.num_clusters):
            self.models[k] = self.new_model(self.model_key(k))
        if config.num_clusters == 1:  # one model, no choice: everyone is in its cluster from the start
            self.assignment[:] = 0

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        package = pack_models([self.weights(k) for k in range(self.config.num_clusters)])
        replies = comm.ask("train", {c: Message(dict(package)) for c in clients})
        choices = {c: checked_choice(c, r, self.config.num_clusters) for c, r in replies.items()}
        for c, j in choices.items():
            self.assignment[c] = j
        if replies:
            self.aggregate(replies, choices)
        return {"clusters_chosen": float(len(set(choices.values())))} if self.config.num_clusters > 1 else {}


class IFCAClient(FedAvgClient):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        models = unpack_models(message.arrays)
        choice = lowest_loss(models, ctx, self.config.selection_samples) if len(models) > 1 else 0
        load_shared(ctx.model, models[choice])
        train_locally(ctx)
        reply = Message(shared_arrays(ctx.model), {"num_examples": len(ctx.train)})
        if len(models) > 1:
            reply.scalars["cluster"] = choice
        return reply



def checked_choice(client: int, reply: Message, count: int) -> int:
    """The model index a client reports as ``cluster`` (0 when it had nothing to choose), checked
    against the ``count`` models it was sent."""
    j = int(reply.scalars.get("cluster", 0))
    if not 0 <= j < count:
        raise ValueError(f"client {client} chose model {j}, not one of 0..{count - 1}")
    return j


def lowest_loss(models: list[dict[str, np.ndarray]], ctx: ClientContext, samples: int | None = None) -> int:
    """argmin_j of the client's training loss under model j (ties: the lowest j), on ``samples``
    random training samples (None: all), each model loaded into ``ctx.model`` in turn."""
    x, y = ctx.train.x, ctx.train.y
    if samples is not None and samples < len(y):
        pick = np.sort(ctx.rng("select").choice(len(y), size=samples, replace=False))
        x, y = x[pick], y[pick]
    losses = []
    for arrays in models:
        load_shared(ctx.model, arrays)
        losses.append(evaluate(ctx.model, x, y)["loss"] if len(y) else 0.0)
    return int(np.argmin(losses))


def check_run(config: IFCAConfig, run) -> None:
    check_num_clusters(config.num_clusters, run.num_clients)


TRAIN_SCHEMA = StageSchema(
    down=Schema(prefix_arrays=weight_fields()),  # w.<name> (K = 1) or w.<j>/<name>
    up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int, "cluster": int},
              optional=frozenset({"cluster"})),  # no choice to report when K = 1
)

SPEC = AlgorithmSpec(
    name="ifca",
    config_cls=IFCAConfig,
    server_cls=IFCAServer,
    client_cls=IFCAClient,
    schemas={"train": TRAIN_SCHEMA},
    summary="K cluster models; each client trains the one with its lowest training loss; FedAvg per cluster "
    "(homogeneous architectures only).",
    homogeneous_only=True,
    stateful_clients=False,
    check_run=check_run,
)
