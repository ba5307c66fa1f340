"""Local / SFT on LoRA clients (FedMosaic's ``sft`` baseline): every client fine-tunes its own
adapter on its own stream of tasks; nothing is communicated.

Every round t, every client k: the examples arriving in round t join its replay memory, and its
adapter takes ``ceil(local_epochs × arrivals / batch_size)`` steps of the answer loss on batches
drawn from the memory (:func:`~hetpfl.algorithms.vqa.train_on_memory`). The base model stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..messages import Message, StageSchema
from .base import AlgorithmSpec, ClientContext, Comm, Server
from .vqa import VQA_EVALUATE, VQAClient, train_on_memory, vqa_modules


@dataclass
class SFTConfig:
    """Local fine-tuning has no hyperparameters beyond the shared client routine."""


class SFTServer(Server):
    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        comm.ask("train", {c: Message() for c in clients})
        return {}


class SFTClient(VQAClient):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        train_on_memory(ctx)
        return Message()


SPEC = AlgorithmSpec(
    name="sft",
    config_cls=SFTConfig,
    server_cls=SFTServer,
    client_cls=SFTClient,
    schemas={"train": StageSchema(), "evaluate": VQA_EVALUATE},
    summary="Local LoRA fine-tuning of each vision-language client on its own tasks (no communication).",
    client_modules=vqa_modules,
    task_kind="vqa",
)
