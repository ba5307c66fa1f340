"""FedAvg (McMahan et al., 2017): average the clients' weights, weighted by sample count.

Every round t:
  SERVER  sends the global weights w^t to the sampled clients;
  CLIENT  loads w^t, trains on its private data (the shared routine), uploads w_k and n_k;
  SERVER  w^{t+1} = Σ_k n_k w_k / Σ_k n_k.

Weights can only be averaged between identical architectures, so FedAvg refuses a federation of
heterogeneous models (the spec's ``homogeneous_only``, checked before training). The client's
own model is its locally updated copy (the personalized measure); the averaged model is reported
as ``global`` on every client's test split and as ``global_test`` on the global test set.

The server and client here are the base of the methods that change one step of this loop:
``shared`` (which of a model's tensors travel; FedBN keeps BatchNorm local), ``local_update``
(FedProx's proximal term, FedRS's restricted softmax) and ``aggregate``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping

from torch import nn

from ..learn import arrays_to_state
from ..messages import Message, Schema, StageSchema
from .base import (AlgorithmSpec, Client, ClientContext, Comm, Server, ServerSetup, train_locally, train_locally_many,
                   weight_fields)
from .weights import KeyFilter, aggregate_weights, load_shared, shared_arrays


@dataclass
class FedAvgConfig:
    """FedAvg has no hyperparameters beyond the shared client routine."""


def share_everything(model: nn.Module) -> KeyFilter | None:
    """FedAvg shares every tensor of the model (None: no filter)."""
    return None


class FedAvgServer(Server):
    aggregates = "weights"  # the experiment's aggregation rule applies (robust.WEIGHT_RULES)
    # which of a model's tensors travel (a filter on state-dict names; None: all); must match the client's
    shared: Callable[[nn.Module], KeyFilter | None] = staticmethod(share_everything)

    def __init__(self, config: FedAvgConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        # one architecture for every client: the spec declares homogeneous_only, checked in prepare
        self.global_model = setup.build_model(setup.client_archs[0], "global")

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        weights = shared_arrays(self.global_model, self.shared(self.global_model))
        replies = comm.ask("train", {c: Message(dict(weights)) for c in clients})
        if replies:
            self.aggregate(replies)
        return {}

    def aggregate(self, replies: dict[int, Message]) -> None:
        """w ← Σ n_k w_k / Σ n_k over the shared tensors (or the experiment's robust rule)."""
        states = [dict(r.arrays) for r in replies.values()]
        sizes = [float(r.scalars["num_examples"]) for r in replies.values()]
        combined = aggregate_weights(states, sizes, self.setup.aggregation)
        arrays_to_state(self.global_model, combined, strict=self.shared(self.global_model) is None)

    def extra_models(self) -> dict[str, dict[int, nn.Module]]:
        return {"global": {c: self.global_model for c in range(self.setup.num_clients)}}

    def test_models(self) -> dict[str, nn.Module]:
        return {"global": self.global_model}


class FedAvgClient(Client):
    shared: Callable[[nn.Module], KeyFilter | None] = staticmethod(share_everything)  # as the server's

    def train(self, message: Message, ctx: ClientContext) -> Message:
        shared = self.shared(ctx.model)
        load_shared(ctx.model, message.arrays, shared)
        self.local_update(message, ctx)
        return self._trained_reply(ctx, shared)

    @staticmethod
    def _trained_reply(ctx: ClientContext, shared: KeyFilter | None) -> Message:
        """What a client uploads after its local step: its shared weights and its sample count."""
        return Message(shared_arrays(ctx.model, shared), {"num_examples": len(ctx.train)})

    def local_update(self, message: Message, ctx: ClientContext) -> None:
        """The local step from the received weights (the shared client routine)."""
        train_locally(ctx)

    def train_many(self, messages: Mapping[int, Message], ctxs: Mapping[int, ClientContext]) -> dict[int, Message] | None:
        """``train`` for a group of clients at once (the batched executor): the shared client routine
        as one stacked model. None (the group then goes client by client) when a subclass changes the
        local step or the group's models do not stack."""
        if (type(self).train, type(self).local_update) != (FedAvgClient.train, FedAvgClient.local_update):
            return None
        shared = {client: self.shared(ctx.model) for client, ctx in ctxs.items()}
        for client, ctx in ctxs.items():
            load_shared(ctx.model, messages[client].arrays, shared[client])
        if train_locally_many(list(ctxs.values())) is None:
            return None
        return {client: self._trained_reply(ctx, shared[client]) for client, ctx in ctxs.items()}


# The global weights down, the client's weights up: every array sent down comes back, in its shape.
WEIGHTS_ROUND = StageSchema(
    down=Schema(prefix_arrays=weight_fields()),
    up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int}, returns_sent=True),
)
# The same for methods whose clients upload only the shared part of what they receive.
SHARED_WEIGHTS_ROUND = StageSchema(down=WEIGHTS_ROUND.down, up=replace(WEIGHTS_ROUND.up, returns_sent=False))

SPEC = AlgorithmSpec(
    name="fedavg",
    config_cls=FedAvgConfig,
    server_cls=FedAvgServer,
    client_cls=FedAvgClient,
    schemas={"train": WEIGHTS_ROUND},
    summary="Weighted averaging of client weights (homogeneous architectures only).",
    homogeneous_only=True,
    stateful_clients=False,
)
