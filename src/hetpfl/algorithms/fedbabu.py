"""FedBABU (Oh et al., ICLR 2022): federate the body only; the head stays random and frozen.

The model is split as f(x) = h(φ(x)). The head h is the global model's random initialization,
the same for every client, and is never trained, uploaded or averaged during federation; only the
body φ (every tensor but the head, buffers included) is. Every round t:
  SERVER  sends the global model (φ^t, h) to the sampled clients S_t;
  CLIENT  k loads (φ^t, h), trains φ on its private data with h frozen (the shared client
          routine), uploads φ_k and n_k (the body only);
  SERVER  φ^{t+1} = Σ_{k∈S_t} n_k φ_k / Σ_{k∈S_t} n_k;  h unchanged.
  EVALUATE (every evaluation round; personalization) the server sends (φ, h) to every client,
          which fine-tunes a copy — the whole model by default, or the head only — for τ_f epochs
          on its own training data and scores it on its test split. These bytes count as
          evaluation traffic; the fine-tuning never feeds back into federation (the next
          training round starts again from the global (φ, h)).
  Reported: the personalized measure above, and the global model (φ, h) as ``global`` on every
  client's test split and ``global_test`` on the global test set (the paper's "initial" accuracy,
  before fine-tuning).

Choices where the paper is silent or that differ from it:

* The head travels down with the body every round (as FL-bench does: the whole model is
  broadcast and the head's gradients are zeroed), so a client that joins late gets h without a
  first-contact message of its own; it never travels up. Down bytes: the full model; up: the body.
* The head keeps the registry's initialization of the server's model (``nn.Linear``'s default);
  the paper also studies other initializations (not offered here).
* ``finetune``: ``full`` (default; the paper's personalization fine-tunes the whole model) or
  ``head`` (body frozen). τ_f = ``finetune_epochs``, default 5 (the Flower baseline's value),
  with the shared optimizer options and its own random stream (``finetune``).
* BatchNorm statistics are part of the body: averaged in federation, updated by fine-tuning.
* Aggregation weighted by n_k (FedAvg's ``aggregate``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..configuration import Validated, option
from ..messages import Message
from .base import (
    EVALUATE_WITH_WEIGHTS,
    AlgorithmSpec,
    Client,
    ClientContext,
    Comm,
    evaluation_reply,
    train_locally,
)
from .fedavg import SHARED_WEIGHTS_ROUND, FedAvgServer
from .parts import body_only, body_parameters, head_parameters, is_body
from .weights import load_shared, shared_arrays

FINETUNE_PARTS = ("full", "head")


@dataclass
class FedBABUConfig(Validated):
    finetune: str = option("full", choices=FINETUNE_PARTS)  # what personalization fine-tunes
    finetune_epochs: float = option(5.0, ge=0)  # τ_f: epochs of fine-tuning before each evaluation


class FedBABUServer(FedAvgServer):
    shared = staticmethod(body_only)  # what is averaged (and uploaded): the body only

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        model = shared_arrays(self.global_model)  # (φ^t, h): the head goes down, never up
        replies = comm.ask("train", {c: Message(dict(model)) for c in clients})
        if replies:
            self.aggregate(replies)
        return {}

    def evaluation_messages(self, clients: list[int]) -> dict[int, Message]:
        """The global model (φ, h) each client fine-tunes before scoring it."""
        model = shared_arrays(self.global_model)
        return {c: Message(dict(model)) for c in clients}


class FedBABUClient(Client):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        """Load (φ^t, h), train the body with the head frozen, upload the body."""
        load_shared(ctx.model, message.arrays)
        train_locally(ctx, params=body_parameters(ctx.model))
        return Message(shared_arrays(ctx.model, is_body), {"num_examples": len(ctx.train)})

    def evaluate(self, message: Message, ctx: ClientContext) -> Message:
        """Fine-tune the received global model on the private data, then score it."""
        load_shared(ctx.model, message.arrays)
        params = head_parameters(ctx.model) if self.config.finetune == "head" else None
        train_locally(ctx, self.config.finetune_epochs, params=params, stream="finetune")
        return evaluation_reply(ctx.model, ctx.test, ctx.num_tasks)


SPEC = AlgorithmSpec(
    name="fedbabu",
    config_cls=FedBABUConfig,
    server_cls=FedBABUServer,
    client_cls=FedBABUClient,
    schemas={"train": SHARED_WEIGHTS_ROUND, "evaluate": EVALUATE_WITH_WEIGHTS},
    summary="Body-only federation with a frozen random head; per-client fine-tuning for evaluation.",
    homogeneous_only=True,
    stateful_clients=False,
)
