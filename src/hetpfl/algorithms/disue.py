"""DisUE *as described* (Leng et al., IJCAI 2025, "Distilling A Universal Expert from Clustered
Federated Learning"): every round, cluster experts are distilled, data-free, into one universal
expert that starts every client's next round.

The paper publishes no code and only its abstract and outline are available (methods.md §3): the
three steps below are the paper's; every other choice is ours, named in docs/disue.md with the
alternatives (each a config key). Never read these numbers as the paper's.

Every round t (u_a: the universal expert of architecture a):
  SERVER  sends each sampled client the u_a of its architecture (``clustering: loss``: also the
          experts of a to choose among; ``projection_dim``: the round's sketch seed);
  CLIENT  i loads u_a, trains on its private data (the shared routine), uploads w_i, n_i and its
          class counts n_i^c (``loss``: its lowest-loss expert ĵ_i; ``projection_dim``: the
          CountSketch of its update Δ_i = w_i − u_a instead of letting the server compute Δ_i);
  SERVER  1. cluster each architecture's uploads (``clustering``):
               cosine  agglomerative (``linkage``) on 1 − cos(Δ_i, Δ_j); K given, or clusters cut at
                       ``similarity_threshold``, or K by the best silhouette (default)
               kmeans  k-means on the weights (FeSEM's parameter distance); K given or by silhouette
               loss    each client's lowest-loss expert ĵ_i (IFCA's selection; K fixed)
          2. expert e_k ← Σ_{i∈k} n_i w_i / Σ_{i∈k} n_i for every cluster k of the round
          3. teacher T(x | y) = Σ_k α_ky e_k(x), α_ky = n_k^y / Σ_j n_j^y, for a sample generated for
             class y (``expert_weights: sample_label``; ``class``: T(x)_c = Σ_k α_kc e_k(x)_c per logit;
             either way a class only cluster k holds is taught by e_k alone); for every architecture a:
             u_a ← Σ_{i of a} n_i w_i / Σ n_i (``student_init: average``), then ``distill_steps``
             iterations of: ``generator_steps`` updates of a server-side conditional generator G
             against T and u_a (fidelity CE(T(x), y) − KL(T ‖ u_a) + diversity, FedFTG's loop), and
             ``student_steps`` SGD steps on KL(T(x) ‖ u_a(x)) on fresh samples of G
             (``distill_data: public``: on batches of the public inputs instead).
Reported (docs/disue.md): u_a as ``global``, the cluster experts as ``cluster`` and
``cluster<k>_test_acc``, the round's teacher as ``teacher_test_acc``, the own models, the assignment.
With one cluster and ``distill_steps: 0`` a round is FedAvg's, accuracy for accuracy.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..configuration import FieldError, option
from ..learn import LogitEnsemble, OptimOptions, adversarial_distillation, arrays_to_state, distill_on_inputs
from ..messages import ArrayField, Message, Schema, StageSchema
from ..models import BUILT_FROM, ModuleSpec
from .base import AlgorithmSpec, Client, ClientContext, Comm, ServerSetup, train_locally, weight_fields
from .clustering import (LINKAGES, ClusteredServer, agglomerative, best_by_silhouette, check_num_clusters,
                         cluster_averages, cosine_similarity, kmeans, match_clusters)
from .datafree import AdversarialDistillationConfig, check_generator, class_samples, class_shares, generator_module
from .fedftg import LabelledGenerator, SampleLabelEnsemble
from .ifca import checked_choice, lowest_loss, pack_models, unpack_models
from .weights import count_sketch, flat_weights, load_shared, shared_arrays, weight_distance_matrix, weighted_average

CLUSTERINGS = ("cosine", "kmeans", "loss")
EXPERT_WEIGHTS = ("sample_label", "class", "uniform", "samples")
STUDENT_INITS = ("average", "previous")
DISTILL_DATA = ("generator", "public")


@dataclass
class DisUEConfig(AdversarialDistillationConfig):  # + the generator loop's keys (FedFTG's)
    clustering: str = option("cosine", choices=CLUSTERINGS)
    num_clusters: int | None = option(None, ge=1)  # K per architecture; None: by silhouette (loss needs K)
    similarity_threshold: float | None = option(None, ge=-1, le=1)  # cosine: cut where linkage cosine < this
    max_clusters: int = option(8, ge=2)  # the largest K the silhouette search tries
    min_silhouette: float = option(0.25, ge=-1, le=1)  # no K reaches it: one cluster (no structure)
    linkage: str = option("average", choices=LINKAGES)  # of the cosine clustering
    projection_dim: int | None = option(None, ge=1)  # cluster on CountSketches of the updates (None: raw)
    kmeans_restarts: int = option(10, ge=1)
    selection_samples: int | None = option(None, ge=1)  # loss: samples scored per expert (None: all)
    expert_weights: str = option("sample_label", choices=EXPERT_WEIGHTS)  # uniform: plain mean of the experts
    student_init: str = option("average", choices=STUDENT_INITS)  # previous: u_a of the last round
    distill_data: str = option("generator", choices=DISTILL_DATA)
    distill_steps: int = option(10, ge=0)  # iterations per round and architecture (0: no distillation)
    distill_lr: float = option(0.01, gt=0)  # SGD on the universal expert (FedFTG's fine-tuning)


def model_arrays(message: Message) -> dict[str, np.ndarray]:
    """The ``w.``/``b.`` arrays of an upload (without its class counts or sketch)."""
    return {k: v for k, v in message.arrays.items() if k[:2] in ("w.", "b.")}


class DisUEServer(ClusteredServer):
    def __init__(self, config: DisUEConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.archs = list(dict.fromkeys(setup.client_archs))  # in order of first appearance
        self.universal = {a: setup.build_model(a, "global") for a in self.archs}  # FedAvg's start
        self.next_id = 0  # the id of the next new cluster (ids are never reused)
        self.round_teacher: LogitEnsemble | None = None  # this round's teacher, scored if the round is evaluated
        if config.distill_data == "generator":
            spec = generator_module(config, setup, conditional=True)
            self.generator = setup.build_model(spec.arch, "generator", **spec.kwargs)
        if config.clustering == "loss":  # K seeded experts per architecture to choose among (IFCA)
            for a in self.archs:
                for _ in range(config.num_clusters):
                    self.models[self.next_id] = self.new_model(f"expert-{self.next_id}", a)
                    self.next_id += 1

    @property
    def expert_arch(self) -> dict[int, str]:
        """Each expert's architecture (read from how its module was built)."""
        specs = {ModuleSpec.parse(a): a for a in self.archs}
        return {k: specs[getattr(m, BUILT_FROM)] for k, m in self.models.items()}

    def experts_of(self, arch: str) -> list[int]:
        return [k for k, a in sorted(self.expert_arch.items()) if a == arch]

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        replies = comm.ask("train", self.messages(rnd, clients))
        if not replies:
            return {}
        labels = self.cluster(rnd, replies)  # step 2: clusters ...
        states = {c: model_arrays(r) for c, r in replies.items()}
        sizes = {c: float(r.scalars["num_examples"]) for c, r in replies.items()}
        arch = {k: self.setup.client_archs[c] for c, k in labels.items()}  # clusters form within an architecture
        for k, arrays in cluster_averages(states, sizes, labels, self.setup.aggregation).items():  # ... experts
            self.set_model(k, arrays, arch[k])
        if self.config.clustering != "loss":  # an expert no client holds any more is dropped
            held = {int(k) for k in self.assignment if k >= 0}
            self.models = {k: m for k, m in self.models.items() if k in held}
        measures = {"num_clusters": float(len(set(labels.values())))}
        measures.update(self.distill(rnd, replies, labels, states, sizes))  # step 3
        return measures

    def messages(self, rnd: int, clients: list[int]) -> dict[int, Message]:
        """u_a for each client's architecture a (loss: with a's experts; projection: the sketch seed)."""
        packages = {}
        for a in {self.setup.client_archs[c] for c in clients}:
            models = [shared_arrays(self.universal[a])]
            if self.config.clustering == "loss":
                models += [shared_arrays(self.models[k]) for k in self.experts_of(a)]
            packages[a] = pack_models(models)
        scalars = {"projection_seed": int(self.setup.rng("sketch", rnd).integers(2**31))} \
            if self.config.projection_dim else {}
        return {c: Message(dict(packages[self.setup.client_archs[c]]), dict(scalars)) for c in clients}

    def cluster(self, rnd: int, replies: dict[int, Message]) -> dict[int, int]:
        """Each upload's cluster id, per architecture; ids carried across rounds by member overlap."""
        labels: dict[int, int] = {}
        for a in self.archs:
            ids = [c for c in sorted(replies) if self.setup.client_archs[c] == a]
            if not ids:
                continue
            if self.config.clustering == "loss":
                experts = self.experts_of(a)
                labels.update({c: experts[checked_choice(c, replies[c], len(experts))] for c in ids})
                continue
            local = self.partition(rnd, a, ids, replies)
            mapping = match_clusters(self.assignment[ids], local)
            for j in sorted(set(local.tolist()) - set(mapping)):
                mapping[j] = self.next_id
                self.next_id += 1
            labels.update({c: mapping[int(j)] for c, j in zip(ids, local)})
        self.assignment[list(labels)] = list(labels.values())
        return labels

    def partition(self, rnd: int, arch: str, ids: list[int], replies: dict[int, Message]) -> np.ndarray:
        """Cluster labels 0..K-1 of one architecture's uploads (cosine or k-means)."""
        c = self.config
        if c.projection_dim:  # only the clients' sketches of their updates
            points = np.stack([replies[i].arrays["sketch"].astype(np.float64) for i in ids])
        else:
            start = flat_weights(shared_arrays(self.universal[arch]))
            points = np.stack([flat_weights(model_arrays(replies[i])) - start for i in ids])
        if c.clustering == "cosine":
            dist = 1.0 - cosine_similarity(points)
            if c.num_clusters is not None:
                return agglomerative(dist, c.linkage, num_clusters=min(c.num_clusters, len(ids)))
            if c.similarity_threshold is not None:
                return agglomerative(dist, c.linkage, threshold=1.0 - c.similarity_threshold)

            def split(k: int) -> np.ndarray:
                return agglomerative(dist, c.linkage, num_clusters=k)
        else:  # kmeans on the weights: every upload started from u_a, so distances between updates
            rng = self.setup.rng("kmeans", rnd, arch)
            if c.num_clusters is not None:
                return kmeans(points, c.num_clusters, rng, restarts=c.kmeans_restarts)[0]
            dist = weight_distance_matrix(points)

            def split(k: int) -> np.ndarray:
                return kmeans(points, k, rng, restarts=c.kmeans_restarts)[0]
        return best_by_silhouette(dist, split, c.max_clusters, c.min_silhouette).labels

    def teacher(self, experts: list[int], counts: np.ndarray, source: LabelledGenerator | None = None
                ) -> torch.nn.Module:
        """The round's experts weighted by ``expert_weights``: per class by its cluster's share, for the
        class a sample was generated for (``sample_label``, labels from ``source``) or for each logit
        column (``class``); the plain mean; or by cluster size."""
        mode, sizes = self.config.expert_weights, counts.sum(1)
        models = [copy.deepcopy(self.models[k]).eval().requires_grad_(False) for k in experts]
        if mode == "sample_label":
            return SampleLabelEnsemble(models, class_shares(counts), source).eval()
        weights = {"class": class_shares(counts), "samples": sizes / sizes.sum(), "uniform": None}[mode]
        return LogitEnsemble(models, weights).eval()

    def distill(self, rnd: int, replies: dict[int, Message], labels: dict[int, int],
                states: dict[int, dict[str, np.ndarray]], sizes: dict[int, float]) -> dict[str, float]:
        """Step 3: every architecture's universal expert from the round's experts."""
        c, archs = self.config, self.setup.client_archs
        experts = sorted(set(labels.values()))
        counts = np.stack([sum(replies[i].arrays["class_counts"].astype(np.float64) for i in labels if labels[i] == k)
                           for k in experts])
        source = LabelledGenerator(self.generator) if c.distill_data == "generator" else None
        teacher = self.teacher(experts, counts, source)
        self.round_teacher = teacher if isinstance(teacher, LogitEnsemble) else None  # sample_label: needs labels
        losses: dict[str, list[float]] = {"generator_loss": [], "kd_loss": []}
        for a in self.archs:
            mine = [i for i in sorted(replies) if archs[i] == a]
            if c.student_init == "average" and mine:
                arrays_to_state(self.universal[a], weighted_average([states[i] for i in mine], [sizes[i] for i in mine]))
            if not c.distill_steps:
                continue
            stream = self.setup.generator("distill", rnd, a)
            student_optim = OptimOptions(lr=c.distill_lr, optimizer="sgd")
            with self.setup.clock.phase("distill"):
                if c.distill_data == "public":
                    losses["kd_loss"].append(self.distill_public(self.universal[a], teacher, stream, student_optim))
                    continue
                result = adversarial_distillation(
                    source, teacher, self.universal[a], steps=c.distill_steps,
                    generator_repeats=c.generator_steps, student_repeats=c.student_steps, batch_size=c.batch_size,
                    generator_optim=OptimOptions(lr=c.generator_lr), student_optim=student_optim, stream=stream,
                    adversarial_weight=c.adversarial_weight, kind="kl", ce_weight=c.ce_weight,
                    diversity_weight=c.diversity_weight, label_probs=counts.sum(0), loss="kl",
                    temperature=c.temperature)
            losses["generator_loss"].append(float(result["generator"]))
            losses["kd_loss"].append(float(result["student"]))
        return {name: float(np.mean(v)) for name, v in losses.items() if v}

    def distill_public(self, student: torch.nn.Module, teacher: LogitEnsemble, stream: torch.Generator,
                       optim: OptimOptions) -> float:
        """KL(T(x) ‖ u_a(x)) on batches of the public inputs (as many updates as the generator path)."""
        c, x = self.config, torch.tensor(self.setup.public_inputs)  # a copy: the inputs are read-only
        with torch.no_grad():
            targets = teacher(x)
        return float(distill_on_inputs(student, x, targets, steps=c.distill_steps * c.student_steps,
                                       batch_size=c.batch_size, optim=optim, stream=stream,
                                       temperature=c.temperature)["loss"])

    def state_dict(self) -> dict[str, Any]:
        """The default, less the round's teacher (a diagnostic, set again by every round)."""
        return {k: v for k, v in super().state_dict().items() if k != "round_teacher"}

    def extra_models(self) -> dict[str, dict[int, torch.nn.Module]]:
        archs = self.setup.client_archs
        return {"global": {i: self.universal[archs[i]] for i in range(self.setup.num_clients)},
                **super().extra_models()}

    def test_models(self) -> dict[str, torch.nn.Module]:
        if len(self.archs) == 1:
            universal = {"global": self.universal[self.archs[0]]}
        else:
            universal = {f"global_{re.sub(r'[^0-9A-Za-z]', '_', a)}": self.universal[a] for a in self.archs}
        teacher = {"teacher": self.round_teacher} if self.round_teacher is not None else {}
        return {**universal, **teacher, **super().test_models()}

    def visuals(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        return class_samples(self.generator, self.setup) if self.config.distill_data == "generator" else {}


class DisUEClient(Client):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        """Local training from u_a; ``loss``: first the lowest-loss expert; projection: the sketch."""
        start, *experts = unpack_models(message.arrays)
        choice = lowest_loss(experts, ctx, self.config.selection_samples) if experts else None
        load_shared(ctx.model, start)
        train_locally(ctx)
        weights = shared_arrays(ctx.model)
        reply = Message(dict(weights), {"num_examples": len(ctx.train)})
        reply.arrays["class_counts"] = ctx.label_counts()
        if choice is not None:
            reply.scalars["cluster"] = choice
        if "projection_seed" in message.scalars:
            update = flat_weights(weights) - flat_weights(start)
            reply.arrays["sketch"] = count_sketch(update, self.config.projection_dim, int(message.scalars["projection_seed"]))
        return reply


def check_disue(config: DisUEConfig, run: Any) -> None:
    """The bad inputs the options cannot catch alone, before any training."""
    check_num_clusters(config.num_clusters, run.num_clients)
    if config.clustering == "loss" and config.num_clusters is None:
        raise FieldError("num_clusters", None, "clustering 'loss' chooses among K fixed experts: give K >= 1")
    if config.similarity_threshold is not None and (config.clustering != "cosine" or config.num_clusters is not None):
        raise FieldError("similarity_threshold", config.similarity_threshold,
                         "cuts the cosine clustering instead of a fixed K: clustering 'cosine' and no num_clusters")
    if config.projection_dim is not None and config.clustering == "loss":
        raise FieldError("projection_dim", config.projection_dim, "sketches updates for cosine or kmeans clustering, "
                                                                  "not for 'loss'")
    if config.distill_data == "public" and config.expert_weights == "sample_label":
        raise FieldError("expert_weights", "sample_label", "weights experts by the class a sample was generated "
                                                          "for: public inputs have none (use class, uniform or samples)")
    if config.distill_data == "public" and len(run.data.public) == 0:
        raise FieldError("distill_data", "public", "needs a public set (data.public_fraction > 0)")
    if config.distill_data == "generator":
        check_generator(config, run, conditional=True)


TRAIN = StageSchema(
    down=Schema(prefix_arrays=weight_fields(), scalars={"projection_seed": int},  # w.<name> or w.<j>/<name>
                optional=frozenset({"projection_seed"})),
    up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int, "cluster": int},
              arrays={"class_counts": ArrayField(dtype="int64", shape=("num_classes",)),
                      "sketch": ArrayField(dtype="float32", shape=(None,))},
              optional=frozenset({"cluster", "sketch"})),
)

SPEC = AlgorithmSpec(
    name="disue",
    config_cls=DisUEConfig,
    server_cls=DisUEServer,
    client_cls=DisUEClient,
    schemas={"train": TRAIN},
    summary="DisUE as described: clients train from a universal expert; the server clusters their updates, "
    "averages each cluster into an expert and distills the experts (weighted per class) data-free into one "
    "universal expert per architecture.",
    stateful_clients=False,
    check_run=check_disue,
)
