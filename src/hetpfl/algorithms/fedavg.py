"""FedAvg (McMahan et al., 2017): average the clients' weights, weighted by sample count.

Weights can only be averaged between identical architectures, so FedAvg refuses a federation
of heterogeneous models. The client's own model is its locally updated copy (reported as the
personalized measure); the averaged model is reported as ``global``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..learn import arrays_to_state, state_to_arrays
from ..messages import Message, Schema, StageSchema
from .base import AlgorithmSpec, Client, ClientContext, Comm, Server, ServerSetup, train_locally, weight_fields


@dataclass
class FedAvgConfig:
    """FedAvg has no hyperparameters beyond the shared client routine."""


def weighted_average(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Average float arrays by ``weights``; integer buffers (counters) take the maximum."""
    total = float(sum(weights))
    out = {}
    for key in states[0]:
        if key.startswith("w."):
            out[key] = (sum(w * s[key].astype(np.float64) for s, w in zip(states, weights)) / total).astype(np.float32)
        else:
            out[key] = np.max(np.stack([s[key] for s in states]), axis=0)
    return out


class FedAvgServer(Server):
    def __init__(self, config: FedAvgConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        # one architecture for every client: the spec declares homogeneous_only, checked in prepare
        self.global_model = setup.build_model(setup.client_archs[0], "global")

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        weights = state_to_arrays(self.global_model)
        replies = comm.ask("train", {c: Message(dict(weights)) for c in clients})
        if replies:
            states = [{k: v for k, v in r.arrays.items()} for r in replies.values()]
            sizes = [float(r.scalars["num_examples"]) for r in replies.values()]
            arrays_to_state(self.global_model, weighted_average(states, sizes))
        return {}

    def extra_models(self) -> dict[str, dict[int, nn.Module]]:
        return {"global": {c: self.global_model for c in range(self.setup.num_clients)}}


class FedAvgClient(Client):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        arrays_to_state(ctx.model, message.arrays)
        train_locally(ctx)
        return Message(state_to_arrays(ctx.model), {"num_examples": len(ctx.train)})


SPEC = AlgorithmSpec(
    name="fedavg",
    config_cls=FedAvgConfig,
    server_cls=FedAvgServer,
    client_cls=FedAvgClient,
    schemas={
        "train": StageSchema(
            down=Schema(prefix_arrays=weight_fields()),
            up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int}),
        )
    },
    summary="Weighted averaging of client weights (homogeneous architectures only).",
    homogeneous_only=True,
)
