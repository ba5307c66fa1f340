"""Local: every client trains alone on its private data; nothing is communicated."""

from __future__ import annotations

from dataclasses import dataclass

from ..messages import Message, StageSchema
from .base import AlgorithmSpec, Client, ClientContext, Comm, Server, train_locally


@dataclass
class LocalConfig:
    """Local training has no hyperparameters beyond the shared client routine."""


class LocalServer(Server):
    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        comm.ask("train", {c: Message() for c in clients})
        return {}


class LocalClient(Client):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        train_locally(ctx)
        return Message()


SPEC = AlgorithmSpec(
    name="local",
    config_cls=LocalConfig,
    server_cls=LocalServer,
    client_cls=LocalClient,
    schemas={"train": StageSchema()},
    summary="Each client trains on its own data only (no communication).",
)
