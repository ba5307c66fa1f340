"""COSMOS (Ben Rachmut et al., 2026): clustered server models, pseudo-label-only communication.

Clients may run any architecture; only predictions on the shared unlabeled public inputs U travel
up and only pseudo-labels travel down, never weights, gradients or labels. Every round t:

  CLIENT i  (pseudo_label_client.PseudoLabelClient)
    if t > 0: DISTILL q_k(i) on U   (KL to the targets + λ · noise consistency, temperature T)
    TRAIN on its private data
    UPLOAD p_i = softmax(f_i(U))    (N_U × C)

  SERVER
    if t == 0 (or every round, if configured):
        CLUSTER the clients: distances d_ij = ||p_i - p_j||_F (or symmetric CE), greedy
        elimination at a threshold ε chosen from the distance matrix alone (``auto``), by the
        official code's oracle search (``oracle``: K* = true number of groups) or given (``threshold``)
    for each cluster k:
        pbar_k = aggregate(p_i : i in k)        (mean by default; median or max)
        TRAIN the server model g_k (kept across rounds; its own architecture) on U:
              KL(pbar_k ‖ g_k) + λ · noise consistency, T on the targets, Adam 1e-4, clip 1.0
        q_k = softmax(g_k(U)), sent to the members of k at the start of the next round

Reported every round: each client's own model on its test split (``personalized_acc_*``) and its
cluster's server model on that split (``server_acc_*``, the measure the paper plots). The engine
computes the adjusted Rand index of :meth:`CosmosServer.cluster_assignment` against the true
groups; the server never sees them. See docs/cosmos.md for every choice made here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..configuration import option, require
from ..learn import OptimOptions, distill, predict_proba
from .base import AlgorithmSpec, Comm, Server, ServerSetup
from .clustering import (
    DISTANCES,
    ClusterChoice,
    auto_threshold,
    distance,
    greedy_elimination,
    match_clusters,
    oracle_threshold,
    pairwise_distances,
)
from .pseudo_label_client import SOFT_LABEL_ROUND, cluster_targets, PseudoLabelClient, PseudoLabelClientConfig
from .soft_labels import AGGREGATIONS, aggregate_probabilities

CLUSTER_SELECTIONS = ("auto", "oracle", "threshold")


@dataclass
class CosmosConfig(PseudoLabelClientConfig):
    # --- the server models ---------------------------------------------------------------------
    server_arch: str = "vgg_small"  # paper: VGG-16 (from scratch); ours: the VGG-style registry net
    server_epochs: float = option(5.0, ge=0)  # passes over U per round and cluster (code)
    server_lr: float = option(1e-4, gt=0)  # Adam (code)
    server_batch_size: int = option(32, ge=1)  # code
    server_max_grad_norm: float | None = option(1.0, gt=0)  # code
    server_shuffle: bool = True  # not stated for the server; we shuffle (rows stay paired with targets)
    server_temperature: float | None = option(None, gt=0)  # None: the clients' T
    server_consistency_weight: float | None = option(None, ge=0)  # None: the clients' λ
    aggregation: str = option("mean", choices=AGGREGATIONS)  # the server input rule the paper sweeps
    collapse_guard: bool = True  # label-free: re-initialize a server model whose predictions collapse
    collapse_retries: int = option(5, ge=0)  # code: up to 5 tries
    # --- clustering ----------------------------------------------------------------------------
    distance: str = option("frobenius", choices=DISTANCES)  # frobenius | symmetric_ce
    # auto (silhouette) | oracle (code: needs K*) | threshold (fixed ε)
    cluster_selection: str = option("auto", choices=CLUSTER_SELECTIONS)
    recluster_every_round: bool = False  # paper: cluster once, at round 0
    min_silhouette: float = 0.25  # auto: below this best silhouette, one cluster (no structure)
    oracle_clusters: int | None = option(None, ge=1)  # oracle: K*, the TRUE number of data groups
    oracle_addition: int = option(0, ge=0)  # oracle: a, stop at <= K* + a clusters (code runs 0 and 2)
    epsilon_start: float = option(0.1, ge=0)  # oracle: first ε (code)
    epsilon_step: float = option(0.1, gt=0)  # oracle: ε increment (code)
    epsilon: float | None = option(None, ge=0)  # threshold: the fixed ε

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.cluster_selection != "oracle" or self.oracle_clusters is not None, "oracle_clusters",
                self.oracle_clusters, "cluster_selection=oracle needs the true number of groups K* (>= 1), "
                "e.g. the value of data.groups")
        require(self.cluster_selection != "threshold" or self.epsilon is not None, "epsilon", self.epsilon,
                "cluster_selection=threshold needs a threshold >= 0")

    @property
    def server_T(self) -> float:
        return self.temperature if self.server_temperature is None else self.server_temperature

    @property
    def server_lambda(self) -> float:
        return self.consistency_weight if self.server_consistency_weight is None else self.server_consistency_weight


def choose_clusters(dist: np.ndarray, config: CosmosConfig) -> ClusterChoice:
    """The clustering of COSMOS for a distance matrix, by the configured rule for ε."""
    if config.cluster_selection == "oracle":
        return oracle_threshold(dist, config.oracle_clusters + config.oracle_addition,
                                config.epsilon_start, config.epsilon_step)
    if config.cluster_selection == "threshold":
        return ClusterChoice(greedy_elimination(dist, config.epsilon), config.epsilon)
    return auto_threshold(dist, config.min_silhouette)


def collapsed(predictions: np.ndarray, targets: np.ndarray) -> bool:
    """Label-free collapse test: the model names one class for every public input while the
    targets name several."""
    return np.unique(predictions.argmax(-1)).size == 1 and np.unique(targets.argmax(-1)).size > 1


class CosmosServer(Server):
    # each cluster's soft labels: the experiment's aggregation rule (median, trimmed mean) if set, else
    # ``algorithm.aggregation`` (the paper's sweep: mean, median, max)
    aggregates = "rows"

    def __init__(self, config: CosmosConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.assignment = np.full(setup.num_clients, -1, dtype=np.int64)  # cluster id per client
        self.models: dict[int, nn.Module] = {}  # g_k, kept across rounds
        self.aggregates: dict[int, np.ndarray] = {}  # pbar_k of the last round (assigns newcomers)
        self.feedback: dict[int, np.ndarray] = {}  # q_k, sent at the start of the next round
        self.clustering_measures: dict[str, float] = {}  # ε and silhouette of the clustering in use
        self._next_id = 0
        self._model_keys = 0

    # -- one round ------------------------------------------------------------------------------
    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        replies = comm.ask("round", cluster_targets(clients, self.assignment, self.feedback))
        probs = {c: m.arrays["probs"] for c, m in replies.items()}
        if not probs:
            return {}
        measures: dict[str, float] = {}
        with self.setup.clock.phase("clustering"):
            if rnd == 0 or self.config.recluster_every_round or not self.models:
                self.clustering_measures = self.cluster(probs)
            else:
                self.assign_newcomers(probs)
        measures.update(self.clustering_measures)
        with self.setup.clock.phase("server_models"):
            measures.update(self.train_server_models(rnd, probs, comm))
        measures["num_clusters"] = float(len(np.unique(self.assignment[self.assignment >= 0])))
        return measures

    # -- clustering -----------------------------------------------------------------------------
    def cluster(self, probs: dict[int, np.ndarray]) -> dict[str, float]:
        ids = sorted(probs)
        choice = choose_clusters(pairwise_distances([probs[c] for c in ids], self.config.distance), self.config)
        labels = np.full(self.setup.num_clients, -1, dtype=np.int64)
        labels[ids] = choice.labels
        mapping = match_clusters(self.assignment, labels) if self.models else {}
        for new in np.unique(choice.labels):  # keep a server model for a cluster that persists
            if int(new) not in mapping:
                mapping[int(new)] = self._next_id
                self._next_id += 1
        fresh = np.full(self.setup.num_clients, -1, dtype=np.int64)
        fresh[ids] = [mapping[int(k)] for k in choice.labels]
        keep = self.assignment >= 0
        keep[ids] = False  # clients absent from this clustering keep their cluster
        fresh[keep] = self.assignment[keep]
        self.assignment = fresh
        live = set(np.unique(fresh[fresh >= 0]).tolist())
        for store in (self.models, self.aggregates, self.feedback):
            for k in [k for k in store if k not in live]:
                del store[k]
        out = {}
        if choice.epsilon is not None:
            out["epsilon"] = float(choice.epsilon)
        if choice.score is not None:
            out["silhouette"] = float(choice.score)
        return out

    def assign_newcomers(self, probs: dict[int, np.ndarray]) -> None:
        """A client first seen after the clustering joins the cluster whose last aggregate is
        nearest to its predictions (only with partial participation)."""
        for c in sorted(probs):
            if self.assignment[c] < 0 and self.aggregates:
                gaps = {k: distance(probs[c], self.aggregates[k], self.config.distance) for k in sorted(self.aggregates)}
                self.assignment[c] = min(gaps, key=gaps.get)

    # -- server models --------------------------------------------------------------------------
    def train_server_models(self, rnd: int, probs: dict[int, np.ndarray], comm: Comm) -> dict[str, float]:
        order = sorted({int(self.assignment[c]) for c in probs})
        targets = {}
        for k in order:
            members = [c for c in sorted(probs) if self.assignment[c] == k]
            targets[k] = aggregate_probabilities([probs[c] for c in members], self.config.aggregation, self.setup.aggregation)
            self.aggregates[k] = targets[k]
        # The clusters are trained in turn, each attempt on a new model taking the next registry key;
        # where the runtime runs several tasks at once, the attempts the walk will most likely need
        # next are trained alongside (``_guesses``). A result depends on its (cluster, attempt, key)
        # alone, so the walk, and every record, is the in-turn one.
        kept = set(self.models)  # these clusters' first attempt continues their model
        # ... and is needed whatever the walk meets before it: no guess, it goes with the first batch
        certain = [(k, 0, None) for k in order if k in kept] if comm.workers > 1 else []
        results: dict[tuple, tuple] = {}  # (cluster, attempt, key or None) -> (model, loss, q)
        losses, retries = [], 0
        for i, k in enumerate(order):
            for attempt in range(self.config.collapse_retries + 1):
                slot = self._slot(k, attempt, self._model_keys, kept)
                if slot not in results:
                    batch = [slot] + self._guesses(order, i, slot, kept, max(1, comm.workers) - 1)
                    batch += [s for s in certain if s not in results and s not in batch]
                    results.update(zip(batch, comm.map(distill_cluster, [self._task(s, targets[s[0]], rnd) for s in batch])))
                model, loss, q = results[slot]
                self._model_keys += slot[2] is not None
                self.models[k] = model
                retry = self.config.collapse_guard and collapsed(q, targets[k])
                if not retry or attempt == self.config.collapse_retries:
                    break
                retries += 1
            losses.append(loss)
            self.feedback[k] = q
        return {"server_distill_loss": float(np.mean(losses)), "collapse_retries": float(retries)}

    @staticmethod
    def _slot(k: int, attempt: int, key: int, kept: set[int]) -> tuple[int, int, int | None]:
        """An attempt of the walk: a kept cluster's first one continues its model (no key); any other
        trains a new model built with ``key``."""
        return (k, attempt, None) if attempt == 0 and k in kept else (k, attempt, key)

    def _guesses(self, order: list[int], i: int, slot: tuple[int, int, int | None], kept: set[int],
                 count: int) -> list[tuple]:
        """The next ``count`` attempts of the walk after ``slot`` (cluster ``order[i]``), if its
        outcome repeats: a retry collapses again (a cluster that collapsed tends to keep collapsing),
        a first attempt succeeds."""
        _, attempt, taken = slot
        guesses, key = [], self._model_keys + (taken is not None)
        chain = attempt > 0
        while len(guesses) < count:
            if chain and attempt < self.config.collapse_retries:
                attempt += 1
            else:
                i, attempt, chain = i + 1, 0, False
                if i == len(order):
                    break
            guesses.append(self._slot(order[i], attempt, key, kept))
            key += guesses[-1][2] is not None
        return guesses

    def _new_model(self, key: int) -> nn.Module:
        return self.setup.build_model(self.config.server_arch, f"cosmos-server-{key}")

    def _task(self, slot: tuple[int, int, int | None], target: np.ndarray, rnd: int) -> tuple:
        k, attempt, key = slot
        model = self.models[k] if key is None else self._new_model(key)
        c = self.config
        options = ServerDistill(
            epochs=c.server_epochs, batch_size=c.server_batch_size,
            optim=OptimOptions(lr=c.server_lr, optimizer="adam", max_grad_norm=c.server_max_grad_norm),
            temperature=c.server_T, consistency_weight=c.server_lambda, noise_std=c.noise_std, shuffle=c.server_shuffle,
            dropout_seed=self.setup.stream_seed("torch", rnd, k, attempt),
            stream_seed=self.setup.stream_seed("distill", rnd, k, attempt))
        return model, self.setup.public_inputs, target, options

    # -- what the engine reads ------------------------------------------------------------------
    def extra_models(self) -> dict[str, dict[int, nn.Module]]:
        return {"server": {c: self.models[int(k)] for c, k in enumerate(self.assignment) if int(k) in self.models}}

    def cluster_assignment(self) -> np.ndarray:
        return self.assignment.copy()


@dataclass(frozen=True)
class ServerDistill:
    """How a cluster's server model is distilled (the config's ``server_*`` options, one round's seeds)."""

    epochs: float
    batch_size: int
    optim: OptimOptions
    temperature: float
    consistency_weight: float
    noise_std: float
    shuffle: bool
    dropout_seed: int
    stream_seed: int


def distill_cluster(model: nn.Module, public: np.ndarray, target: np.ndarray,
                    options: ServerDistill) -> tuple[nn.Module, float, np.ndarray]:
    """One attempt at a cluster's server model: distill ``target`` into ``model`` on U, then its
    predictions q on U. Module-level so ``Comm.map`` can hand it to a worker."""
    torch.manual_seed(options.dropout_seed)  # dropout
    stream = torch.Generator()
    stream.manual_seed(options.stream_seed)
    result = distill(model, public, target, epochs=options.epochs, batch_size=options.batch_size,
                     optim=options.optim, generator=stream, temperature=options.temperature,
                     consistency_weight=options.consistency_weight, noise_std=options.noise_std,
                     shuffle=options.shuffle)
    return model, float(result["loss"]), predict_proba(model, public)


def check_run(config: CosmosConfig, run) -> None:
    """One rule for the clusters' soft labels: the paper's sweep or the experiment's robust rule."""
    robust = run.aggregation.rule
    require(robust == "mean" or config.aggregation == "mean", "aggregation", config.aggregation,
            f"set one rule for the clusters' soft labels: aggregation.rule={robust!r} is set too")


SPEC = AlgorithmSpec(
    name="cosmos",
    config_cls=CosmosConfig,
    server_cls=CosmosServer,
    client_cls=PseudoLabelClient,
    schemas={"round": SOFT_LABEL_ROUND},
    summary="Clients distill their cluster's server-model pseudo-labels; the server clusters clients by "
    "their public predictions and trains one model per cluster on the cluster's aggregated soft labels.",
    uses_public=True,
    check_run=check_run,
)
