"""FedRep (Collins et al., ICML 2021): a shared representation (body) and a personal head per client.

The model is split as f(x) = h_k(φ(x)): φ the body (every tensor but the head, buffers included),
shared and averaged; h_k the client's head, trained and kept on the client, never sent. Every
round t:
  SERVER  sends the global body φ^t to the sampled clients S_t;
  CLIENT  k loads φ^t under its own head h_k, then
            for τ_h epochs: update h_k with φ^t frozen          (``head_epochs``)
            for τ_φ epochs: update φ   with h_k frozen          (``body_epochs``)
          and uploads φ_k and n_k (the body only);
  SERVER  φ^{t+1} = Σ_{k∈S_t} n_k φ_k / Σ_{k∈S_t} n_k.
  EVALUATE (every evaluation round) the server sends the latest φ to every client, which scores
          φ with its own h_k on its test split — FedRep's personalized model. These bytes count
          as evaluation traffic (``bytes_eval_total``), not as the method's.

Choices where the paper is silent or that differ from it:

* τ_h default 10: "ten local epochs ... to train the local head, followed by one or five epochs for
  the representation" (the paper's experiments); τ_φ defaults to the shared ``client.local_epochs``.
  Both phases use the shared optimizer options (the paper: SGD with momentum, one step size).
* Head and body are selected by submodule (``model.head``; state names under ``head.``); the body
  includes its BatchNorm statistics, which travel and are averaged with it. The model stays in
  train mode in both phases (as in common implementations), so BatchNorm running statistics in
  the body move during the head phase too; the body's trainable weights do not.
* A client's head starts from its own initialization (the ``model`` slot's seed); a client never
  sampled is evaluated with φ and that untrained head.
* Aggregation weighted by n_k (FedAvg's ``aggregate``), like every weight-averaging method here;
  the paper's Algorithm 1 writes an equal-weight mean of the sampled clients' bodies (equal to
  ours when clients hold equally many samples).
* No ``global`` measure: a body alone classifies nothing, and pairing it with any one client's
  head (or an average of heads) would be a model FedRep never builds. The only global quantity
  is the body, which the personalized measure already evaluates with each client's head.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..configuration import Validated, option
from ..messages import Message
from .base import (
    EVALUATE_WITH_WEIGHTS,
    AlgorithmSpec,
    ClientContext,
    evaluation_reply,
    train_locally,
)
from .fedavg import WEIGHTS_ROUND, FedAvgClient, FedAvgServer
from .parts import body_only, body_parameters, head_parameters, is_body
from .weights import load_shared, shared_arrays


@dataclass
class FedRepConfig(Validated):
    head_epochs: float = option(10.0, ge=0)  # τ_h: epochs on the head, body frozen (paper: 10)
    body_epochs: float | None = option(None, ge=0)  # τ_φ: epochs on the body, head frozen (None: client.local_epochs)


class FedRepServer(FedAvgServer):
    shared = staticmethod(body_only)  # only the body travels and is averaged

    def evaluation_messages(self, clients: list[int]) -> dict[int, Message]:
        """The latest global body, so each client scores it under its own head."""
        body = shared_arrays(self.global_model, is_body)
        return {c: Message(dict(body)) for c in clients}

    def extra_models(self) -> dict[str, dict[int, nn.Module]]:
        return {}  # a body alone has no accuracy (see the module docstring)

    def test_models(self) -> dict[str, nn.Module]:
        return {}


class FedRepClient(FedAvgClient):
    shared = staticmethod(body_only)  # FedAvgClient.train loads and uploads the body only

    def local_update(self, message: Message, ctx: ClientContext) -> None:
        """The head first (body frozen), then the body (head frozen); two streams, one stage."""
        train_locally(ctx, self.config.head_epochs, params=head_parameters(ctx.model), stream="head")
        train_locally(ctx, self.config.body_epochs, params=body_parameters(ctx.model), stream="body")

    def evaluate(self, message: Message, ctx: ClientContext) -> Message:
        """The latest global body under this client's own head, on its test split."""
        load_shared(ctx.model, message.arrays, is_body)
        return evaluation_reply(ctx.model, ctx.test, ctx.num_tasks)


SPEC = AlgorithmSpec(
    name="fedrep",
    config_cls=FedRepConfig,
    server_cls=FedRepServer,
    client_cls=FedRepClient,
    schemas={"train": WEIGHTS_ROUND, "evaluate": EVALUATE_WITH_WEIGHTS},
    summary="Shared body averaged across clients, personal heads trained first and kept local.",
    homogeneous_only=True,
    stateful_clients=True,
)
