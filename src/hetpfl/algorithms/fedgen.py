"""FedGen (Zhu, Hong & Zhou, ICML 2021): FedAvg whose clients learn, in addition, from a server-side
conditional generator of *features* that carries the ensemble's knowledge of the label space.

Client k's model is f_k = h_k ∘ φ_k (body φ, linear head h; one architecture for all, FedAvg).
With p̂(c) ∝ Σ_k n_k^c the label distribution of the counts the clients uploaded so far:

  SERVER  sends the FedAvg weights W^t, and (t ≥ 1) the generator G and p̂;
  CLIENT  loads W^t and trains (the shared routine), minimizing per batch (x, y) of its data
              CE(f(x), y)
            + β_t KL(σ(h(G(z, y))) ‖ σ(f(x)))                     (the code's latent term; target fixed)
            + α_t (B̂ / B) CE(h(G(ẑ, ŷ)), ŷ),   ŷ ~ p̂, B̂ pairs     (the paper's inductive bias)
          with α_t = max(1e-4, α γ^t), β_t likewise (γ = 0.98), G frozen, z ~ N(0, I);
          uploads W_k, n_k and its class counts n_k^c;
  SERVER  with the round's uploads: G ← generator_steps Adam steps (lr γ^t · lr_0) on batches
          ŷ ~ Σ_k n_k^c, x̂ = G(z, ŷ) of
              α_s CE(T(x̂), ŷ) − β_s KL(σ(T(x̂)) ‖ σ(h(x̂))) + η L_div,   T = Σ_k τ_k ⊙ h_k,
              τ_{k,c} = n_k^c / Σ_j n_j^c (the heads' label-count-weighted ensemble),
          h the global head, L_div FedGen's diversity loss (:func:`~hetpfl.learn.noise_diversity`);
          then W^{t+1} = Σ n_k W_k / Σ n_k (FedAvg).

Knowledge stays at the head, as in the official code (``zhuangdizhu/FedGen``, ``latent_layer_idx =
-1``): the generator makes the head's input, a vector of ``feature_dim`` values (an ``mlp_generator``
built for shape ``(feature_dim,)`` with a linear output), and the server uses only the uploaded
heads. **Traffic:** the generator (its weights and BatchNorm statistics, float32) and p̂ travel down
to every sampled client in every round from the second on (``train`` stage, in ``bytes_down``: 170 kB
with the defaults on cnn_small's 128 features, 60 % of cnn_small's 287 kB on MNIST); only the class
counts are added up. Both the counts and the generator are a privacy cost the method accepts.

Choices (the official code's values where it has them; config keys in brackets):

* Client weights α = β = 10 and γ = 0.98 (the code's MNIST ``generative_alpha/beta`` and
  ``exp_lr_scheduler``; floor 1e-4 as in the code, but a weight of 0 stays 0 so that
  ``generated_weight = latent_weight = 0`` is FedAvg exactly) [generated_weight, latent_weight,
  anneal]; B̂ = 32 [generated_batch_size]. The paper's objective has only the α term: ``latent_weight
  = 0``. The code's ``early_stop`` (no regularization after 20 local epochs) is not kept.
* Labels ŷ of the clients' term ~ p̂ (the paper; the code draws uniformly over the labels); the
  server's ŷ ~ the round's pooled counts (the code: uniformly over labels some client holds).
* The teacher averages the heads' logits with class-level label-count weights (the shared
  ``LogitEnsemble``; the paper: the plain average of logits; the code: a label-count-weighted sum
  of each head's CE). α_s = 1, β_s = 0, η = 1 [teacher_weight, adversarial_weight,
  diversity_weight]; the code's MNIST Adam lr 3e-4, weight decay 1e-2, decay 0.98 per round
  [generator_lr, generator_weight_decay, generator_lr_decay]; 50 steps of 32 [generator_steps,
  generator_batch_size]; the generator trains before the aggregation, as in the code. Adam's moments
  restart every round (the code keeps one optimizer).
* Generator: ``mlp_generator``, two hidden layers of 4·width (the code: one of 256), a learned label
  embedding concatenated to z ~ N(0, I) (the code: U(0, 1) noise) [generator_arch, latent_dim = 32,
  generator_width = 32]. It is kept as arrays (it is not of the dataset's input shape, which the
  server's module factory builds) and rebuilt each round from them.

Reported as FedAvg: the global model (``global``, ``global_test_acc``) and each client's own copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import FieldError, Validated, option, require
from ..learn import LogitEnsemble, OptimOptions, arrays_to_state, kl_to_targets, state_to_arrays, train_generator_against
from ..messages import ArrayField, Message, Schema, StageSchema
from ..models import ModuleSpec, build_model, build_module
from ..rng import derive_seed
from .base import AlgorithmSpec, ClientContext, Comm, ServerSetup, train_locally, weight_fields
from .datafree import GENERATORS, class_shares
from .fedavg import FedAvgClient, FedAvgServer
from .weights import shared_arrays

GEN = "gen."  # prefix of the generator's arrays in the down message


@dataclass
class FedGenConfig(Validated):
    generator_arch: str = option("mlp_generator", choices=GENERATORS)
    latent_dim: int = option(32, ge=1)
    generator_width: int = option(32, ge=1)  # ngf: hidden layers of 4 * width
    generator_steps: int = option(50, ge=0)
    generator_batch_size: int = option(32, ge=1)
    generator_lr: float = option(3e-4, gt=0)
    generator_lr_decay: float = option(0.98, gt=0, le=1)
    generator_weight_decay: float = option(1e-2, ge=0)
    teacher_weight: float = option(1.0, ge=0)  # α_s: CE of the heads' ensemble on (G(z, y), y)
    adversarial_weight: float = option(0.0, ge=0)  # β_s: − KL(ensemble ‖ global head)
    diversity_weight: float = option(1.0, ge=0)  # η
    generated_weight: float = option(10.0, ge=0)  # α: clients' CE on generated features
    latent_weight: float = option(10.0, ge=0)  # β: clients' KL to their head on G(z, y)
    anneal: float = option(0.98, gt=0, le=1)  # γ: α_t = α γ^t, β_t = β γ^t
    generated_batch_size: int = option(32, ge=1)  # B̂

    def __post_init__(self) -> None:
        super().__post_init__()
        terms = self.teacher_weight + self.adversarial_weight + self.diversity_weight
        require(self.generator_steps == 0 or terms > 0, "generator_steps", self.generator_steps,
                "training the generator needs a positive teacher_weight, adversarial_weight or diversity_weight")


def feature_generator(config: FedGenConfig, feature_dim: int, num_classes: int, seed: int | None = None) -> nn.Module:
    """The conditional generator of ``(feature_dim,)`` features, linear output; built without
    touching the global torch RNG (weights from ``seed``, or to be overwritten)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return build_model(config.generator_arch, (int(feature_dim),), num_classes, input_kind="vector",
                           latent_dim=config.latent_dim, ngf=config.generator_width, conditional=True,
                           low=None, high=None)


def annealed(weight: float, decay: float, rnd: int) -> float:
    """The code's ``max(1e-4, w · γ^t)``; 0 stays 0."""
    return max(1e-4, weight * decay**rnd) if weight > 0 else 0.0


class FedGenServer(FedAvgServer):
    """FedAvg's server plus the feature generator, trained on the uploaded heads."""

    def __init__(self, config: FedGenConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.feature_dim = int(self.global_model.feature_dim)
        seed = derive_seed(setup.seed, "init", "server", "generator")
        self.generator = state_to_arrays(feature_generator(config, self.feature_dim, setup.num_classes, seed))
        self.generator_rounds = 0  # rounds in which the generator was (re)trained
        self.label_counts = np.zeros((setup.num_clients, setup.num_classes), dtype=np.int64)  # latest upload

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        down = shared_arrays(self.global_model)
        if self.generator_rounds:
            down.update({GEN + k: v for k, v in self.generator.items()})
            total = self.label_counts.sum(0).astype(np.float64)
            down["label_probs"] = (total / total.sum()).astype(np.float32)
        replies = comm.ask("train", {c: Message(dict(down)) for c in clients})
        if not replies:
            return {}
        for c, reply in replies.items():
            self.label_counts[c] = reply.arrays["label_counts"]
        measures = self.train_generator(rnd, replies)
        self.aggregate({c: Message({k: v for k, v in r.arrays.items() if k[:2] in ("w.", "b.")}, dict(r.scalars))
                        for c, r in replies.items()})
        return measures

    def train_generator(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        c = self.config
        self.generator_rounds += 1
        if c.generator_steps == 0:
            return {}
        counts = np.stack([replies[k].arrays["label_counts"] for k in replies]).astype(np.float64)
        teacher = LogitEnsemble([self.head(replies[k].arrays) for k in replies], class_shares(counts))
        generator = feature_generator(c, self.feature_dim, self.setup.num_classes)
        arrays_to_state(generator, self.generator)
        with self.setup.clock.phase("generator"):
            out = train_generator_against(
                generator, teacher, self.global_model.head, steps=c.generator_steps, batch_size=c.generator_batch_size,
                optim=OptimOptions(lr=c.generator_lr * c.generator_lr_decay**rnd, weight_decay=c.generator_weight_decay),
                stream=self.setup.generator("round", rnd, "generator"), adversarial_weight=c.adversarial_weight,
                ce_weight=c.teacher_weight, diversity_weight=c.diversity_weight, label_probs=counts.sum(0))
        self.generator = state_to_arrays(generator)
        return {"generator_loss": out["loss"]}

    def head(self, arrays: dict[str, np.ndarray]) -> nn.Linear:
        """A client's uploaded head (the only part of its model the generator step uses)."""
        head = nn.Linear(self.feature_dim, self.setup.num_classes)
        head.load_state_dict({"weight": torch.tensor(np.array(arrays["w.head.weight"])),
                              "bias": torch.tensor(np.array(arrays["w.head.bias"]))})
        return head


class FedGenClient(FedAvgClient):
    """FedAvg's client; with a generator in the message, its local loss gains FedGen's terms."""

    def train(self, message: Message, ctx: ClientContext) -> Message:
        reply = super().train(message, ctx)
        reply.arrays["label_counts"] = ctx.label_counts()
        return reply

    def local_update(self, message: Message, ctx: ClientContext) -> None:
        c = self.config
        alpha, beta = annealed(c.generated_weight, c.anneal, ctx.round), annealed(c.latent_weight, c.anneal, ctx.round)
        arrays = {k[len(GEN):]: v for k, v in message.arrays.items() if k.startswith(GEN)}
        if not arrays or not (alpha or beta):
            train_locally(ctx)  # exactly FedAvg's step
            return
        head = ctx.model.head
        device = head.weight.device
        generator = feature_generator(c, ctx.model.feature_dim, ctx.num_classes).to(device)
        arrays_to_state(generator, arrays)
        generator.eval()
        stream = ctx.generator("generated")
        probs = torch.tensor(np.array(message.arrays["label_probs"]), dtype=torch.float32)
        ratio = c.generated_batch_size / ctx.training.batch_size

        def features(y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return generator(generator.draw_latent(len(y), stream), y.to(device))

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(logits, labels)
            if beta:
                target = F.softmax(head(features(labels)), dim=-1).detach()
                loss = loss + beta * kl_to_targets(logits, target).mean()
            return loss

        def penalty() -> torch.Tensor:
            y = torch.multinomial(probs, c.generated_batch_size, replacement=True, generator=stream).to(device)
            return alpha * ratio * F.cross_entropy(head(features(y)), y)

        train_locally(ctx, loss_fn=loss_fn, penalty=penalty if alpha else None)


def check_fedgen(config: FedGenConfig, run: Any) -> None:
    """The generator must make vectors of the clients' feature width."""
    data = run.data
    with torch.random.fork_rng(devices=[]):
        model = build_module(ModuleSpec.parse(run.client_archs[0]), data.input_shape, data.num_classes, data.input_kind)
    try:
        feature_generator(config, model.feature_dim, data.num_classes)
    except ValueError as exc:
        raise FieldError("algorithm.generator_arch", config.generator_arch,
                         f"FedGen generates the head's input, vectors of {model.feature_dim} features: {exc}") from None


TRAIN = StageSchema(
    down=Schema(prefix_arrays={**weight_fields(), GEN + "w.": ArrayField(dtype="float32", shape=None),
                               GEN + "b.": ArrayField(dtype="int64", shape=None)},
                arrays={"label_probs": ArrayField(dtype="float32", shape=("num_classes",), probabilities=True)},
                optional=frozenset({"label_probs"})),
    up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int},
              arrays={"label_counts": ArrayField(dtype="int64", shape=("num_classes",), private="class_counts")}),
)

SPEC = AlgorithmSpec(
    name="fedgen",
    config_cls=FedGenConfig,
    server_cls=FedGenServer,
    client_cls=FedGenClient,
    schemas={"train": TRAIN},
    summary="FedAvg with a server-side conditional generator of head features, learned from the clients' heads "
    "and sent to the clients as an inductive bias.",
    homogeneous_only=True,
    stateful_clients=False,
    check_run=check_fedgen,
)
