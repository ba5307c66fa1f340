"""FedFTG (Zhang et al., CVPR 2022, "Fine-tuning Global Model via Data-Free Knowledge Distillation for
Non-IID Federated Learning"): FedAvg, then the server fine-tunes the aggregate on hard samples of a
conditional generator, distilling the ensemble of the round's client models into it.

Every round t:
  SERVER  sends w^t to the sampled clients S_t;
  CLIENT  k trains from w^t (the shared routine) and uploads w_k, n_k and its class counts n_k^c;
  SERVER  w ← Σ_k n_k w_k / Σ_k n_k                                                    (FedAvg)
          p(y) ∝ Σ_k n_k^y                                       (customized label sampling)
          α_k^y = n_k^y / Σ_j n_j^y;  D̃(x | y) = Σ_k α_k^y f_k(x)              (class-level ensemble)
          for i = 1..``steps`` (I):
            z ~ N(0, I), y ~ p(y), x = G(z, y)
            ``generator_steps`` (I_g) times, on that (z, y):
              min_G  ce_weight · CE(D̃(x), y)                                          (fidelity)
                     − adversarial_weight · KL(D̃(x) ‖ f_w(x))          (hard samples: disagreement)
                     + diversity_weight · exp(−mean_ij ‖z_i − z_j‖² · |x_i − x_j|)       (diversity)
            ``student_steps`` (I_d) times, each on fresh (z, y):  min_w KL(D̃(x) ‖ f_w(x))
  the fine-tuned w is w^{t+1}, sent next round.
The generator G persists across rounds. Reported: w as ``global`` (every client's test split) and
``global_test_acc``; each client's own model is its locally trained copy (as FedAvg's).

Defaults: I = 10, I_g = 1, I_d = 5, loss weights 1, Adam for G; the generator's lr (1e-2) and the
global model's fine-tuning optimizer (plain SGD at 0.01, the paper's client optimizer) as recorded from
the paper by a reimplementation (there is no official code); latent size and width are CPU-sized
(paper: z of 100). ``finetune_optimizer: client`` fine-tunes with the clients' options instead: with
our default clients (Adam 3e-3) that wrecked the aggregate on MNIST α 0.1 (global test accuracy 55.5 %
after 20 rounds against FedAvg's 89.6 %), because the samples of a generator trained 10 steps a round
are far from the data and Adam's steps are large.
Choices, each a config key where it matters:
- ``ensemble_weights``: ``sample_label`` (the paper: a sample generated for label y takes its teacher
  from the clients by their share α_k^y of class y, all logits alike), ``logit_class`` (column c of the
  ensemble's logits is Σ_k α_k^c f_k(x)_c: ``LogitEnsemble``'s class weights) or ``uniform`` (the mean).
  A class of no client that round has α_k = 1/|S_t| (it is never sampled). At small α the paper's
  teacher is the specialists' guesses on every class but y, and distilling it wrecks a good global
  model: MNIST α 0.1, global test accuracy 49.5 % with ``sample_label``, 86.4 % ``logit_class``,
  88.0 % ``uniform``, FedAvg 89.6 % (docs/results.md).
- KL at ``temperature`` 1 (T² · KL(σ(D̃/T) ‖ σ(f/T))), over the whole batch, no mask.
- student steps draw fresh samples each (the shared loop); the generator steps reuse the iteration's (z, y).
- optimizers (Adam for G, the student's) restart each round; the global model trains in train mode.
- class counts travel every round (80 bytes for 10 classes): the round's data may differ under drift.
- ``steps: 0`` turns the fine-tuning off: exactly FedAvg's accuracies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..configuration import option
from ..learn import LogitEnsemble, OptimOptions, adversarial_distillation
from ..messages import ArrayField, Message, Schema, StageSchema
from .base import AlgorithmSpec, ClientContext, Comm, ServerSetup, weight_fields
from .datafree import (AdversarialDistillationConfig, check_generator, class_samples, class_shares, frozen_copies,
                       generator_module)
from .fedavg import FedAvgClient, FedAvgServer
from .weights import shared_arrays

ENSEMBLE_WEIGHTS = ("sample_label", "logit_class", "uniform")
FINETUNE_OPTIMIZERS = ("sgd", "client")


@dataclass
class FedFTGConfig(AdversarialDistillationConfig):  # + generator_steps (I_g), student_steps (I_d), batch, weights
    steps: int = option(10, ge=0)  # I: fine-tuning iterations per round (0: FedAvg)
    finetune_optimizer: str = option("sgd", choices=FINETUNE_OPTIMIZERS)  # sgd (paper) or the clients' options
    finetune_lr: float | None = option(0.01, gt=0)  # the paper's 0.01 with SGD; None: the clients' lr
    ensemble_weights: str = option("sample_label", choices=ENSEMBLE_WEIGHTS)


class LabelledGenerator(nn.Module):
    """A conditional generator that remembers the labels of its last call, for a teacher that weights
    each sample by its label (the shared generator loops pass teachers the inputs only)."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.conditional, self.num_classes = True, generator.num_classes
        self.labels: torch.Tensor | None = None

    def draw_latent(self, n: int, stream: torch.Generator | None) -> torch.Tensor:
        return self.generator.draw_latent(n, stream)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.labels = y
        return self.generator(z, y)


class SampleLabelEnsemble(nn.Module):
    """D̃(x_i | y_i) = Σ_k α[k, y_i] f_k(x_i), y_i the label ``source`` last generated x_i for."""

    def __init__(self, models: list[nn.Module], shares: np.ndarray, source: LabelledGenerator) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)
        self.register_buffer("shares", torch.as_tensor(shares))
        self._source = (source,)  # not a submodule: the generator trains while the teacher is in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._source[0].labels
        if y is None or len(y) != len(x):
            raise RuntimeError("SampleLabelEnsemble reads inputs only right after the generator made them")
        w = self.shares[:, y.to(self.shares.device)]  # (M, B)
        return sum(w[k][:, None] * member(x) for k, member in enumerate(self.members))


def class_level_teacher(models: list[nn.Module], counts: np.ndarray, mode: str,
                        source: LabelledGenerator) -> nn.Module:
    """The round's ensemble teacher under ``ensemble_weights`` = ``mode``."""
    if mode == "sample_label":
        return SampleLabelEnsemble(models, class_shares(counts), source).eval()
    return LogitEnsemble(models, class_shares(counts) if mode == "logit_class" else None).eval()


class FedFTGServer(FedAvgServer):
    def __init__(self, config: FedFTGConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        spec = generator_module(config, setup, conditional=True)
        self.generator = setup.build_model(spec.arch, "generator", **spec.kwargs)

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        weights = shared_arrays(self.global_model)
        replies = comm.ask("train", {c: Message(dict(weights)) for c in clients})
        if not replies:
            return {}
        self.aggregate(replies)  # FedAvg
        return self.fine_tune(rnd, replies) if self.config.steps else {}

    def fine_tune(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        """The server's data-free fine-tuning of the aggregate (the module docstring's loop)."""
        c, order = self.config, sorted(replies)
        counts = np.stack([replies[k].arrays["class_counts"] for k in order]).astype(np.float64)
        models = frozen_copies(self.global_model, [dict(replies[k].arrays) for k in order])
        source = LabelledGenerator(self.generator)
        teacher = class_level_teacher(models, counts, c.ensemble_weights, source)
        student_optim = (OptimOptions(lr=c.finetune_lr or self.setup.training.lr, optimizer="sgd")
                         if c.finetune_optimizer == "sgd" else self.setup.training.optim(c.finetune_lr))
        with self.setup.clock.phase("distill"):  # generator and student steps alternate: one phase
            result = adversarial_distillation(
                source, teacher, self.global_model, steps=c.steps, generator_repeats=c.generator_steps,
                student_repeats=c.student_steps, batch_size=c.batch_size,
                generator_optim=OptimOptions(lr=c.generator_lr), student_optim=student_optim,
                stream=self.setup.generator("fedftg", rnd), adversarial_weight=c.adversarial_weight, kind="kl",
                ce_weight=c.ce_weight, diversity_weight=c.diversity_weight, label_probs=counts.sum(0),
                loss="kl", temperature=c.temperature)
        return {"generator_loss": float(result["generator"]), "kd_loss": float(result["student"])}

    def visuals(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        return class_samples(self.generator, self.setup)


class FedFTGClient(FedAvgClient):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        """FedAvg's local step; the reply adds the client's class counts."""
        reply = super().train(message, ctx)
        reply.arrays["class_counts"] = ctx.label_counts()
        return reply


def check_fedftg(config: FedFTGConfig, run: Any) -> None:
    check_generator(config, run, conditional=True)


TRAIN = StageSchema(
    down=Schema(prefix_arrays=weight_fields()),
    up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int},
              arrays={"class_counts": ArrayField(dtype="int64", shape=("num_classes",), private="class_counts")}),
)

SPEC = AlgorithmSpec(
    name="fedftg",
    config_cls=FedFTGConfig,
    server_cls=FedFTGServer,
    client_cls=FedFTGClient,
    schemas={"train": TRAIN},
    summary="FedAvg, then the server fine-tunes the global model data-free: a conditional generator mines "
    "samples where it disagrees with the class-weighted ensemble of the round's client models, then KD "
    "(homogeneous architectures only).",
    homogeneous_only=True,
    stateful_clients=False,
    check_run=check_fedftg,
)
