"""FedProx (Li et al., MLSys 2020): FedAvg whose local objective keeps the model near the global one.

Every round t:
  SERVER  sends the global weights w^t to the sampled clients S_t;
  CLIENT  k loads w^t and (inexactly) minimizes, with the shared client routine,
              h_k(w; w^t) = F_k(w) + (μ/2)·||w − w^t||²
          (F_k: cross-entropy on its private data; the anchor w^t: the weights it received,
          fixed during the local step), then uploads w_k and n_k;
  SERVER  w^{t+1} = Σ_{k∈S_t} n_k w_k / Σ_{k∈S_t} n_k.

Choices where the paper is silent or that differ from it:

* The proximal term covers every trainable parameter (not BatchNorm's running statistics, which
  are buffers) and is added to every mini-batch's loss, so its gradient μ(w − w^t) joins each
  step's, as in the paper's local solver.
* Aggregation: the paper's analysis samples clients with probability p_k = n_k/n and averages
  uniformly; its experiments' code averages the sampled clients weighted by n_k. We do the
  latter (FedAvg's ``aggregate``), like every weight-averaging method in this package.
* Systems heterogeneity: the paper lets stragglers do fewer local epochs (γ-inexact solutions).
  Every sampled client here runs the shared schedule (``client.local_epochs``); a client that
  fails is simply missing from the average.
* μ = 0 adds no term at all (not a zero term), so FedProx with μ = 0 is FedAvg exactly: the same
  ``metrics.jsonl``, byte for byte (tested).
* Default μ = 0.01, from the paper's grid {0.001, 0.01, 0.1, 1}; the best value depends on the
  data (tune it).

The client's own model (the personalized measure) is its locally updated copy and the averaged
model is ``global``, as for FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..configuration import Validated, option
from ..messages import Message
from .base import AlgorithmSpec, ClientContext, train_locally
from .fedavg import WEIGHTS_ROUND, FedAvgClient, FedAvgServer
from .parts import proximal_pull


@dataclass
class FedProxConfig(Validated):
    mu: float = option(0.01, ge=0)  # μ of the proximal term (μ/2)·||w − w^t||²; 0: FedAvg


class FedProxServer(FedAvgServer):
    """FedAvg's server: send w^t, average the replies weighted by n_k."""


class FedProxClient(FedAvgClient):
    def local_update(self, message: Message, ctx: ClientContext) -> None:
        """Minimize F_k(w) + (μ/2)·||w − w^t||² from w^t (the weights just loaded)."""
        train_locally(ctx, penalty=proximal_pull(ctx.model, self.config.mu))


SPEC = AlgorithmSpec(
    name="fedprox",
    config_cls=FedProxConfig,
    server_cls=FedProxServer,
    client_cls=FedProxClient,
    schemas={"train": WEIGHTS_ROUND},
    summary="FedAvg with a proximal term (mu/2)||w - w_global||^2 in local training.",
    homogeneous_only=True,
    stateful_clients=False,
)
