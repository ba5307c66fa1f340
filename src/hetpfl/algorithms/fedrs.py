"""FedRS (Li & Zhan, KDD 2021): FedAvg with a restricted softmax in local training.

A client that lacks some classes pushes their logits down during local training (their softmax
terms only appear as negatives), which drags the shared classifier's rows of those classes away
from features they never see. FedRS damps that: during local training, the logits of the classes
the client lacks are scaled by α ∈ [0, 1] before the softmax. Every round t:
  SERVER  sends the global weights w^t to the sampled clients S_t;
  CLIENT  k with present classes P_k = {c : n_{k,c} ≥ m} loads w^t and trains on its private data
          with the restricted cross-entropy
              ℓ(x, y) = −log softmax(s ⊙ f(x))_y,   s_c = 1 if c ∈ P_k else α,
          then uploads w_k and n_k;
  SERVER  w^{t+1} = Σ_{k∈S_t} n_k w_k / Σ_{k∈S_t} n_k.
Evaluation uses the plain softmax (the restriction is a training device only).

Choices where the paper is silent or that differ from it:

* α default 0.5: the middle of the official code's sweep {0.9, 0.5, 0.1} (FedRepo's
  ``train_lab.py``); smaller α restricts more, α = 1 is FedAvg exactly (tested), α = 0 removes
  the missing classes from the softmax altogether.
* Which classes are "missing": those with fewer than ``min_count`` samples in the client's
  training data of this round (default 1: the paper's definition, no sample at all; fluke counts a
  class with at most 2 samples as missing, i.e. ``min_count: 3``).
* The scale multiplies the whole logit, bias included (``learn.restricted_cross_entropy``). The
  official code scales a bias-free logit h·w_c and, instead of the hard 1/α mask, scales every
  class by α + (1 − α)·n_{k,c}/max_c n_{k,c} (present classes by their frequency too); that soft
  variant is not offered here.
* Aggregation weighted by n_k (the official code's ``update_global``), via FedAvg's ``aggregate``.

The client's own model (the personalized measure) is its locally updated copy and the averaged
model is ``global``, as for FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..configuration import Validated, option
from ..learn import restricted_cross_entropy
from ..messages import Message
from .base import AlgorithmSpec, ClientContext, train_locally
from .fedavg import WEIGHTS_ROUND, FedAvgClient, FedAvgServer


@dataclass
class FedRSConfig(Validated):
    alpha: float = option(0.5, ge=0, le=1)  # scale of the missing classes' logits; 1: FedAvg
    min_count: int = option(1, ge=1)  # a class with fewer training samples than this is missing


class FedRSServer(FedAvgServer):
    """FedAvg's server: send w^t, average the replies weighted by n_k."""


class FedRSClient(FedAvgClient):
    def local_update(self, message: Message, ctx: ClientContext) -> None:
        """Train from w^t with the missing classes' logits scaled by α."""
        present = torch.as_tensor(ctx.label_counts() >= self.config.min_count)
        train_locally(ctx, loss_fn=partial(restricted_cross_entropy, present=present, alpha=self.config.alpha))


SPEC = AlgorithmSpec(
    name="fedrs",
    config_cls=FedRSConfig,
    server_cls=FedRSServer,
    client_cls=FedRSClient,
    schemas={"train": WEIGHTS_ROUND},
    summary="FedAvg with a restricted softmax: missing classes' logits scaled by alpha in local training.",
    homogeneous_only=True,
    stateful_clients=False,
)
