"""DENSE (Zhang et al., NeurIPS 2022, "DENSE: Data-Free One-Shot Federated Learning").

One communication round (round 0), then data-free distillation on the server:
  CLIENT  k trains its model f_k on its private data for ``local_epochs`` (the paper: to convergence;
          the README: 400 epochs) and uploads it once, with n_k; nothing is sent down.
  SERVER  teacher A(x) = Σ_k a_k f_k(x), a_k = 1/m (the code's ``Ensemble_A``: the mean of logits);
          student S: a freshly initialized model (the code re-creates it after evaluating FedAvg).
          for epoch e = 1..``epochs``:
            (a) GENERATOR G (reset to a new initialization each epoch, as the code), ``generator_steps``
                Adam steps on batches x = G(z), z ~ N(0, I), random targets ŷ ~ U(classes):
                  L_G = ce_weight · CE(A(x), ŷ)                               (confidence, the code's ``oh``)
                      + bn_weight · Σ_BN ‖μ(x) − μ_BN‖ + ‖σ²(x) − σ²_BN‖       (teacher BN statistics)
                      − adversarial_weight · mean[1(argmax S ≠ argmax A) · KL(A(x) ‖ S(x))]
                one batch of G's samples joins the synthetic pool (the code's ``ImagePool``);
            (b) DISTILL one pass over the pool (shuffled): min_S T² · KL(σ(A/T) ‖ σ(S/T)), SGD + momentum 0.9.
Reported: S as ``global`` (every client's test split) and ``global_test_acc``, the teacher A as
``ensemble_test_acc`` (what the student could reach); each client's own model is
its local model (clients not sampled in round 0 never train). Later rounds send nothing and keep the
models, unless ``later_epochs`` > 0: that many more epochs (a)+(b) per round with the same teacher.

Defaults follow the official code and README (zj-jayzhang/DENSE ``loop_df_fl.py``,
``helpers/synthesizers.py``: adv = bn = oh = 1, lr_g 1e-3 with Adam β1 0.5, g_steps 30, T 20, SGD lr
0.005 momentum 0.9, unconditional generator), sized down for a CPU (epochs 200 → 20, batches 256 → 64,
nz 256 → 32, ngf 64 → 16). Choices where paper and code are silent or differ, each a config key:
- ``reset_generator``: the code re-initializes G every epoch (``reset_model``); False keeps one G.
- ``fixed_codes`` (True, the code): each epoch one batch of codes z and random targets ŷ is drawn
  and learned together with G (one Adam), and G(z) of that batch is pooled (in train mode, batch
  statistics, as it trained); the code pools the lowest-loss iterate, we pool the last. Only fixed
  codes tie a target to a code: with fresh z every step (``fixed_codes: false``) the CE term on random
  targets of an unconditional G cannot be met, and at CPU scale (MNIST, α 0.1, 20 epochs of 20 steps)
  the pooled samples stayed noise and the student scored 8.9 % (fixed codes: see docs/results.md). No augmentation of generated samples
  (the code's random crop and flip do not suit digits); the pool is kept as floats (the code: PNGs).
- ``kd_data``: ``pool`` (the code) or ``fresh`` (``kd_steps`` steps on fresh samples of the current G).
- ``student_init``: ``fresh`` (the code) or ``average`` (FedAvg of the uploads; one architecture only).
- ``ensemble_weights``: ``uniform`` (the code) or ``samples`` (a_k ∝ n_k).
- BN matching: teacher members frozen in eval mode (the paper). The code keeps its members in a plain
  list, so its hooks never attach (its bn term is 0) and its members run in train mode.
- the KD optimizer restarts (momentum) each epoch; the code keeps one SGD for all epochs.
- no download: each client starts from its own seeded initialization (the code copies one model).
- heterogeneous clients are allowed (the paper's ``heter_fl.py``): the student is ``student_arch``
  (None: the most common client architecture).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..configuration import FieldError, option, require
from ..learn import (
    LogitEnsemble,
    OptimOptions,
    arrays_to_state,
    distill_on_generated,
    distill_on_inputs,
    state_to_arrays,
    train_generator_against,
)
from ..messages import Message, Schema, StageSchema
from .base import AlgorithmSpec, Client, ClientContext, Comm, Server, ServerSetup, train_locally, weight_fields
from .datafree import GeneratorConfig, check_generator, generator_module
from .weights import weighted_average

KD_DATA = ("pool", "fresh")
STUDENT_INITS = ("fresh", "average")
ENSEMBLE_WEIGHTS = ("uniform", "samples")


@dataclass
class DenseConfig(GeneratorConfig):
    local_epochs: float | None = option(None, ge=0)  # the one-shot local training; None: client.local_epochs
    epochs: int = option(20, ge=0)  # generator + distillation epochs in round 0 (code: 200)
    later_epochs: int = option(0, ge=0)  # epochs in each later round (0: later rounds only keep the models)
    generator_steps: int = option(20, ge=0)  # g_steps per epoch (README: 30)
    generator_lr: float = option(1e-3, gt=0)  # Adam, β1 = 0.5 (code)
    synthesis_batch_size: int = option(64, ge=1)  # samples per generator step and per pooled batch (code: 256)
    reset_generator: bool = True  # a new generator every epoch (code)
    fixed_codes: bool = True  # one batch of codes and targets, learned with G for the epoch (code); False: fresh
    adversarial_weight: float = option(1.0, ge=0)  # adv (README: 1)
    bn_weight: float = option(1.0, ge=0)  # bn (README: 1)
    ce_weight: float = option(1.0, ge=0)  # oh (README: 1)
    kd_data: str = option("pool", choices=KD_DATA)
    kd_batch_size: int = option(64, ge=1)  # code: 256
    kd_steps: int | None = option(None, ge=0)  # student steps per epoch; None: one pass over the pool (code)
    kd_lr: float = option(0.005, gt=0)  # SGD, momentum 0.9 (README)
    temperature: float = option(20.0, gt=0)  # T of the student's KL (README: 20)
    student_init: str = option("fresh", choices=STUDENT_INITS)
    student_arch: str | None = None  # None: the most common client architecture
    ensemble_weights: str = option("uniform", choices=ENSEMBLE_WEIGHTS)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.adversarial_weight + self.bn_weight + self.ce_weight > 0, "adversarial_weight",
                self.adversarial_weight, "the generator needs a term: adversarial, bn or ce weight > 0")


def student_architecture(config: DenseConfig, archs: list[str]) -> str:
    return config.student_arch or max(archs, key=archs.count)


class DenseServer(Server):
    def __init__(self, config: DenseConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.global_model = setup.build_model(student_architecture(config, setup.client_archs), "global")
        self.generator = self.new_generator(0)
        self.teachers: list[torch.nn.Module] = []  # the uploaded models, frozen
        self.ensemble_weights = np.zeros(0, np.float32)
        self.pool = np.zeros((0, *setup.input_shape), np.float32)  # synthetic inputs
        self.pool_logits = np.zeros((0, setup.num_classes), np.float32)  # the teacher's logits on them
        self.epochs_done = 0

    def new_generator(self, epoch: int) -> torch.nn.Module:
        spec = generator_module(self.config, self.setup, conditional=False)
        return self.setup.build_model(spec.arch, f"generator-{epoch}", **spec.kwargs)

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        c = self.config
        if rnd == 0:
            replies = comm.ask("train", {k: Message() for k in clients})
            if not replies:
                return {}
            self.receive(replies)
            epochs = c.epochs
        else:
            epochs = c.later_epochs if self.teachers else 0
        results = [self.epoch() for _ in range(epochs)]
        if not results:
            return {}
        return {"generator_loss": float(np.mean([g for g, _ in results])), "kd_loss": results[-1][1],
                "pool_size": float(len(self.pool))}

    def receive(self, replies: dict[int, Message]) -> None:
        order = sorted(replies)
        states = [dict(replies[k].arrays) for k in order]
        sizes = np.array([replies[k].scalars["num_examples"] for k in order], np.float64)
        self.teachers = []
        for k, arrays in zip(order, states):
            model = self.setup.build_model(self.setup.client_archs[k], f"upload-{k}")
            arrays_to_state(model, arrays)
            self.teachers.append(model.eval().requires_grad_(False))
        weights = sizes if self.config.ensemble_weights == "samples" else np.ones(len(order))
        self.ensemble_weights = (weights / weights.sum()).astype(np.float32)
        if self.config.student_init == "average":  # one architecture (check_run)
            arrays_to_state(self.global_model, weighted_average(states, list(sizes)))

    def teacher(self) -> LogitEnsemble:
        return LogitEnsemble(self.teachers, self.ensemble_weights).eval()

    def epoch(self) -> tuple[float, float]:
        """(a) a generator against the student, a batch of its samples pooled; (b) distillation."""
        c, e, teacher, student = self.config, self.epochs_done, self.teacher(), self.global_model
        stream = self.setup.generator("dense", e)
        with self.setup.clock.phase("generator"):
            if c.reset_generator and e > 0:
                self.generator = self.new_generator(e)
            gen = train_generator_against(
                self.generator, teacher, student, steps=c.generator_steps, batch_size=c.synthesis_batch_size,
                optim=OptimOptions(lr=c.generator_lr, beta1=0.5), stream=stream, adversarial_weight=c.adversarial_weight,
                kind="kl", temperature=1.0, only_disagreeing=True, bn_weight=c.bn_weight, ce_weight=c.ce_weight,
                fixed_codes=c.fixed_codes)
            if c.kd_data == "pool":
                with torch.no_grad():  # the batch it inverted (fixed codes), else a fresh draw
                    z = gen["codes"][0] if c.fixed_codes else self.generator.draw_latent(c.synthesis_batch_size, stream)
                    x = self.generator.train()(z)
                    self.pool = np.concatenate([self.pool, x.cpu().numpy()])
                    self.pool_logits = np.concatenate([self.pool_logits, teacher(x).cpu().numpy()])
        kd_optim = OptimOptions(lr=c.kd_lr, optimizer="sgd", momentum=0.9)
        steps = c.kd_steps if c.kd_steps is not None else -(-(e + 1) * c.synthesis_batch_size // c.kd_batch_size)
        with self.setup.clock.phase("distill"):
            if c.kd_data == "fresh":
                kd = distill_on_generated(student, teacher, self.generator, steps=steps,
                                          samples_per_generator=c.kd_batch_size, optim=kd_optim, stream=stream,
                                          loss="kl", temperature=c.temperature)
            else:
                kd = distill_on_inputs(student, torch.from_numpy(self.pool), torch.from_numpy(self.pool_logits),
                                       steps=steps, batch_size=c.kd_batch_size, optim=kd_optim, stream=stream,
                                       temperature=c.temperature)
        self.epochs_done += 1
        return float(gen["loss"]), float(kd["loss"])

    def extra_models(self) -> dict[str, dict[int, torch.nn.Module]]:
        return {"global": {k: self.global_model for k in range(self.setup.num_clients)}}

    def test_models(self) -> dict[str, torch.nn.Module]:
        """The student, and the teacher it learns from (``ensemble_test_acc``: its ceiling)."""
        return {"global": self.global_model, **({"ensemble": self.teacher()} if self.teachers else {})}

    def visuals(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        """Eight samples of up to eight pooled batches, evenly spaced over the epochs."""
        n = self.config.synthesis_batch_size
        if len(self.pool) == 0 or len(self.setup.input_shape) != 3:
            return {}
        batches = self.pool.reshape(-1, n, *self.setup.input_shape)
        rows = np.unique(np.linspace(0, len(batches) - 1, min(8, len(batches))).astype(int))
        return {"generated_samples": (batches[rows, :8], [f"epoch {r}" for r in rows])}


class DenseClient(Client):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        """The one-shot local training; the model is uploaded once."""
        train_locally(ctx, self.config.local_epochs)
        return Message(state_to_arrays(ctx.model), {"num_examples": len(ctx.train)})


def check_dense(config: DenseConfig, run: Any) -> None:
    check_generator(config, run, conditional=False)
    student = student_architecture(config, run.client_archs)
    try:
        run.new_model(student, "check")
    except ValueError as exc:
        raise FieldError("student_arch", student, str(exc)) from None
    if config.student_init == "average" and set(run.client_archs) != {student}:
        raise FieldError("student_init", config.student_init,
                         f"averaging needs every client on the student's architecture {student!r}, "
                         f"got {sorted(set(run.client_archs))} (use student_init: fresh)")


TRAIN = StageSchema(down=Schema(), up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int}))

SPEC = AlgorithmSpec(
    name="dense",
    config_cls=DenseConfig,
    server_cls=DenseServer,
    client_cls=DenseClient,
    schemas={"train": TRAIN},
    summary="One-shot: clients upload their local models once; the server distills their logit ensemble "
    "into a global model on samples of a generator trained adversarially against it (data-free).",
    check_run=check_dense,
)
