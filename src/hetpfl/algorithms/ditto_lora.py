"""Ditto (Li et al., ICML 2021) on LoRA clients: a personal adapter pulled towards the global one.

Each client k holds two adapters on its frozen backbone: its personal adapter v_k (the ``model``
slot, the evaluated one) and a working copy of the global adapter of its architecture (the
``global`` slot). Every round t:
  SERVER  sends w^t_a, the global adapter of the client's architecture a;
  CLIENT  on each batch drawn from its memory, two updates (FedMosaic's code steps them together):
            w_k ← w_k − η ∇ F_k(w_k)                                (the global copy, from w^t)
            v_k ← v_k − η ∇ [F_k(v_k) + (λ/2)·||v_k − w^t||²]       (personal, anchored at w^t)
          uploads w_k and n_k;
  SERVER  w^{t+1}_a = Σ n_k w_k / Σ n_k over the clients of architecture a (FedIT's rule).

Choices. λ = 0.001, the value FedMosaic's code runs with LoRA adapters (the Ditto paper chooses λ per
dataset from {0.05, 0.1, 0.2, 1, 2}; with adapters of a few thousand small numbers those values make v
almost w). The personal adapter stays on the client, as the Ditto paper says; FedMosaic's code also
averages it among clients of one architecture every round (so personalization lasts one round there)
— ``share_personal: true`` does that. Compute: both adapters step on every batch, so a round takes
``step_fraction`` = ½ of the shared routine's steps (FedMosaic equalizes compute the same way: 50
iterations for Ditto against 100 for FedIT). The first time a client takes part, v_k starts from w^t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..configuration import Validated, option
from ..learn.loop import Objective, optimize
from ..learn.losses import proximal
from ..learn.vlm import mixed_answer_loss
from ..messages import Message
from ..models import ModuleSpec
from ..models.lora import trainable_parameters
from .base import MAIN_SLOT, AlgorithmSpec, ClientContext
from .fedit import FedITServer
from .vqa import ADAPTERS_ROUND, VQA_EVALUATE, VQAClient, adapter_arrays, load_adapter_arrays, local_steps, replay, vqa_module

GLOBAL_SLOT = "global"
PERSONAL = "w.personal."  # key prefix of the personal adapter when it is shared (share_personal)


@dataclass
class DittoLoRAConfig(Validated):
    lam: float = option(0.001, ge=0)  # λ of (λ/2)·||v − w^t||² over the adapter's tensors
    step_fraction: float = option(0.5, gt=0)  # of the shared routine's steps (two updates per batch)
    share_personal: bool = False  # FedMosaic's code: the personal adapters are averaged too


def ditto_modules(arch: str, config: Any, data: Any = None) -> dict[str, ModuleSpec]:
    """The personal adapter in ``model``, the global copy in ``global`` (each on its own backbone copy)."""
    return {MAIN_SLOT: vqa_module(arch, data), GLOBAL_SLOT: vqa_module(arch, data)}


class DittoLoRAServer(FedITServer):
    """FedIT's server: send w^t_a, average the uploaded global copies per architecture."""


def personal_and_global_round(ctx: ClientContext, message: Message, lam: float, fraction: float) -> None:
    """Ditto's local round (module docstring), shared with PerAda, whose client is Ditto's."""
    personal, global_copy = ctx.model, ctx.modules[GLOBAL_SLOT]
    received = {k: v for k, v in message.arrays.items() if not k.startswith(PERSONAL)}
    shared_personal = {"w." + k[len(PERSONAL):]: v for k, v in message.arrays.items() if k.startswith(PERSONAL)}
    load_adapter_arrays(global_copy, received)  # w^t
    if shared_personal:  # share_personal: the architecture's average personal adapter replaces v_k
        load_adapter_arrays(personal, shared_personal)
    elif not ctx.state.get("joined", False):
        load_adapter_arrays(personal, received)
    ctx.state["joined"] = True
    own, anchors = trainable_parameters(personal), [p.detach().clone() for p in trainable_parameters(global_copy)]
    optim = ctx.training.optim()

    def personal_loss(batches):
        value = mixed_answer_loss(personal, batches)
        return value + proximal(own, anchors, lam) if lam else value

    with replay(ctx) as batches:
        optimize([Objective(lambda b: mixed_answer_loss(global_copy, b), trainable_parameters(global_copy), optim,
                            train=(global_copy,), name="global"),
                  Objective(personal_loss, own, optim, train=(personal,), name="personal")],
                 batches, steps=local_steps(ctx, fraction))


class DittoLoRAClient(VQAClient):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        personal_and_global_round(ctx, message, self.config.lam, self.config.step_fraction)
        return upload(ctx, self.config.share_personal)


def upload(ctx: ClientContext, share_personal: bool) -> Message:
    """The global copy (and, with ``share_personal``, the personal adapter under ``w.personal.``)."""
    arrays = adapter_arrays(ctx.modules[GLOBAL_SLOT])
    if share_personal:
        arrays.update({PERSONAL + k[2:]: v for k, v in adapter_arrays(ctx.model).items()})
    return Message(arrays, {"num_examples": len(ctx.state["memory_task"])})


SPEC = AlgorithmSpec(
    name="ditto_lora",
    config_cls=DittoLoRAConfig,
    server_cls=DittoLoRAServer,
    client_cls=DittoLoRAClient,
    schemas={"train": ADAPTERS_ROUND, "evaluate": VQA_EVALUATE},
    summary="Ditto on LoRA clients: personal adapters pulled towards a per-architecture FedIT global adapter.",
    client_modules=ditto_modules,
    task_kind="vqa",
)
