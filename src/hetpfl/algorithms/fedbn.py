"""FedBN (Li et al., ICLR 2021): FedAvg that keeps every BatchNorm layer local to its client.

Let BN be the state of the model's BatchNorm layers (affine weight γ and bias β, running mean and
variance, batch counter) and W the rest. Every round t:
  SERVER  sends W^t (no BN) to the sampled clients S_t;
  CLIENT  k loads W^t next to its own BN_k (kept from its last round; its initial BN at first),
          trains the whole model on its private data (the shared client routine), uploads W_k and
          n_k; BN_k stays on the client;
  SERVER  W^{t+1} = Σ_{k∈S_t} n_k W_k / Σ_{k∈S_t} n_k.

Choices where the paper is silent or that differ from it:

* Which tensors are "BatchNorm": every tensor of a ``nn.BatchNorm1d/2d/3d`` (or
  ``nn.SyncBatchNorm``) module, found by module type on the model, not by name (the registry's
  nets name their BN layers by position). The paper keeps γ, β and the running statistics local;
  the integer batch counter goes with them (it belongs to the same layer).
* Aggregation is weighted by n_k (FedAvg's rule), as in the paper's Algorithm 1.
* Evaluation: a client's own model is its locally updated copy (global W of the round it last
  took part in, its own BN, then local training), as for FedAvg. The server never holds BN
  layers that mean anything (its copy keeps its initialization), so with BatchNorm there is **no
  global model** and no ``global`` measure. On a model without BatchNorm every tensor is shared,
  the server's model is complete and is reported as ``global`` — and FedBN is FedAvg exactly,
  byte for byte (tested).
* Clients keep state (their BN): a run with ``runtime.client_state=none`` is refused before
  training (``stateful_clients``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..configuration import Validated
from .base import AlgorithmSpec
from .fedavg import WEIGHTS_ROUND, FedAvgClient, FedAvgServer
from .weights import KeyFilter

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_keys(model: nn.Module) -> frozenset[str]:
    """State-dict names of every tensor of ``model``'s BatchNorm layers (parameters and buffers)."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, BATCHNORM_TYPES):
            keys.update(f"{name}.{k}" if name else k for k in module.state_dict())
    return frozenset(keys)


def not_batchnorm(model: nn.Module) -> KeyFilter:
    """The shared part of ``model``: every state-dict name outside its BatchNorm layers."""
    local = batchnorm_keys(model)
    return lambda name: name not in local


@dataclass
class FedBNConfig(Validated):
    """FedBN has no hyperparameters beyond the shared client routine."""


class FedBNServer(FedAvgServer):
    shared = staticmethod(not_batchnorm)  # what travels: everything outside the BatchNorm layers

    def _complete(self) -> bool:
        """Whether the server's model is a real model (no BatchNorm: nothing is kept local)."""
        return not batchnorm_keys(self.global_model)

    def extra_models(self) -> dict[str, dict[int, nn.Module]]:
        return super().extra_models() if self._complete() else {}

    def test_models(self) -> dict[str, nn.Module]:
        return super().test_models() if self._complete() else {}


class FedBNClient(FedAvgClient):
    shared = staticmethod(not_batchnorm)  # loads W^t beside its own BN, uploads W_k; BN stays


SPEC = AlgorithmSpec(
    name="fedbn",
    config_cls=FedBNConfig,
    server_cls=FedBNServer,
    client_cls=FedBNClient,
    schemas={"train": WEIGHTS_ROUND},
    summary="FedAvg with every BatchNorm layer (affine and statistics) kept local to its client.",
    homogeneous_only=True,
    stateful_clients=True,
)
