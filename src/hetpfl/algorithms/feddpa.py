"""FedDPA (Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024)
on LoRA clients: a global adapter for generalization, a local adapter for personalization, mixed
per instance at test time.

Each client's layers hold a global adapter g (averaged) and a local adapter l_k (kept), mixed as
W x + s·[(1 − w) g(x) + w l_k(x)]. Every round t:
  SERVER  sends g^t_a, the global adapter of the client's architecture a;
  CLIENT  loads it into g; the first half of its steps train g alone (w = 0, the global adapter's
          own model), the second half train l_k with g frozen at the fixed mix w = ½; uploads g, n_k;
  SERVER  g^{t+1}_a = Σ n_k g_k / Σ n_k over the clients of architecture a.
At test time (``instance_weighting: true``) each input gets its own w(x) = ½ · the mean cosine
similarity between its representation and those of ``reference_examples`` examples drawn from the
client's memory (representation: the final hidden state at the ``<answer>`` token, with the local
adapter alone), so inputs unlike the client's data lean on the global adapter.

Choices. The schedule and the ½ mix are FedMosaic's code and the official FedDPA training; the
instance weighting follows the official FedDPA inference (5 reference examples, ½ × mean cosine) —
FedMosaic's code evaluates the fixed ½ mix instead (``instance_weighting: false``). w(x) is clipped
to [0, ½] (a negative mean cosine would give the global adapter more than its whole share). The local adapter
stays on the client, as the paper says; FedMosaic's code also averages it. Compute: one pass per
step, the shared routine's steps split in two halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configuration import Validated, option
from ..data.hetvqa import make_batch
from ..messages import Message
from ..models.lora import adapter_mix, adapter_parameters
from .base import AlgorithmSpec, ClientContext
from .ditto_lora import DittoLoRAServer
from .vqa import (
    ADAPTERS_ROUND,
    VQA_EVALUATE,
    FixedMix,
    VQAClient,
    adapter_arrays,
    load_adapter_arrays,
    local_steps,
    train_on_memory,
    vqa_module,
)


@dataclass
class FedDPAConfig(Validated):
    instance_weighting: bool = True  # test-time w(x) from similarity to the client's data (else w = ½)
    reference_examples: int = option(5, ge=1)  # memory examples w(x) compares an input with


def feddpa_modules(arch, config, data=None):
    """One slot: the backbone with dual adapters (global g, local l_k)."""
    return {"model": vqa_module(arch, data, dual=True)}


def answer_representation(model: nn.Module, images: Tensor, image_mask: Tensor, tokens: Tensor, answer_id: int) -> Tensor:
    """The final hidden state (the language model head's input) at each row's ``<answer>`` token."""
    captured: list[Tensor] = []
    hook = model.language.lm_head.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    try:
        model(images, image_mask, tokens)
    finally:
        hook.remove()
    position = (tokens == answer_id).int().argmax(dim=1)
    return captured[0][torch.arange(tokens.shape[0]), position]


class InstanceWeighted(nn.Module):
    """The client's model with w(x) per input (module docstring), for decoding."""

    def __init__(self, model: nn.Module, references: Tensor, answer_id: int) -> None:
        super().__init__()
        self.model, self.references, self.answer_id = model, F.normalize(references, dim=-1), answer_id

    def forward(self, images: Tensor, image_mask: Tensor, tokens: Tensor) -> Tensor:
        with adapter_mix(self.model, 0.0):  # the local adapter alone gives the representation
            h = answer_representation(self.model, images, image_mask, tokens, self.answer_id)
        w = (0.5 * (F.normalize(h, dim=-1) @ self.references.T).mean(dim=1)).clamp(0.0, 0.5)
        with adapter_mix(self.model, 1.0 - w):  # the global adapter's share
            return self.model(images, image_mask, tokens)


class FedDPAServer(DittoLoRAServer):
    """FedIT's server on the global adapters."""


class FedDPAClient(VQAClient):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        model = ctx.model
        load_adapter_arrays(model, message.arrays, "global")
        steps = local_steps(ctx)
        first, second = max(1, steps // 2), max(1, steps - steps // 2)
        global_params = adapter_parameters(model, "global")
        for p in global_params:
            p.requires_grad_(True)
        try:
            with adapter_mix(model, 1.0):  # the global adapter alone
                train_on_memory(ctx, params=global_params, steps=first, stream="global")
        finally:
            for p in global_params:
                p.requires_grad_(False)
        with adapter_mix(model, 0.5):
            train_on_memory(ctx, params=adapter_parameters(model, "local"), steps=second, stream="local")
        return Message(adapter_arrays(model, "global"), {"num_examples": len(ctx.state["memory_task"])})

    def evaluated_model(self, ctx: ClientContext) -> nn.Module:
        if not self.config.instance_weighting:
            return FixedMix(ctx.model, 0.5)
        store = ctx.examples.store
        tasks, indices = ctx.state["memory_task"], ctx.state["memory_index"]
        rows = ctx.rng("references").choice(len(tasks), size=min(self.config.reference_examples, len(tasks)), replace=False)
        refs = []
        with torch.no_grad(), adapter_mix(ctx.model, 0.0):
            was_training = ctx.model.training
            ctx.model.eval()
            for r in np.sort(rows):
                batch = make_batch(store.pool, store.examples("train", int(tasks[r])), np.array([indices[r]]))
                refs.append(answer_representation(ctx.model, batch.images, batch.image_mask, batch.text, store.vocab.answer_id))
            ctx.model.train(was_training)
        return InstanceWeighted(ctx.model, torch.cat(refs), store.vocab.answer_id)


SPEC = AlgorithmSpec(
    name="feddpa",
    config_cls=FedDPAConfig,
    server_cls=FedDPAServer,
    client_cls=FedDPAClient,
    schemas={"train": ADAPTERS_ROUND, "evaluate": VQA_EVALUATE},
    summary="FedDPA on LoRA clients: global + local adapters, instance-wise mixing at test time.",
    client_modules=feddpa_modules,
    task_kind="vqa",
)
