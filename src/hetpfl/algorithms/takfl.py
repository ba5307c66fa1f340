"""TAKFL (Morafah et al., "Towards Diverse Device Heterogeneous Federated Learning via Task
Arithmetic Knowledge Integration", NeurIPS 2024) on LoRA clients: each model size learns from every
other size's ensemble *separately*, and the lessons are merged by task arithmetic.

Every round t:
  SERVER  sends each client the adapter θ_a of its architecture a;
  CLIENT  loads it, trains on its memory (the shared routine, as FedIT), uploads its adapter and n_k;
  SERVER  θ_a ← the example-weighted mean of its clients' adapters (FedIT, per architecture); then for
          every student architecture s and every teacher architecture t (s itself included: TAKFL's
          self-regularization), distil a copy of θ_s for one pass over the server's generic
          examples towards the mean answer logits of t's clients (KL at T, × T²): the task vector
          τ_{s←t} = θ_{s←t} − θ_s; finally θ_s ← θ_s + Σ_t λ_t τ_{s←t}.

Choices (the official code was not read; from the paper's description): λ_t = 1 / (number of
teachers), the uniform merge (the paper adapts the coefficients; ``merge_scale`` scales all of them);
teachers are the clients' ensembles of each size, as TAKFL's per-prototype ensembles; the generic
examples are the server's (``server_examples`` per pretraining template and source), never a
client's. A run with one architecture has only the self-teacher (FedIT plus self-distillation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..configuration import Validated, option
from ..messages import Message
from .base import AlgorithmSpec, ServerSetup
from .fedit import FedITClient, FedITServer
from .server_distill import distill_adapter, ensemble_logits, server_batches, student_models
from .vqa import ADAPTERS_ROUND, VQA_EVALUATE, vqa_modules


@dataclass
class TAKFLConfig(Validated):
    server_examples: int = option(10, ge=1)  # per pretraining template and source
    temperature: float = option(2.0, gt=0)
    merge_scale: float = option(1.0, gt=0)  # Σ_t λ_t (uniform λ_t = merge_scale / teachers)


class TAKFLServer(FedITServer):
    def __init__(self, config: TAKFLConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.students = student_models(setup)

    def after_aggregation(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        with self.setup.clock.phase("distill"):
            return self.integrate(rnd, replies)

    def integrate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        archs = self.setup.client_archs
        batches = server_batches(self.setup, self.config.server_examples, "takfl", rnd)
        teachers = {t: ensemble_logits({c: (self.students[t], dict(r.arrays)) for c, r in sorted(replies.items())
                                        if archs[c] == t}, batches)
                    for t in sorted({archs[c] for c in replies})}
        losses = {}
        for s, student in self.students.items():
            base = self.global_adapters[s]
            vectors = []
            for t, targets in teachers.items():
                distilled, loss = distill_adapter(student, base, batches, targets, self.config.temperature,
                                                  self.setup.training.optim())
                vectors.append({k: distilled[k] - base[k] for k in base})
                losses[f"distill_loss_{s}_from_{t}"] = loss
            weight = self.config.merge_scale / len(vectors)
            self.global_adapters[s] = {k: (base[k] + weight * sum(v[k] for v in vectors)).astype(np.float32) for k in base}
        return losses


SPEC = AlgorithmSpec(
    name="takfl",
    config_cls=TAKFLConfig,
    server_cls=TAKFLServer,
    client_cls=FedITClient,
    schemas={"train": ADAPTERS_ROUND, "evaluate": VQA_EVALUATE},
    summary="TAKFL: per-size FedIT, then each size distils every size's ensemble separately and merges the task vectors.",
    client_modules=vqa_modules,
    task_kind="vqa",
)
