"""FedMD as COSMOS's code runs it: the FedMD baseline of the COSMOS paper (methods.md §1.4).

Not the original FedMD (``fedmd``: class *scores* averaged, L1 digest, then a private revisit). The
COSMOS code's baseline runs the client routine COSMOS and COMET share
(pseudo_label_client.PseudoLabelClient) against one global consensus of *probabilities*:

Every round t:
  CLIENT i  distill the received targets (from round 1 on) with the shared KL routine (weights,
            noise consistency, T; Adam at lr 2e-3, the code's FedMD value), train on private data,
            upload p_i = softmax(f_i(U)) on the whole public set.
  SERVER    q = mean_i p_i over the round's uploads (rows renormalized: soft_labels.aggregate_probabilities),
            sent to every client at the start of the next round. No clustering, no server model.

It is COMET with a single cluster; it has its own name so configs, tables and docs tell the two
apart. Averaged probabilities of label-skewed clients are flat (docs/cosmos.md): that is the point of
running it beside the original FedMD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..configuration import option
from ..messages import Message
from .base import AlgorithmSpec, Comm, Server, ServerSetup
from .pseudo_label_client import SOFT_LABEL_ROUND, PseudoLabelClient, PseudoLabelClientConfig
from .soft_labels import AGGREGATIONS, aggregate_probabilities


@dataclass
class FedMDCosmosConfig(PseudoLabelClientConfig):
    distill_lr: float = option(2e-3, gt=0)  # COSMOS's code: client distillation lr of its FedMD baseline
    aggregation: str = option("mean", choices=AGGREGATIONS)  # FedMD averages the soft labels


class GlobalSoftLabelServer(Server):
    aggregates = "rows"  # the consensus: the experiment's robust rule, if any, over probability rows

    def __init__(self, config: FedMDCosmosConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.consensus: np.ndarray | None = None  # q, sent next round

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        down = {c: Message({"targets": self.consensus}) if self.consensus is not None else Message() for c in clients}
        replies = comm.ask("round", down)
        if not replies:
            return {}
        self.consensus = aggregate_probabilities([replies[c].arrays["probs"] for c in sorted(replies)],
                                                 self.config.aggregation, self.setup.aggregation)
        return {"consensus_top_prob": float(self.consensus.max(axis=1).mean())}


SPEC = AlgorithmSpec(
    name="fedmd_cosmos",
    config_cls=FedMDCosmosConfig,
    server_cls=GlobalSoftLabelServer,
    client_cls=PseudoLabelClient,
    schemas={"round": SOFT_LABEL_ROUND},
    summary="FedMD as COSMOS's code runs it: clients distill the global mean of soft labels (KL, lr 2e-3).",
    uses_public=True,
)
