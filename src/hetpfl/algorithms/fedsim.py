"""FedSim (Pillutla et al., "Federated Learning with Partial Model Personalization", ICML 2022) on
LoRA clients: a shared and a personal adapter trained *simultaneously*.

Each client k holds the shared adapter u (``global`` slot, averaged) and its personal adapter v_k
(``model`` slot, kept). Every round t:
  SERVER  sends u^t_a, the shared adapter of the client's architecture a;
  CLIENT  loads it; on each batch drawn from its memory, one step on both adapters at once of the
          loss of the combined model (the logits of a pass with u plus those of a pass with v_k,
          FedMosaic's code); uploads u_k and n_k;
  SERVER  u^{t+1}_a = Σ n_k u_k / Σ n_k over the clients of architecture a.
The client's model (evaluated) is the combined one: every decoding step sums both passes' logits.

Choices. The combination is FedMosaic's (two passes, logits summed); the paper's partial model is
one network with both parts, here ``combine: sum_adapters`` (one pass, both adapters added to the
frozen weights). The personal adapter stays on the client, as the paper says; FedMosaic's code also
averages it (``share_personal: true``). Compute: two passes per step, so ``step_fraction`` = ¾ of the
shared routine's steps (FedMosaic: 75 iterations against FedIT's 100). The personal adapter starts
from the client's own draw (its B is zero, so it starts as the base model's identity update).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..configuration import Validated, option
from ..messages import Message
from ..models.lora import trainable_parameters
from .base import AlgorithmSpec, ClientContext
from .ditto_lora import GLOBAL_SLOT, PERSONAL, DittoLoRAServer, ditto_modules, upload
from .vqa import ADAPTERS_ROUND, VQA_EVALUATE, VQAClient, load_adapter_arrays, local_steps, train_on_memory

COMBINATIONS = ("sum_logits", "sum_adapters")


@dataclass
class FedSimConfig(Validated):
    combine: str = option("sum_logits", choices=COMBINATIONS)  # how the two adapters make one model
    step_fraction: float = option(0.75, gt=0)  # of the shared routine's steps (two passes per step)
    share_personal: bool = False  # FedMosaic's code: the personal adapters are averaged too


class SharedAndPersonal(nn.Module):
    """The combined model: the logits of the shared-adapter model plus those of the personal one
    (``sum_logits``), or one pass of the personal model with the shared adapter's update added to
    every adapted layer (``sum_adapters``)."""

    def __init__(self, shared: nn.Module, personal: nn.Module, combine: str) -> None:
        super().__init__()
        self.shared, self.personal, self.combine = shared, personal, combine

    def forward(self, images: Tensor, image_mask: Tensor, tokens: Tensor) -> Tensor:
        if self.combine == "sum_logits":
            return self.shared(images, image_mask, tokens) + self.personal(images, image_mask, tokens)
        from ..models.lora import lora_layers  # noqa: PLC0415

        shared_layers = lora_layers(self.shared)
        hooks = [layer.register_forward_hook(_adds(shared_layers[name]))
                 for name, layer in lora_layers(self.personal).items()]
        try:
            return self.personal(images, image_mask, tokens)
        finally:
            for hook in hooks:
                hook.remove()


def _adds(shared_layer: nn.Module):
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return output + shared_layer.scale * shared_layer.adapters["local"](shared_layer.dropout(inputs[0]))
    return hook


class FedSimServer(DittoLoRAServer):
    """FedIT's server on the shared adapters."""


class FedSimClient(VQAClient):
    def combined(self, ctx: ClientContext) -> SharedAndPersonal:
        return SharedAndPersonal(ctx.modules[GLOBAL_SLOT], ctx.model, self.config.combine)

    def train(self, message: Message, ctx: ClientContext) -> Message:
        shared, personal = ctx.modules[GLOBAL_SLOT], ctx.model
        load_adapter_arrays(shared, {k: v for k, v in message.arrays.items() if not k.startswith(PERSONAL)})
        personal_arrays = {"w." + k[len(PERSONAL):]: v for k, v in message.arrays.items() if k.startswith(PERSONAL)}
        if personal_arrays:
            load_adapter_arrays(personal, personal_arrays)
        model = self.combined(ctx)
        train_on_memory(ctx, model, params=[*trainable_parameters(shared), *trainable_parameters(personal)],
                        steps=local_steps(ctx, self.config.step_fraction))
        return upload(ctx, self.config.share_personal)

    def evaluated_model(self, ctx: ClientContext) -> nn.Module:
        return self.combined(ctx)


SPEC = AlgorithmSpec(
    name="fedsim",
    config_cls=FedSimConfig,
    server_cls=FedSimServer,
    client_cls=FedSimClient,
    schemas={"train": ADAPTERS_ROUND, "evaluate": VQA_EVALUATE},
    summary="FedSim on LoRA clients: shared and personal adapters trained simultaneously (shared one averaged).",
    client_modules=ditto_modules,  # the personal adapter in model, the shared one in global
    task_kind="vqa",
)

__all__ = ["COMBINATIONS", "SharedAndPersonal", "SPEC"]
