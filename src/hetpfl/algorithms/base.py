"""What an algorithm is: a Server and a Client that talk only through messages.

A method file defines a config dataclass (its hyperparameters and their defaults), the stage
schemas, a :class:`Server` subclass whose :meth:`Server.round` reads like the paper's server
pseudo-code and asks stages of clients through a :class:`Comm`, and a :class:`Client` subclass
with one method per stage. Nothing here knows which runtime carries the messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from ..data import ArrayDataset
from ..learn import OptimOptions, evaluate
from ..messages import ArrayField, Message, Schema, StageSchema
from ..rng import numpy_rng, torch_generator

EVALUATE_STAGE = "evaluate"
EVALUATE_SCHEMA = StageSchema(
    down=Schema(),
    up=Schema(scalars={"accuracy": float, "loss": float, "num_examples": int}),
)


@dataclass(frozen=True)
class ClientTraining:
    """The client routine every method shares (so baselines train clients identically)."""

    local_epochs: float = 1.0
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    max_grad_norm: float | None = None
    augment: str = "none"

    def optim(self, lr: float | None = None) -> OptimOptions:
        return OptimOptions(
            lr=self.lr if lr is None else lr,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            max_grad_norm=self.max_grad_norm,
        )


@dataclass
class ClientContext:
    """What a client's stage handler may use: its own model, data, state and random streams.

    ``public_inputs`` carries inputs only; public labels are not reachable from here.
    """

    client_id: int
    round: int
    stage: str
    arch: str
    model: nn.Module
    train: ArrayDataset
    test: ArrayDataset
    public_inputs: np.ndarray | None
    num_classes: int
    state: dict[str, Any]
    training: ClientTraining
    seed: int

    def rng(self, *keys: str | int) -> np.random.Generator:
        return numpy_rng(self.seed, "client", self.client_id, "round", self.round, self.stage, *keys)

    def generator(self, *keys: str | int) -> torch.Generator:
        return torch_generator(self.seed, "client", self.client_id, "round", self.round, self.stage, *keys)

    def label_counts(self) -> np.ndarray:
        """Counts of each class in this client's private training data."""
        return np.bincount(self.train.y, minlength=self.num_classes).astype(np.int64)


@dataclass
class ServerSetup:
    """What a server may use: public inputs (no labels), the clients' architectures, its own
    compute (``build_model``), the shared client routine, and its random stream."""

    num_clients: int
    num_classes: int
    input_shape: tuple[int, ...]
    client_archs: list[str]
    public_inputs: np.ndarray | None
    training: ClientTraining
    seed: int
    build_model: Callable[[str, str], nn.Module]  # (arch, seed key) -> freshly initialized model

    def rng(self, *keys: str | int) -> np.random.Generator:
        return numpy_rng(self.seed, "server", *keys)

    def generator(self, *keys: str | int) -> torch.Generator:
        return torch_generator(self.seed, "server", *keys)


class Comm(Protocol):
    """How a server reaches clients. Replies come back ordered by client id; a client that
    failed is missing from the replies (the runtime records why)."""

    def ask(self, stage: str, messages: Mapping[int, Message]) -> dict[int, Message]: ...


class Server:
    """Base server. Subclasses implement :meth:`round`."""

    def __init__(self, config: Any, setup: ServerSetup) -> None:
        self.config = config
        self.setup = setup

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        """Run one round with the sampled ``clients``; return server-side measures."""
        raise NotImplementedError

    def extra_models(self) -> dict[str, dict[int, nn.Module]]:
        """Models besides each client's own to evaluate on each client's test split, e.g.
        ``{"server": {client: cluster_model}}`` or ``{"global": {client: global_model}}``."""
        return {}

    def cluster_assignment(self) -> np.ndarray | None:
        """For clustering methods: each client's cluster id (-1: none yet), else None. The engine
        compares it with the true groups (the server never sees them)."""
        return None


class Client:
    """Base client. A stage named ``s`` is handled by the method ``s(message, ctx)``."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def handle(self, stage: str, message: Message, ctx: ClientContext) -> Message:
        handler = getattr(self, stage, None)
        if handler is None or stage.startswith("_"):
            raise ValueError(f"{type(self).__name__} has no stage '{stage}'")
        return handler(message, ctx)

    def evaluate(self, message: Message, ctx: ClientContext) -> Message:
        """The client's own model on its own test split (every algorithm, every round)."""
        result = evaluate(ctx.model, ctx.test.x, ctx.test.y)
        return Message(scalars={"accuracy": float(result["accuracy"]), "loss": float(result["loss"]),
                                "num_examples": int(result["n"])})


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered method: its config, its two sides and the messages of each stage."""

    name: str
    config_cls: type
    server_cls: type[Server]
    client_cls: type[Client]
    schemas: Mapping[str, StageSchema]
    summary: str
    homogeneous_only: bool = False
    uses_public: bool = False

    def schema(self, stage: str) -> StageSchema:
        if stage == EVALUATE_STAGE:
            return EVALUATE_SCHEMA
        if stage not in self.schemas:
            raise ValueError(f"algorithm '{self.name}' declares no stage '{stage}' (stages: {sorted(self.schemas)})")
        return self.schemas[stage]


# Reusable schema pieces -----------------------------------------------------------------------
WEIGHTS = ArrayField(dtype="float32", shape=None)
BUFFERS_INT = ArrayField(dtype="int64", shape=None)
PROBS = ArrayField(dtype="float32", shape=("num_public", "num_classes"), probabilities=True)


def weight_fields() -> dict[str, ArrayField]:
    """Prefixes for a model's state: float tensors and integer buffers (BatchNorm counters)."""
    return {"w.": WEIGHTS, "b.": BUFFERS_INT}


@dataclass
class NoConfig:
    """For methods without hyperparameters of their own."""


__all__ = [
    "AlgorithmSpec",
    "Client",
    "ClientContext",
    "ClientTraining",
    "Comm",
    "EVALUATE_STAGE",
    "NoConfig",
    "PROBS",
    "Server",
    "ServerSetup",
    "train_locally",
    "weight_fields",
]


def train_locally(ctx: ClientContext, epochs: float | None = None) -> dict[str, float]:
    """The shared client routine: cross-entropy on the client's private data."""
    from ..learn import fit  # noqa: PLC0415

    return fit(
        ctx.model,
        ctx.train.x,
        ctx.train.y,
        epochs=ctx.training.local_epochs if epochs is None else epochs,
        batch_size=ctx.training.batch_size,
        optim=ctx.training.optim(),
        generator=ctx.generator("fit"),
        augment=ctx.training.augment,
    )
