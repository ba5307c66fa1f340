"""DFRD (Luo et al., NeurIPS 2023, arXiv 2309.13546): FedRolex sub-models, then data-free robust
distillation of the round's client models into the global model on the server.

Clients hold width sub-models of one global model (``models.clients: [cnn_small, cnn_small@0.5,
cnn_small@0.25]``). Every round t, with S_t the sampled clients and n_k^c client k's count of class c:

  SERVER  sends client k its sub-model W^t[S_k^t] (a rolling window: :mod:`.fedrolex`);
  CLIENT  trains it (the shared routine, HeteroFL's scaler), uploads W_k, n_k and n_k^c (new here);
  SERVER  W ← entry-wise Σ n_k W_k / Σ n_k (:func:`.submodels.average_submodels`);
          teacher T(x) = Σ_{k∈S_t} τ_k ⊙ f_k(x),  τ_{k,c} = n_k^c / Σ_{j∈S_t} n_j^c     (dynamic weighting)
          label sampling: y ~ p_t(c) ∝ Σ_{k∈S_t} n_k^c
          repeat I times (server_iterations):
            G: generator_steps Adam steps on batches (z ~ N(0, I), y ~ p_t), x = G(z, y), of
               L_gen = L_fid + β_tran L_tran + β_div L_div,
               L_fid = CE(T(x), y)                                          (fidelity)
               L_tran = −mean_x ε(x) KL(σ(T(x)) ‖ σ(W(x))),  ε = [argmax T ≠ argmax W]   (transferability)
               L_div = exp(−mean_{i,j} d(z_i, z_j) d(x_i, x_j))   (diversity: learn.noise_diversity)
            G̃ ← λ G̃ + (1 − λ) G                                            (EMA copy)
            W: distill_steps Adam steps of (1 − μ) KL(T ‖ W) on B samples of G + μ KL(T ‖ W) on B of G̃
  where f_k is client k's uploaded sub-model run with its scaler, σ the softmax at ``temperature``.

What we could read of the paper is its abstract and introduction (the store holds no more of the
ar5iv text, and the authors' code, anonymous.4open.science/r/DFRD-0C83, is not in it). The terms
above are the ones the abstract names (conditional generator; fidelity, transferability, diversity;
EMA copy; dynamic weighting; label sampling), in the forms the shared machinery gives them
(:func:`~hetpfl.learn.train_generator_against`, :func:`~hetpfl.learn.distill_on_generated`,
:class:`~hetpfl.learn.LogitEnsemble`). Every choice below is ours, each a config key where it can be:

* Sub-models: FedRolex's rolling window (``window: rolling``; ``leading`` is HeteroFL's). Third-party
  summaries of DFRD name FedRolex; Mosaic, which inherits DFRD's protocol, uses FedRolex too.
  Sample-count weights, BatchNorm statistics averaged per entry, scaler on: HeteroFL's choices.
* Dynamic weighting is class-level on logits (the weight of client k's logit for class c is its
  share of class c in the round; a class nobody holds: uniform), the shared ``LogitEnsemble``'s form.
  A per-sample form (client k's whole output weighed by τ_{k,y} for a sample of label y, as FedGen's
  code does) needs the labels inside the teacher, which the shared generator step does not pass.
  ``dynamic_weighting: false``: the plain mean. ``label_sampling: false``: uniform labels.
* The transferability indicator ε keeps the samples on which teacher and global model disagree
  (``only_disagreeing``; read from DFRD's follow-up DFDG, see :func:`~hetpfl.learn.disagreement`).
* Weights β_tran = β_div = 1 with L_fid at 1 (``fidelity_weight``, ``transfer_weight``,
  ``diversity_weight``); λ = 0.5 (``ema_decay``); μ = 0.5 (``ema_weight``, the EMA generator's share of
  the distillation loss); T = 1. The EMA averages parameters and copies BatchNorm statistics
  (:func:`~hetpfl.learn.ema_update`); G̃ starts as a copy of the untrained G.
* Schedule: one iteration per round (I = 1: the EMA spans rounds, as the abstract says it must), 20
  generator and 20 distillation steps of 64 samples, Adam 1e-3 (CPU-sized; fresh optimizers each
  call). The global model learns in train mode (``student_eval`` freezes its BatchNorm).
* The generator: ``dcgan_generator`` for images (``mlp_generator`` otherwise), conditional, outputs in
  the dataset's value range, latent 32, width 16.

With ``generator_steps = distill_steps = 0`` the server does nothing more than FedRolex (HeteroFL with
``window: leading``), so the accuracy fields are theirs. Reported: the global model (``global`` on
every client's split, ``global_test_acc``), each client's own sub-model; server measures
``generator_loss``/``distill_loss``; phases ``generator`` and ``distillation`` in ``timings.jsonl``.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..configuration import option, require
from ..learn import (
    LogitEnsemble,
    OptimOptions,
    arrays_to_state,
    distill_on_generated,
    distillation_kl,
    ema_update,
    state_to_arrays,
    train_generator_against,
)
from ..messages import ArrayField, Message, Schema, StageSchema
from ..models import WIDTH_MODES
from .base import AlgorithmSpec, ClientContext, Comm, ServerSetup, weight_fields
from .datafree import GENERATORS, check_generator, class_shares, generator_module
from .heterofl import HeteroFLClient, HeteroFLConfig, HeteroFLServer
from .submodels import check_width_clients, client_width, scaled_hidden_outputs, submodel_arrays



@dataclass
class DFRDConfig(HeteroFLConfig):
    """DFRD's server-side distillation on top of HeteroFL/FedRolex (``scaler`` is HeteroFL's)."""

    window: str = option("rolling", choices=WIDTH_MODES)  # rolling: FedRolex; leading: HeteroFL
    generator_arch: str | None = option(None, choices=GENERATORS)  # None: dcgan for images, else mlp
    latent_dim: int = option(32, ge=1)
    generator_width: int = option(16, ge=1)  # ngf
    server_iterations: int = option(1, ge=1)  # I: (generator, EMA, distillation) per round
    generator_steps: int = option(20, ge=0)
    distill_steps: int = option(20, ge=0)
    batch_size: int = option(64, ge=1)  # per generator step, and per generator per distillation step
    generator_lr: float = option(1e-3, gt=0)
    distill_lr: float = option(1e-3, gt=0)
    fidelity_weight: float = option(1.0, ge=0)
    transfer_weight: float = option(1.0, ge=0)  # β_tran
    diversity_weight: float = option(1.0, ge=0)  # β_div
    only_disagreeing: bool = True  # ε: the transferability term on samples where T and W disagree
    ema_decay: float = option(0.5, ge=0, le=1)  # λ
    ema_weight: float = option(0.5, ge=0, le=1)  # μ: share of the EMA generator's samples in the KD loss
    temperature: float = option(1.0, gt=0)
    dynamic_weighting: bool = True
    label_sampling: bool = True
    student_eval: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        terms = self.fidelity_weight + self.transfer_weight + self.diversity_weight
        require(self.generator_steps == 0 or terms > 0, "generator_steps", self.generator_steps,
                "training the generator needs a positive fidelity_weight, transfer_weight or diversity_weight")


class DFRDServer(HeteroFLServer):
    """FedRolex's (or HeteroFL's) server, then the generator, its EMA copy and the distillation."""

    def __init__(self, config: DFRDConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.mode = config.window
        spec = generator_module(config, setup, conditional=True)
        self.generator = setup.build_model(spec.arch, "generator", **spec.kwargs)
        self.generator_ema = setup.build_model(spec.arch, "generator", **spec.kwargs)  # same key: a copy of G

    def window_offset(self, rnd: int) -> int:
        return -rnd if self.mode == "rolling" else 0  # FedRolex's o_t = -t (see fedrolex.py)

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        full = state_to_arrays(self.global_model)
        offset = self.window_offset(rnd)
        widths = {c: client_width(self.setup.client_archs[c]) for c in clients}
        subs = {w: submodel_arrays(self.global_model, full, w, self.mode, offset) for w in sorted(set(widths.values()))}
        replies = comm.ask("train", {c: Message(dict(subs[widths[c]][0])) for c in clients})
        if not replies:
            return {}
        self.aggregate(full, replies, {c: subs[widths[c]][1] for c in replies})
        return self.distill(rnd, replies)

    def distill(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        """The generator, its EMA copy and the global model's distillation (module doc)."""
        c = self.config
        if c.generator_steps == 0 and c.distill_steps == 0:
            return {}
        counts = np.stack([replies[k].arrays["label_counts"] for k in replies]).astype(np.float64)
        probs = counts.sum(0) if c.label_sampling else None
        measures: dict[str, float] = {}
        with ExitStack() as scalers:
            teacher = self.ensemble(replies, counts, scalers)
            for i in range(c.server_iterations):
                if c.generator_steps:
                    with self.setup.clock.phase("generator"):
                        out = train_generator_against(
                            self.generator, teacher, self.global_model, steps=c.generator_steps,
                            batch_size=c.batch_size, optim=OptimOptions(lr=c.generator_lr),
                            stream=self.setup.generator("round", rnd, "generator", i),
                            adversarial_weight=c.transfer_weight, kind="kl", temperature=c.temperature,
                            only_disagreeing=c.only_disagreeing, ce_weight=c.fidelity_weight,
                            diversity_weight=c.diversity_weight, label_probs=probs)
                        ema_update(self.generator_ema, self.generator, c.ema_decay)
                    measures["generator_loss"] = out["loss"]
                if c.distill_steps:
                    with self.setup.clock.phase("distillation"):
                        out = distill_on_generated(
                            self.global_model, teacher, (self.generator, self.generator_ema), steps=c.distill_steps,
                            samples_per_generator=c.batch_size, optim=OptimOptions(lr=c.distill_lr),
                            stream=self.setup.generator("round", rnd, "distill", i), loss=self.mixed_kl(c.batch_size),
                            student_eval=c.student_eval, label_probs=probs)
                    measures["distill_loss"] = out["loss"]
        return measures

    def ensemble(self, replies: dict[int, Message], counts: np.ndarray, scalers: ExitStack) -> LogitEnsemble:
        """The round's client sub-models (each with its scaler while ``scalers`` is open), weighted
        per class by the clients' shares of it (dynamic weighting) or equally."""
        members: list[nn.Module] = []
        for k in replies:
            arch = self.setup.client_archs[k]
            model = self.setup.build_model(arch, "teacher")
            arrays_to_state(model, {n: a for n, a in replies[k].arrays.items() if n[:2] in ("w.", "b.")})
            scalers.enter_context(scaled_hidden_outputs(model, client_width(arch) if self.config.scaler else 1.0))
            members.append(model)
        return LogitEnsemble(members, class_shares(counts) if self.config.dynamic_weighting else None)

    def mixed_kl(self, n: int):
        """Per batch: (1 − μ) · mean KL on the first ``n`` samples (G) + μ · mean KL on the next ``n`` (G̃)."""
        share, temperature = self.config.ema_weight, self.config.temperature

        def loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
            per = distillation_kl(student, teacher, temperature)
            weights = torch.full_like(per, 2.0 * share)
            weights[:n] = 2.0 * (1.0 - share)
            return (per * weights).mean()

        return loss


class DFRDClient(HeteroFLClient):
    """HeteroFL's client; it also uploads its class counts (dynamic weighting, label sampling)."""

    def train(self, message: Message, ctx: ClientContext) -> Message:
        reply = super().train(message, ctx)
        reply.arrays["label_counts"] = ctx.label_counts()
        return reply


def check_dfrd(config: DFRDConfig, run: Any) -> None:
    """Width sub-models of one architecture, and a generator that makes the dataset's inputs."""
    check_width_clients("dfrd", run.client_archs)
    check_generator(config, run, conditional=True)


TRAIN = StageSchema(
    down=Schema(prefix_arrays=weight_fields()),
    up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int},
              arrays={"label_counts": ArrayField(dtype="int64", shape=("num_classes",), private="class_counts")}),
)

SPEC = AlgorithmSpec(
    name="dfrd",
    config_cls=DFRDConfig,
    server_cls=DFRDServer,
    client_cls=DFRDClient,
    schemas={"train": TRAIN},
    summary="FedRolex sub-models; a conditional generator trained against the class-weighted client ensemble, "
    "its EMA copy, and data-free distillation into the global model.",
    stateful_clients=False,
    check_run=check_dfrd,
)
