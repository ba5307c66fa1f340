"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP
2024): FedAvg of the clients' LoRA adapters — the baseline FedMosaic's code runs as ``fedavg`` and
its plots label FedIT.

Every round t:
  SERVER  sends each client the global adapter of its architecture, A^t_a;
  CLIENT  loads it into its adapter, trains on its memory (the shared routine, as SFT), uploads
          the adapter and its number of examples n_k;
  SERVER  A^{t+1}_a = Σ_{k of arch a} n_k A_k / Σ n_k, for every architecture a separately
          (adapters of different widths and depths have different shapes: never mixed).

Choices: the global adapter of an architecture starts as the adapter of a model the server builds
from the same pretrained backbone (its own seed), so every client of an architecture starts the
first round from the same adapter — as FedAvg starts from one global model. A and B are averaged
separately (FedIT's rule; the average of B·A products is not B̄·Ā, a known imprecision of the
method that we keep). n_k is the client's memory size (examples seen so far). The client's model is
its adapter after local training (the personalized measure), as FedAvg's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..messages import Message
from .base import AlgorithmSpec, ClientContext, Comm, Server, ServerSetup
from .vqa import (
    ADAPTERS_ROUND,
    VQA_EVALUATE,
    VQAClient,
    adapter_arrays,
    average_by_architecture,
    load_adapter_arrays,
    train_on_memory,
    vqa_modules,
)


@dataclass
class FedITConfig:
    """FedIT has no hyperparameters beyond the shared client routine."""


class FedITServer(Server):
    def __init__(self, config: FedITConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        # one global adapter per architecture, from the server's own copy of each backbone
        self.global_adapters = {arch: adapter_arrays(setup.build_model(arch, "global"))
                                for arch in sorted(set(setup.client_archs))}

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        archs = self.setup.client_archs
        replies = comm.ask("train", {c: Message(dict(self.global_adapters[archs[c]])) for c in clients})
        if not replies:
            return {}
        self.aggregate(replies)
        return self.after_aggregation(rnd, replies)

    def aggregate(self, replies: dict[int, Message]) -> None:
        """A^{t+1}_a = Σ n_k A_k / Σ n_k per architecture (FlexLoRA changes this step)."""
        self.global_adapters.update(average_by_architecture(replies, self.setup.client_archs))

    def after_aggregation(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        """A server step after averaging (PerAda's and TAKFL's distillation); its measures."""
        return {}


class FedITClient(VQAClient):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        load_adapter_arrays(ctx.model, message.arrays)
        train_on_memory(ctx)
        return Message(adapter_arrays(ctx.model), {"num_examples": len(ctx.state["memory_task"])})


SPEC = AlgorithmSpec(
    name="fedit",
    config_cls=FedITConfig,
    server_cls=FedITServer,
    client_cls=FedITClient,
    schemas={"train": ADAPTERS_ROUND, "evaluate": VQA_EVALUATE},
    summary="FedAvg of LoRA adapters among clients of the same architecture (FedIT).",
    client_modules=vqa_modules,
    stateful_clients=True,
    task_kind="vqa",
)
