"""Mosaic (Liu et al., arXiv 2505.19699): data-free distillation of a mixture of class-wise experts,
read through client generators, into one global model. docs/mosaic.md names every choice.

Every round t (clients of one architecture, possibly at several widths: FedRolex sub-models):
  GENERATORS  (one-shot, a client's first round) client i trains a private classifier and an
              unconditional generator G_i on its data — adversarial BCE against a discriminator +
              λ_div · batch class-diversity + λ_ent · per-sample entropy on the classifier's
              predictions + λ_inv · BatchNorm inversion (clients with fewer than τ samples) — and
              uploads G_i.
  LOCAL       the server sends each client its sub-model of the global model W^t; the client (in the
              last ``prototype_rounds`` rounds before T_w) computes class prototypes — k-means centres (k = 10) of its penultimate
              features per class under the received model (the class mean with fewer than k
              samples) — then trains (the shared routine; lr ↓ after distillation) and uploads its
              weights θ_i, its class counts n_ic and the prototypes.
  SERVER      W^{t+1} = entry-wise Σ n_i θ_i / Σ n_i (FedAvg; FedRolex with widths);
              class experts e_c = Σ_i n_ic θ_i / Σ_i n_ic (entry-wise likewise; both under the
              experiment's robust ``aggregation`` rule when it has one);
              prototypes pooled over those rounds.
  at t = T_w − 1, after aggregating:
    META      a Transformer over the experts' logits (one token per expert) learns CE on the pooled
              (prototype, class) pairs, prototypes passing through each expert's head only; an EMA
              copy (decay 0.99) is the teacher;
    DISTILL   W ← the global model distilled from the EMA teacher on 32 samples per client generator
              per step: 0.8·T²·KL + 0.2·CE(argmax teacher) + 1.0·J (the code's loss), student in eval
              mode; later rounds continue FedAvg at the clients' lower fine-tuning lr.
Reported: the global model on the global test set (``global_test_acc``) and on every client's split
(``global``), each client's own model as usual; ``generated_samples.png`` shows each generator's
samples. The generators are a privacy cost the paper accepts: they travel once, in the
``generator`` stage (``bytes_by_stage`` in the summary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import FieldError, option
from ..learn import (
    steps_for_epochs,
    IndexBatches,
    LogitEnsemble,
    Objective,
    OptimOptions,
    arrays_to_state,
    distill_on_generated,
    ema_update,
    optimize,
    state_to_arrays,
    train_gan,
)
from ..messages import ArrayField, Message, Schema, StageSchema
from ..models import META_EXPANSIONS, MixtureTeacher, ModuleSpec, generator_spec
from ..models.width import WIDTH_MODES
from .base import AlgorithmSpec, ClientContext, Comm, ServerSetup, train_locally, weight_fields
from .experts import class_experts, class_prototypes, penultimate_features
from .heterofl import HeteroFLClient, HeteroFLConfig, HeteroFLServer
from .submodels import average_submodels, check_width_clients, client_width, submodel_arrays

GENERATOR_MODES = ("per_client", "averaged")
TEACHERS = ("meta", "average")
META_DATA = ("prototypes", "generated")


@dataclass
class MosaicConfig(HeteroFLConfig):
    warmup_rounds: int = option(10, ge=1)  # FedAvg rounds before meta model + distillation (code: 40)
    finetune_lr: float | None = option(1e-4, gt=0)  # clients' lr after distillation (code); None: unchanged
    window: str = option("rolling", choices=WIDTH_MODES)  # sub-models of narrower clients (paper: FedRolex)
    # -- client generators (one-shot) -------------------------------------------------------------
    generator_arch: str | None = None  # None: dcgan_generator for images, mlp_generator otherwise
    discriminator_arch: str | None = None  # None: dcgan_discriminator / mlp_discriminator
    latent_dim: int = option(100, ge=1)  # nz (code)
    generator_width: int = option(64, ge=1)  # ngf = ndf (code)
    generator_epochs: float = option(10.0, ge=0)  # passes over the client's data (code: 200)
    generator_lr: float = option(2e-4, gt=0)  # Adam (code)
    generator_beta1: float = option(0.5, ge=0, lt=1)  # Adam β1 (DCGAN, code)
    generator_batch_size: int = option(64, ge=1)
    generator_min_steps: int = option(100, ge=0)  # fewest GAN steps a client's generator gets (small clients)
    diversity_weight: float = option(5.0, ge=0)  # batch class-diversity (code: 5)
    entropy_weight: float = option(0.0, ge=0)  # per-sample entropy (paper; code: 0)
    inversion_weight: float = option(0.0, ge=0)  # BatchNorm inversion (paper; code: off)
    inversion_threshold: int = option(0, ge=0)  # τ: clients with fewer private samples use inversion
    classifier_epochs: float = option(10.0, ge=0)  # the private classifier the terms read (code: 50)
    generators: str = option("per_client", choices=GENERATOR_MODES)  # averaged: one generator for all
    # -- prototypes, experts, meta model ------------------------------------------------------------
    prototype_k: int = option(10, ge=1)  # k-means centres per class (code: 10)
    prototype_batches: int | None = option(10, ge=1)  # batches of local data per round (code: 10); None: all
    prototype_rounds: int | None = option(5, ge=1)  # last warm-up rounds that send prototypes; None: all (code)
    teacher: str = option("meta", choices=TEACHERS)  # average: the plain mean of the experts' logits
    meta_data: str = option("prototypes", choices=META_DATA)  # generated: generator samples instead
    meta_steps: int = option(150, ge=0)  # code: 30 x 5 one-batch epochs
    meta_lr: float = option(1e-3, gt=0)
    meta_batch_size: int = option(128, ge=1)
    meta_dropout: float = option(0.2, ge=0, lt=1)
    meta_feedforward: int = option(2048, ge=1)  # the Transformer's feed-forward width (code: torch's default)
    meta_expansion: str = option("shared", choices=META_EXPANSIONS)  # one token Linear for all experts (code)
    ema_decay: float = option(0.99, ge=0, le=1)
    # -- distillation -------------------------------------------------------------------------------
    kd_steps: int = option(300, ge=0)  # code: 1500 (2500 for alpha 0.1 and 1.0)
    kd_lr: float = option(1e-4, gt=0)
    samples_per_generator: int = option(32, ge=1)
    temperature: float = option(1.0, gt=0)
    kl_weight: float = option(0.8, ge=0)
    ce_weight: float = option(0.2, ge=0)
    js_weight: float = option(1.0, ge=0)


def _generative(config: MosaicConfig, data: Any) -> tuple[ModuleSpec, ModuleSpec]:
    """The generator and discriminator of a client (``data``: anything with ``input_kind`` and
    ``value_range``: the run's FederatedData, or the server's setup)."""
    image = data.input_kind == "image"
    gen = config.generator_arch or ("dcgan_generator" if image else "mlp_generator")
    disc = config.discriminator_arch or ("dcgan_discriminator" if image else "mlp_discriminator")
    w = config.generator_width
    return (generator_spec(gen, data.value_range, latent_dim=config.latent_dim, ngf=w),
            ModuleSpec.of(disc, ndf=w))


def mosaic_modules(arch: str, config: MosaicConfig, data: Any) -> dict[str, ModuleSpec]:
    """The client's model, its private classifier, and its GAN (generator + discriminator)."""
    gen, disc = _generative(config, data)
    return {"model": ModuleSpec.parse(arch), "classifier": ModuleSpec.parse(arch), "generator": gen,
            "discriminator": disc}


class MosaicServer(HeteroFLServer):
    def __init__(self, config: MosaicConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.mode = config.window
        self.generators: dict[int, nn.Module] = {}  # G_i, as uploaded
        self.sizes: dict[int, int] = {}  # n_i of each client with a generator
        self.experts: dict[int, dict[str, np.ndarray]] = {}  # e_c (full width), the newest per class
        self.prototypes = np.zeros((0, self.global_model.feature_dim), np.float32)
        self.prototype_labels = np.zeros(0, np.int64)
        self.meta: nn.Module | None = None  # the EMA meta model (the teacher), once trained
        self.distilled = False
        self.unreported_teacher: nn.Module | None = None  # the teacher, until an evaluation scores it

    def state_dict(self) -> dict[str, Any]:
        """The default, less the teacher kept for the next evaluation (a diagnostic, rebuilt by nothing)."""
        return {k: v for k, v in super().state_dict().items() if k != "unreported_teacher"}

    def test_models(self) -> dict[str, nn.Module]:
        """The global model; at the first evaluation after distillation also the teacher it learned from
        (``teacher_test_acc``: how good the meta model over the experts was)."""
        models = super().test_models()
        if self.unreported_teacher is not None:
            models["teacher"], self.unreported_teacher = self.unreported_teacher, None
        return models

    def window_offset(self, rnd: int) -> int:
        return -rnd if self.mode == "rolling" else 0  # FedRolex's window (see fedrolex.py)

    # -- one round ----------------------------------------------------------------------------------
    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        c = self.config
        newcomers = [k for k in clients if k not in self.generators] if not self.distilled else []
        if newcomers:
            with self.setup.clock.phase("generators"):
                self.receive_generators(comm.ask("generator", {k: Message() for k in newcomers}))
        full = state_to_arrays(self.global_model)
        offset = self.window_offset(rnd)
        widths = {k: client_width(self.setup.client_archs[k]) for k in clients}
        subs = {w: submodel_arrays(self.global_model, full, w, self.mode, offset) for w in sorted(set(widths.values()))}
        scalars: dict[str, Any] = {"prototypes": self.wants_prototypes(rnd)}
        if self.distilled and c.finetune_lr is not None:
            scalars["lr"] = c.finetune_lr
        replies = comm.ask("train", {k: Message(dict(subs[widths[k]][0]), dict(scalars)) for k in clients})
        if not replies:
            return {}
        order = sorted(replies)
        indices = [subs[widths[k]][1] for k in order]
        arrays = [{n: a for n, a in replies[k].arrays.items() if n[:2] in ("w.", "b.")} for k in order]
        counts = [replies[k].arrays["class_counts"].astype(np.float64) for k in order]
        arrays_to_state(self.global_model, average_submodels(full, arrays, indices, [n.sum() for n in counts],
                                                                self.setup.aggregation))
        self.experts.update(class_experts(self.experts, full, arrays, indices, counts, self.setup.num_classes,
                                          self.setup.aggregation))
        if self.wants_prototypes(rnd):
            self.pool_prototypes([replies[k] for k in order], indices)
        measures = {"prototypes": float(len(self.prototype_labels)), "generators": float(len(self.generators))}
        if not self.distilled and rnd >= c.warmup_rounds - 1:
            measures.update(self.distill(rnd))
        return measures

    def receive_generators(self, replies: dict[int, Message]) -> None:
        gen_spec, _ = _generative(self.config, self.setup)
        for k, reply in sorted(replies.items()):
            generator = self.setup.build_model(gen_spec.arch, f"generator-{k}", **gen_spec.kwargs)
            arrays_to_state(generator, reply.arrays)
            self.generators[k] = generator
            self.sizes[k] = int(reply.scalars["num_examples"])

    def wants_prototypes(self, rnd: int) -> bool:
        """Prototypes are asked for in the last ``prototype_rounds`` warm-up rounds (all: the code's,
        which warms up from a converged model; features of a young global model are stale by then)."""
        last = self.config.prototype_rounds
        return not self.distilled and (last is None or rnd >= self.config.warmup_rounds - last)

    def pool_prototypes(self, replies: list[Message], indices: list[dict]) -> None:
        """Append the round's prototypes, a narrow client's features placed at its feature indices
        (its head is the full head's columns there, so the full head reads them alike)."""
        dim = self.global_model.feature_dim
        for reply, index in zip(replies, indices):
            protos = reply.arrays.get("prototypes")
            if protos is None or len(protos) == 0:
                continue
            full = np.zeros((len(protos), dim), np.float32)
            full[:, index["w.head.weight"][1]] = protos
            self.prototypes = np.concatenate([self.prototypes, full])
            self.prototype_labels = np.concatenate([self.prototype_labels, reply.arrays["prototype_labels"]])

    # -- meta model and distillation ----------------------------------------------------------------
    def expert_models(self) -> list[nn.Module]:
        """e_0..e_{C-1} as frozen models (a class no client has shown yet: the global model)."""
        base = ModuleSpec.parse(self.setup.client_archs[0]).arch
        full = state_to_arrays(self.global_model)
        experts = []
        for cls in range(self.setup.num_classes):
            expert = self.setup.build_model(base, f"expert-{cls}")
            arrays_to_state(expert, self.experts.get(cls, full))
            experts.append(expert.eval().requires_grad_(False))
        return experts

    def samplers(self) -> list[nn.Module]:
        """The generators distillation samples from: every client's, or their sample-weighted average."""
        gens = [self.generators[k] for k in sorted(self.generators)]
        if self.config.generators == "per_client" or len(gens) < 2:
            return gens
        from .weights import weighted_average  # noqa: PLC0415

        spec = gens[0].built_from
        averaged = self.setup.build_model(spec.arch, "generator-averaged", **spec.kwargs)
        arrays_to_state(averaged, weighted_average([state_to_arrays(g) for g in gens],
                                                   [self.sizes[k] for k in sorted(self.generators)]))
        return [averaged]

    def distill(self, rnd: int) -> dict[str, float]:
        c = self.config
        experts, gens = self.expert_models(), self.samplers()
        with self.setup.clock.phase("meta_model"):
            teacher, meta_loss = self.teacher(experts, gens)
        if not gens:
            raise RuntimeError("Mosaic: no client generator to distill on (no client took part before distillation)")
        with self.setup.clock.phase("distillation"):
            result = distill_on_generated(
                self.global_model, teacher, gens, steps=c.kd_steps, samples_per_generator=c.samples_per_generator,
                optim=OptimOptions(lr=c.kd_lr), stream=self.setup.generator("kd", rnd), loss="mosaic",
                temperature=c.temperature, kl_weight=c.kl_weight, ce_weight=c.ce_weight, js_weight=c.js_weight,
                student_eval=True)
        self.distilled, self.unreported_teacher = True, teacher
        return {"meta_loss": meta_loss, "kd_loss": float(result["loss"])}

    def teacher(self, experts: list[nn.Module], gens: list[nn.Module]) -> tuple[nn.Module, float]:
        """The plain average of the experts, or the EMA meta model over them trained on the pooled
        prototypes (or, ablation, on generated samples labelled by the experts' average)."""
        c = self.config
        if c.teacher == "average":
            return LogitEnsemble(experts), float("nan")
        shape = {"num_experts": len(experts), "dropout": c.meta_dropout, "dim_feedforward": c.meta_feedforward,
                 "expansion": c.meta_expansion}
        meta = self.setup.build_model("moe_meta", "meta", **shape)
        ema = self.setup.build_model("moe_meta", "meta", **shape)
        ema.load_state_dict(meta.state_dict())
        student, teacher = MixtureTeacher(experts, meta), MixtureTeacher(experts, ema.eval())
        inputs, labels, read = self.meta_inputs(experts, gens)
        if len(labels) == 0:
            return teacher, float("nan")

        def loss(idx: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(read(student, inputs[idx]), labels[idx])

        objective = Objective(loss, meta, OptimOptions(lr=c.meta_lr), train=(meta,), eval=tuple(experts),
                              after_step=lambda: ema_update(ema, meta, c.ema_decay))
        batches = IndexBatches(len(labels), c.meta_batch_size, steps=c.meta_steps, generator=self.setup.generator("meta"))
        result = optimize(objective, batches)
        self.meta = ema
        return teacher, float(result["loss"])

    def meta_inputs(self, experts: list[nn.Module], gens: list[nn.Module]):
        if self.config.meta_data == "prototypes":
            return (torch.from_numpy(self.prototypes), torch.from_numpy(self.prototype_labels),
                    lambda mixture, x: mixture.from_features(x))
        stream = self.setup.generator("meta-samples")
        n = max(self.config.meta_batch_size, len(self.prototype_labels))
        with torch.no_grad():
            x = torch.cat([g.eval().sample(-(-n // len(gens)), stream) for g in gens])
            labels = LogitEnsemble(experts)(x).argmax(-1)
        return x, labels, lambda mixture, batch: mixture(batch)

    def visuals(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        if not self.generators or len(self.setup.input_shape) != 3:
            return {}
        stream = self.setup.generator("visuals")
        with torch.no_grad():
            grid = np.stack([self.generators[k].eval().sample(8, stream).numpy() for k in sorted(self.generators)])
        return {"generated_samples": (grid, [f"client {k}" for k in sorted(self.generators)])}


class MosaicClient(HeteroFLClient):
    def generator(self, message: Message, ctx: ClientContext) -> Message:
        """One-shot: train a private classifier, then the GAN with the paper's terms on it; upload G_i."""
        c = self.config
        classifier = ctx.modules["classifier"]
        uses_classifier = c.diversity_weight or c.entropy_weight or c.inversion_weight
        if uses_classifier:
            train_locally(ctx, c.classifier_epochs, model=classifier, stream="classifier")
        inversion = c.inversion_weight if len(ctx.train) < c.inversion_threshold else 0.0
        gen = ctx.modules["generator"]
        steps = steps_for_epochs(len(ctx.train), c.generator_batch_size, c.generator_epochs)
        steps = max(steps, c.generator_min_steps) if steps else 0  # small clients still train their generator
        train_gan(gen, ctx.modules["discriminator"], ctx.train.x, steps=steps, batch_size=c.generator_batch_size, optim=OptimOptions(lr=c.generator_lr, beta1=c.generator_beta1),
                  stream=ctx.generator("gan"), classifier=classifier if uses_classifier else None,
                  diversity_weight=c.diversity_weight, entropy_weight=c.entropy_weight, inversion_weight=inversion)
        return Message(state_to_arrays(gen), {"num_examples": len(ctx.train)})

    def train(self, message: Message, ctx: ClientContext) -> Message:
        arrays_to_state(ctx.model, message.arrays)
        reply = Message(scalars={"num_examples": len(ctx.train)})
        with self.scaler(ctx):
            if message.scalars["prototypes"]:
                reply.arrays["prototypes"], reply.arrays["prototype_labels"] = self.prototypes(ctx)
            train_locally(ctx, lr=message.scalars.get("lr"))
        reply.arrays.update(state_to_arrays(ctx.model))
        reply.arrays["class_counts"] = ctx.label_counts()
        return reply

    def prototypes(self, ctx: ClientContext) -> tuple[np.ndarray, np.ndarray]:
        """Class prototypes of the received model's penultimate features on ``prototype_batches``
        batches of local data (a random subset of that size; all of it for None)."""
        x, y = ctx.train.x, ctx.train.y
        n = None if self.config.prototype_batches is None else self.config.prototype_batches * ctx.training.batch_size
        if n is not None and n < len(y):
            pick = np.sort(ctx.rng("prototypes").choice(len(y), size=n, replace=False))
            x, y = x[pick], y[pick]
        return class_prototypes(penultimate_features(ctx.model, x), y, self.config.prototype_k, ctx.rng("kmeans"))


def check_mosaic(config: MosaicConfig, run: Any) -> None:
    if len(set(run.client_archs)) > 1:
        check_width_clients("mosaic", run.client_archs)
    if config.warmup_rounds > run.rounds:
        raise FieldError("algorithm.warmup_rounds", config.warmup_rounds,
                         f"the distillation comes after the warm-up: at most rounds ({run.rounds})")
    gen, disc = _generative(config, run.data)
    for key, spec in (("generator_arch", gen), ("discriminator_arch", disc)):
        try:
            run.new_module(spec, "check")
        except ValueError as exc:
            raise FieldError(f"algorithm.{key}", spec.arch, str(exc)) from None


PROTOTYPES = ArrayField(dtype="float32", shape=(None, None), private="prototypes")
TRAIN = StageSchema(
    down=Schema(prefix_arrays=weight_fields(), scalars={"prototypes": bool, "lr": float}, optional=frozenset({"lr"})),
    up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int},
              arrays={"class_counts": ArrayField(dtype="int64", shape=("num_classes",), private="class_counts"),
                      "prototypes": PROTOTYPES,
                      "prototype_labels": ArrayField(dtype="int64", shape=(None,), private="prototype_labels")},
              optional=frozenset({"prototypes", "prototype_labels"}), returns_sent=True),  # the sub-model sent
)
GENERATOR = StageSchema(up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int}))

SPEC = AlgorithmSpec(
    name="mosaic",
    config_cls=MosaicConfig,
    server_cls=MosaicServer,
    client_cls=MosaicClient,
    schemas={"train": TRAIN, "generator": GENERATOR},
    summary="Client generators (one-shot), class-wise experts combined by a meta model trained on prototypes, "
    "distilled data-free into the global model; FedAvg/FedRolex rounds around it.",
    client_modules=mosaic_modules,
    check_run=check_mosaic,
)
