"""FedDAT (Chen et al., "FedDAT: An Approach for Foundation Model Finetuning in Multi-Modal
Heterogeneous Federated Learning", AAAI 2024) on LoRA clients: dual adapters taught by mutual
knowledge distillation.

Each client holds a shared adapter s (``shared`` slot, trained and averaged) and, on its ``model``
slot, a frozen copy of the global adapter g and its local adapter l_k, mixed half and half (the
client's model: W x + s·(g(x) + l_k(x))/2). Every round t:
  SERVER  sends g^t_a, the average shared adapter of the client's architecture a;
  CLIENT  loads it into both s and g; on each batch drawn from its memory, two updates:
            s   ← the loss (CE + KL(model ‖ s))/2: s learns from the labels and from the mixed model;
            l_k ← the loss (CE + KL(s ‖ model))/2: the mixed model learns from the labels and from s
          (KL at temperature T, times T², over the answer tokens; the teacher's logits carry no
          gradient); uploads s and n_k;
  SERVER  g^{t+1}_a = Σ n_k s_k / Σ n_k over the clients of architecture a.

Choices. T = 2 as FedMosaic's code (the official FedDAT code defaults to 3: ``temperature``). The
second update's teacher is s after the first update of the same batch (FedMosaic's code keeps s's
logits from before its step; the official FedDAT steps one adapter after the other, as here). Compute:
three passes per batch, so ``step_fraction`` = 0.43 of the shared routine's steps (FedMosaic: 43
iterations against FedIT's 100). The mix stays at ½ (the gate is not trained), as both codes do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import Validated, option
from ..learn.loop import Objective, optimize
from ..learn.losses import distillation_kl
from ..learn.vlm import answer_logits
from ..messages import Message
from ..models import ModuleSpec
from ..models.lora import adapter_parameters, trainable_parameters
from .base import MAIN_SLOT, AlgorithmSpec, ClientContext
from .ditto_lora import DittoLoRAServer
from .vqa import (
    ADAPTERS_ROUND,
    VQA_EVALUATE,
    VQAClient,
    adapter_arrays,
    load_adapter_arrays,
    local_steps,
    replay,
    size_weighted,
    vqa_module,
)

SHARED_SLOT = "shared"


@dataclass
class FedDATConfig(Validated):
    temperature: float = option(2.0, gt=0)  # T of the mutual distillation
    step_fraction: float = option(0.43, gt=0)  # of the shared routine's steps (three passes per batch)


def feddat_modules(arch: str, config: Any, data: Any = None) -> dict[str, ModuleSpec]:
    """The mixed model (frozen global copy + local adapter) in ``model``, the shared adapter in ``shared``."""
    return {MAIN_SLOT: vqa_module(arch, data, dual=True), SHARED_SLOT: vqa_module(arch, data)}


def mutual_loss(student: nn.Module, teacher: nn.Module, temperature: float):
    """(CE + T²·KL(teacher ‖ student))/2 on one step's batches, the teacher without gradient."""
    def per_batch(batch) -> torch.Tensor:
        logits, targets = answer_logits(student, batch)
        with torch.no_grad():
            taught, _ = answer_logits(teacher, batch)
        return 0.5 * (F.cross_entropy(logits, targets) + distillation_kl(logits, taught, temperature).mean())
    return lambda batches: size_weighted(batches, per_batch)


class FedDATServer(DittoLoRAServer):
    """FedIT's server on the shared adapters."""


class FedDATClient(VQAClient):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        model, shared = ctx.model, ctx.modules[SHARED_SLOT]
        load_adapter_arrays(shared, message.arrays)
        load_adapter_arrays(model, message.arrays, "global")
        optim, t = ctx.training.optim(), self.config.temperature
        with replay(ctx) as batches:
            optimize([Objective(mutual_loss(shared, model, t), trainable_parameters(shared), optim,
                                train=(shared,), eval=(model,), name="shared"),
                      Objective(mutual_loss(model, shared, t), adapter_parameters(model, "local"), optim,
                                train=(model,), eval=(shared,), name="local")],
                     batches, steps=local_steps(ctx, self.config.step_fraction))
        return Message(adapter_arrays(shared), {"num_examples": len(ctx.state["memory_task"])})


SPEC = AlgorithmSpec(
    name="feddat",
    config_cls=FedDATConfig,
    server_cls=FedDATServer,
    client_cls=FedDATClient,
    schemas={"train": ADAPTERS_ROUND, "evaluate": VQA_EVALUATE},
    summary="FedDAT on LoRA clients: shared + (frozen global, local) adapters with mutual distillation.",
    client_modules=feddat_modules,
    task_kind="vqa",
)
