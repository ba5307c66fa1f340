"""FedCT (federated co-training, Abourayya et al.) as COSMOS's paper runs it: hard-label consensus.

Every round t:
  CLIENT i  the routine COSMOS clients run (pseudo_label_client), with hard labels both ways:
            distill the received consensus labels as one-hot targets (from round 1 on), train on
            private data, upload argmax f_i(x) for every public input x (int64 class ids).
  SERVER    the per-sample majority vote of all clients' labels (ties: the lowest class id),
            sent to every client at the start of the next round. No server model, no clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..messages import Message, Schema, StageSchema
from .base import AlgorithmSpec, Comm, Server, ServerSetup
from .pseudo_label_client import LABELS, HardLabelClient, PseudoLabelClientConfig
from .soft_labels import majority_vote


@dataclass
class FedCTConfig(PseudoLabelClientConfig):
    """FedCT has no hyperparameters beyond the shared pseudo-label client routine."""


class FedCTServer(Server):
    def __init__(self, config: FedCTConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.consensus: np.ndarray | None = None

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        down = {c: Message({"labels": self.consensus}) if self.consensus is not None else Message() for c in clients}
        replies = comm.ask("round", down)
        if not replies:
            return {}
        labels = [replies[c].arrays["labels"] for c in sorted(replies)]
        self.consensus = majority_vote(labels, self.setup.num_classes)
        agreement = float(np.mean([np.mean(y == self.consensus) for y in labels]))
        return {"agreement": agreement}


SPEC = AlgorithmSpec(
    name="fedct",
    config_cls=FedCTConfig,
    server_cls=FedCTServer,
    client_cls=HardLabelClient,
    schemas={
        "round": StageSchema(
            down=Schema(arrays={"labels": LABELS}, optional=frozenset({"labels"})),
            up=Schema(arrays={"labels": LABELS}),
        )
    },
    summary="Clients distill the majority vote of all clients' hard labels on the public inputs.",
    uses_public=True,
)
