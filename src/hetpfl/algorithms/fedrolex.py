"""FedRolex (Alam, Liu, Yan & Zhang, NeurIPS 2022): HeteroFL with a rolling sub-model window.

HeteroFL always trains the leading channels, so the channels beyond the narrowest clients' share
are trained by few clients. FedRolex rolls the window over the channels, one step per round, so
that over C rounds every channel of a hidden dimension of size C is trained equally often by
clients of every width. Every round t:

  SERVER  o_t = -t (one offset for every layer and every client of round t); for each sampled
          client k of width r_k and every hidden dimension of size C, the window
              S_k^t = { (o_t + i) mod C : 0 <= i < ceil(r_k C) }
          (a flattened-map linear layer takes whole channel blocks); sends W^t[S_k^t];
  CLIENT  loads W_k^t, trains with the shared routine and the scaler, uploads W_k and n_k
          (HeteroFL's client);
  SERVER  for every entry j of the full model, over the clients k whose window held j:
              W_j^{t+1} = Σ_k n_k W_{k,j} / Σ_k n_k;   entries nobody held keep W_j^t.

How the window moves, from the official code (``AIoT-MLSys-Lab/FedRolex``, ``resnet_server.py``,
``split_model``): the output indices of a layer of size C are ``torch.roll(arange(C), t % C)[:k]``
with t the server's round counter (0 in the first round, +1 after each aggregation). Rolling
``arange(C)`` right by t puts C - t first, so the window is (i - t) mod C: it starts at 0 and
moves one channel *down* each round. We do the same (``window_offset(t) = -t``; our rounds count
from 0 like that counter, and a resumed run continues from its round number). The paper writes
the window as starting at t mod C (moving up); both visit every channel equally often.

A full window (a width-1 client, or a dimension that does not narrow: inputs, classes) is
``arange(C)`` in the model's own order, where the official code takes the rolled order (the same
set, consistently permuted: the same function). So width-1 clients train FedAvg's model exactly,
and with every client at width 1 FedRolex writes FedAvg's records.

Everything else (sample-count weights instead of the code's client counts, no masked classifier,
BatchNorm running statistics averaged per entry, the scaler, fixed widths, what is reported) is
HeteroFL's here, for the reasons given in :mod:`hetpfl.algorithms.heterofl`; the official code
inherits HeteroFL's models (scaler, static BN, masked classifier) as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import AlgorithmSpec
from .fedavg import WEIGHTS_ROUND
from .heterofl import HeteroFLClient, HeteroFLConfig, HeteroFLServer
from .submodels import check_width_clients


@dataclass
class FedRolexConfig(HeteroFLConfig):
    """FedRolex's switches are HeteroFL's (``scaler``: the official config's ``scale: 1``)."""


class FedRolexServer(HeteroFLServer):
    """HeteroFL's server with a window that rolls one channel per round."""

    mode = "rolling"

    def window_offset(self, rnd: int) -> int:
        """o_t = -t: the official ``torch.roll(arange(C), t % C)[:k]`` (see the module doc)."""
        return -rnd


def check_fedrolex(config: FedRolexConfig, run: Any) -> None:
    """Every client narrows one width-capable architecture, at widths in (0, 1]."""
    check_width_clients("fedrolex", run.client_archs)


SPEC = AlgorithmSpec(
    name="fedrolex",
    config_cls=FedRolexConfig,
    server_cls=FedRolexServer,
    client_cls=HeteroFLClient,
    schemas={"train": WEIGHTS_ROUND},  # w./b. arrays of per-client shapes (shape=None fields)
    summary="Width sub-models (a channel window rolling every round) of one global model, averaged entry by entry.",
    stateful_clients=False,
    check_run=check_fedrolex,
)
