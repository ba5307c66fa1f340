"""Ditto (Li et al., ICML 2021): a personal model per client, pulled towards the global model.

Each client k holds two models: its personal model v_k (the ``model`` slot, the one evaluated as
the personalized measure) and a working copy of the global model (the ``global`` slot). Every
round t:
  SERVER  sends the global weights w^t to the sampled clients S_t;
  CLIENT  k (the paper's Algorithm 1, both updates from the same received w^t):
            v_k ← approx. argmin_v  F_k(v) + (λ/2)·||v − w^t||²   (personal, kept on the client)
            w_k ← FedAvg's local step from w^t on F_k               (the global copy, uploaded)
          uploads w_k and n_k;
  SERVER  w^{t+1} = Σ_{k∈S_t} n_k w_k / Σ_{k∈S_t} n_k.

Choices where the paper is silent or that differ from it:

* Order: the paper updates the global copy first, then v_k; both start from w^t and the anchor is
  the received w^t either way, so the order changes nothing but the random streams. We train v_k
  first, on the ``model`` slot's seed, stream ``fit`` and stage ``train`` — exactly what Local does
  — and the global copy second on its own stream (``global``), so **λ = 0 gives each client
  exactly Local's model** (``client_acc`` and every ``personalized_acc_*`` identical, tested).
* λ = 0 adds no term at all; λ is the paper's λ (the penalty is (λ/2)·||v − w^t||² over every
  trainable parameter, added to every mini-batch's loss; its gradient λ(v − w^t) is the paper's).
  Default λ = 0.1: the paper lets each device pick λ on its validation data from {0.05, 0.1, 0.2}
  or {0.1, 1, 2} (its attack settings); 0.1 is in both grids. No per-device selection here.
* v_k^0 (the paper takes it as an input): ``personal_init: own`` (default) starts from the client's
  own initialization, as Local; ``global`` sets v_k ← w^t the first time the client takes part.
* The personal model trains for ``personal_epochs`` (the paper's s local steps; default the shared
  ``client.local_epochs``), the global copy for ``client.local_epochs``. Both use the shared
  optimizer options (the paper uses one learning rate for both).
* The global model is FedAvg's (Ditto leaves the global solver open; the paper pairs it with
  FedAvg): aggregation weighted by n_k (FedAvg's ``aggregate``).
* A client never sampled keeps its initial v_k (as under Local). The server's model is reported
  as ``global`` (each client's test split) and ``global_test`` (the global test set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..configuration import Validated, option
from ..messages import Message
from ..models import ModuleSpec
from .base import MAIN_SLOT, AlgorithmSpec, Client, ClientContext, train_locally
from .fedavg import WEIGHTS_ROUND, FedAvgServer
from .parts import proximal_pull
from .weights import load_shared, shared_arrays

GLOBAL_SLOT = "global"  # the client's working copy of the global model
PERSONAL_INITS = ("own", "global")


@dataclass
class DittoConfig(Validated):
    lam: float = option(0.1, ge=0)  # λ of (λ/2)·||v − w^t||²; 0: each client's v_k is Local's model
    personal_epochs: float | None = option(None, ge=0)  # epochs of v_k's update (None: client.local_epochs)
    personal_init: str = option("own", choices=PERSONAL_INITS)  # v_k^0: own init, or w^t at first contact


def ditto_modules(arch: str, config: Any, data: Any = None) -> dict[str, ModuleSpec]:
    """The personal model in ``model`` (Local's slot and seed), the global copy in ``global``."""
    return {MAIN_SLOT: ModuleSpec.parse(arch), GLOBAL_SLOT: ModuleSpec.parse(arch)}


class DittoServer(FedAvgServer):
    """FedAvg's server: send w^t, average the global copies weighted by n_k; report w as ``global``."""


class DittoClient(Client):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        personal, global_copy = ctx.model, ctx.modules[GLOBAL_SLOT]
        load_shared(global_copy, message.arrays)  # w^t
        if self.config.personal_init == "global" and not ctx.state.get("joined", False):
            load_shared(personal, message.arrays)
            ctx.state["joined"] = True
        # v_k first (Local's slot, stream and stage), anchored at w^t, then the global copy
        train_locally(ctx, self.config.personal_epochs, model=personal,
                      penalty=proximal_pull(personal, self.config.lam, anchors=global_copy.parameters()))
        train_locally(ctx, model=global_copy, stream="global")
        return Message(shared_arrays(global_copy), {"num_examples": len(ctx.train)})


SPEC = AlgorithmSpec(
    name="ditto",
    config_cls=DittoConfig,
    server_cls=DittoServer,
    client_cls=DittoClient,
    schemas={"train": WEIGHTS_ROUND},
    summary="Personal models regularized towards a FedAvg global model (lambda/2)||v - w||^2.",
    homogeneous_only=True,
    stateful_clients=True,
    client_modules=ditto_modules,
)
