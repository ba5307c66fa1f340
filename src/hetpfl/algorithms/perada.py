"""PerAda (Xie et al., "PerAda: Parameter-Efficient Federated Learning Personalization with
Generalization Guarantees", CVPR 2024) on LoRA clients: Ditto's personal adapters, and a global
adapter improved on the server by distilling the clients' ensemble on unlabeled server data.

Every round t:
  SERVER  sends w^t_a, the global adapter of the client's architecture a;
  CLIENT  Ditto's local round (:mod:`.ditto_lora`): the global copy w_k trained from w^t, the
          personal adapter v_k pulled towards w^t; uploads w_k and n_k;
  SERVER  w̄_a = Σ n_k w_k / Σ n_k per architecture; then, for every architecture, the student (its
          backbone with w̄_a) is distilled for one pass over the server's ``server_examples``
          examples per source and template towards the ensemble — the mean answer logits of every
          client's uploaded model, of any architecture (all share the vocabulary): KL at temperature
          T, over the answer tokens; w^{t+1}_a is the distilled adapter.

Choices (FedMosaic's code, as the paper is silent on them for vision-language adapters): T = 2 with
no T² factor; the server's data is a generic instruction mix the clients never train on — here the
pretraining mix's questions on the pretraining subset's images (FedMosaic: 80 examples of LLaVA's
mix); the distillation uses the shared optimizer options and batch size. Like Ditto, the personal
adapter stays on the client (FedMosaic's code also averages it: ``share_personal: true``).
"""

from __future__ import annotations

from dataclasses import dataclass


from ..configuration import Validated, option
from ..messages import Message
from .base import AlgorithmSpec, ServerSetup
from .ditto_lora import PERSONAL, DittoLoRAClient, DittoLoRAServer, ditto_modules
from .server_distill import distill_adapter, ensemble_logits, server_batches, student_models
from .vqa import ADAPTERS_ROUND, VQA_EVALUATE


@dataclass
class PerAdaConfig(Validated):
    lam: float = option(0.001, ge=0)  # Ditto's λ (FedMosaic's code)
    step_fraction: float = option(0.5, gt=0)  # of the shared routine's steps (two updates per batch)
    share_personal: bool = False  # FedMosaic's code: the personal adapters are averaged too
    server_examples: int = option(10, ge=1)  # per pretraining template and source, for the distillation
    temperature: float = option(2.0, gt=0)  # T of the server's distillation


class PerAdaServer(DittoLoRAServer):
    def __init__(self, config: PerAdaConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.students = student_models(setup)

    def after_aggregation(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        with self.setup.clock.phase("distill"):
            return self.distill(rnd, replies)

    def distill(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        batches = server_batches(self.setup, self.config.server_examples, "distill", rnd)
        archs = self.setup.client_archs
        shared = {c: {k: v for k, v in r.arrays.items() if not k.startswith(PERSONAL)} for c, r in replies.items()}
        teacher = ensemble_logits({c: (self.students[archs[c]], shared[c]) for c in sorted(replies)}, batches)
        losses = {}
        for arch, student in self.students.items():
            adapters = self.global_adapters[arch]
            start = {k: v for k, v in adapters.items() if not k.startswith(PERSONAL)}
            # KL to the ensemble at T, without T² (FedMosaic's code)
            distilled, loss = distill_adapter(student, start, batches, teacher, self.config.temperature,
                                              self.setup.training.optim(), squared=False)
            adapters.update(distilled)
            losses[f"distill_loss_{arch}"] = loss
        return losses


class PerAdaClient(DittoLoRAClient):
    """Ditto's client (personal adapter anchored at the received global one)."""


SPEC = AlgorithmSpec(
    name="perada",
    config_cls=PerAdaConfig,
    server_cls=PerAdaServer,
    client_cls=PerAdaClient,
    schemas={"train": ADAPTERS_ROUND, "evaluate": VQA_EVALUATE},
    summary="PerAda on LoRA clients: Ditto's personal adapters, global adapters distilled from the clients' ensemble.",
    client_modules=ditto_modules,
    task_kind="vqa",
)
